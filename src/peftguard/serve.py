"""``peftguard psim serve``: screening over HTTP, models loaded once, concurrent requests scored in batches.

Standard library only (``http.server.ThreadingHTTPServer``): a request is a few hundred bytes and the
forward pass costs milliseconds per input, so the HTTP layer is not the bottleneck (``bench/serve_load.py``
measures it); a framework would add a dependency and no throughput.

* ``POST /screen`` with ``{"texts": ["...", ...]}`` (or ``{"text": "..."}``) answers
  ``{"results": [{"label": 1 | "rejected as poisoned" | null, "confidence": 0.93, "flagged": false}, ...]}``:
  with a victim, its label and its probability, or ``"rejected as poisoned"`` with the PSIM's confidence;
  without one, ``label`` is null for inputs that pass.
* ``GET /health`` answers the settings.
* Request threads put their inputs on one queue; a single worker takes up to ``max_batch`` inputs at a time
  (waiting ``max_wait_ms`` for more once one arrived) and answers each request. When more than
  ``queue_limit`` inputs wait, new requests get HTTP 503 at once, with ``Retry-After``.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from peftguard.errors import OptionError
from peftguard.models import LoadOptions
from peftguard.precision import DEFAULT_PRECISION

Scorer = Callable[[list[str]], list[dict[str, Any]]]


@dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 64
    max_wait_ms: float = 5.0
    queue_limit: int = 1024
    max_texts_per_request: int = 256
    max_body_bytes: int = 1 << 20

    def validate(self) -> None:
        for name in ("max_batch", "queue_limit", "max_texts_per_request"):
            if getattr(self, name) < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise OptionError(f"--max-wait-ms must not be negative, got {self.max_wait_ms}")


class Overloaded(Exception):
    """More inputs wait than the queue holds."""


@dataclass
class _Job:
    texts: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    results: list[dict[str, Any]] | None = None
    error: BaseException | None = None


class BatchingScreener:
    """Collects inputs of concurrent callers into batches for one scoring thread; bounded queue."""

    def __init__(self, score: Scorer, settings: ServeSettings = ServeSettings()) -> None:
        settings.validate()
        self.score, self.settings = score, settings
        self._jobs: deque[_Job] = deque()
        self._waiting = 0  # inputs queued, not yet taken by the worker
        self._lock = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="peftguard-screener", daemon=True)
        self._worker.start()

    def submit(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Results for ``texts`` once their batch ran; :class:`Overloaded` at once if the queue is full."""
        job = _Job(list(texts))
        with self._lock:
            if self._waiting + len(job.texts) > self.settings.queue_limit:
                raise Overloaded(f"{self._waiting} inputs are waiting (limit {self.settings.queue_limit}); retry later")
            self._jobs.append(job)
            self._waiting += len(job.texts)
            self._lock.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.results or []

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._worker.join(timeout=5)

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._answer(batch)

    def _next_batch(self) -> list[_Job] | None:
        with self._lock:
            while not self._jobs and not self._closed:
                self._lock.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.settings.max_wait_ms / 1000
            while self._waiting < self.settings.max_batch and (left := deadline - time.monotonic()) > 0:
                self._lock.wait(left)
            batch, size = [], 0
            while self._jobs and (not batch or size + len(self._jobs[0].texts) <= self.settings.max_batch):
                job = self._jobs.popleft()
                batch.append(job)
                size += len(job.texts)
            self._waiting -= size
            return batch

    def _answer(self, batch: list[_Job]) -> None:
        texts = [t for job in batch for t in job.texts]
        try:
            results = self.score(texts)
        except Exception as exc:  # answered to every caller of the batch; the server keeps serving
            for job in batch:
                job.error = exc
                job.done.set()
            return
        at = 0
        for job in batch:
            job.results = results[at:at + len(job.texts)]
            at += len(job.texts)
            job.done.set()


def psim_scorer(psim: Any, gamma: float, victim: Any | None = None, tokenizer: Any | None = None,
                max_length: int = 128) -> Scorer:
    """Score texts with the PSIM alone, or with the victim behind it (``GuardedPredictor``)."""
    from peftguard import metrics
    from peftguard.defenses.psim import REJECTED, GuardedPredictor

    if victim is not None:
        guard = GuardedPredictor(psim, victim, tokenizer, gamma=gamma, max_length=max_length)
        return lambda texts: [{"label": v.label, "confidence": round(v.confidence, 6), "flagged": v.rejected}
                              for v in guard.verdicts(texts)]

    def screen(texts: list[str]) -> list[dict[str, Any]]:
        scores = psim.confidences(texts, gamma=gamma)
        return [{"label": REJECTED if f else None, "confidence": round(float(s), 6), "flagged": bool(f)}
                for s, f in zip(scores, metrics.flagged(scores, gamma))]

    return screen


class ScreeningServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog: socketserver's default 5 resets connections of a burst of clients

    def __init__(self, address: tuple[str, int], screener: BatchingScreener, info: dict[str, Any]) -> None:
        super().__init__(address, ScreeningHandler)
        self.screener, self.info = screener, info


class ScreeningHandler(BaseHTTPRequestHandler):
    server: ScreeningServer
    protocol_version = "HTTP/1.1"  # keep-alive: a load test's clients reuse their connections

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path != "/health":
            return self._reply(HTTPStatus.NOT_FOUND, {"error": "not found: GET /health or POST /screen"})
        self._reply(HTTPStatus.OK, {"status": "ok", **self.server.info})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/screen":
            return self._reply(HTTPStatus.NOT_FOUND, {"error": "not found: POST /screen"})
        texts, problem = self._texts()
        if problem is not None:
            return self._reply(*problem)
        try:
            results = self.server.screener.submit(texts)
        except Overloaded as exc:
            return self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"overloaded: {exc}"}, {"Retry-After": "1"})
        except Exception as exc:  # noqa: BLE001 - one line to the client, the server goes on
            return self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})
        self._reply(HTTPStatus.OK, {"results": results})

    def _texts(self) -> tuple[list[str], tuple[HTTPStatus, dict[str, str]] | None]:
        settings = self.server.screener.settings
        length = int(self.headers.get("Content-Length") or 0)
        if length > settings.max_body_bytes:
            return [], (HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body over {settings.max_body_bytes} bytes"})
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return [], (HTTPStatus.BAD_REQUEST, {"error": f"body is not JSON: {exc}"})
        texts = _texts_of(body)
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            return [], (HTTPStatus.BAD_REQUEST, {"error": 'expected {"texts": ["...", ...]} or {"text": "..."}'})
        if len(texts) > settings.max_texts_per_request:
            return [], (HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        {"error": f"{len(texts)} texts; at most {settings.max_texts_per_request} per request"})
        return texts, None

    def _reply(self, status: HTTPStatus, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: one line per request is noise
        pass


def _texts_of(body: Any) -> Any:
    if not isinstance(body, dict):
        return None
    return [body["text"]] if "text" in body else body.get("texts")


def build_server(psim_dir: Path, victim_dir: Path | None, *, host: str = "127.0.0.1", port: int = 0,
                 gamma: float | None = None, settings: ServeSettings = ServeSettings(),
                 precision: str = DEFAULT_PRECISION, options: LoadOptions = LoadOptions()) -> ScreeningServer:
    """Load the models and bind the server (not yet serving: call ``serve_forever``)."""
    from peftguard.bounds import BOUNDS
    from peftguard.scan import open_psim

    settings.validate()
    if gamma is not None:
        BOUNDS["gamma"].check(gamma, "--gamma")
    psim = open_psim(psim_dir, batch_size=settings.max_batch, precision=precision, allow_pickle=options.allow_pickle)
    gamma = float(psim.manifest["gamma"]) if gamma is None else gamma
    victim = tokenizer = None
    max_length = psim.max_length
    if victim_dir is not None:
        from peftguard.tuning import load_tuned
        from peftguard.victims import MANIFEST

        victim, tokenizer, manifest = load_tuned(victim_dir, MANIFEST, options)
        max_length = int(manifest["settings"]["max_length"])
    screener = BatchingScreener(psim_scorer(psim, gamma, victim, tokenizer, max_length), settings)
    info = {"psim": str(psim_dir), "victim": str(victim_dir) if victim_dir else None, "gamma": gamma,
            "precision": psim.precision, "int8_activation_bits": psim.activation_bits, "max_batch": settings.max_batch,
            "queue_limit": settings.queue_limit}
    try:
        return ScreeningServer((host, port), screener, info)
    except OSError as exc:
        screener.close()
        raise OptionError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve_command(psim_dir: Path, victim_dir: Path | None, *, host: str, port: int, gamma: float | None,
                  settings: ServeSettings, precision: str, options: LoadOptions) -> None:
    server = build_server(psim_dir, victim_dir, host=host, port=port, gamma=gamma, settings=settings,
                          precision=precision, options=options)
    bound_host, bound_port = server.server_address[:2]
    print(f"serving on http://{bound_host}:{bound_port} (POST /screen, GET /health); gamma {server.info['gamma']:.4f}, "
          f"{server.info['precision']}; Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.screener.close()
