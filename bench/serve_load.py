#!/usr/bin/env python
"""Load test of ``psim serve`` on loopback: concurrent clients, a bounded number of requests and seconds.

The server (PSIM at the default precision + victim, as ``peftguard psim serve --victim`` runs it) starts in this
process on 127.0.0.1 and a free port; ``--clients`` threads send one SST-2 test sentence per request over
keep-alive connections until ``--requests`` are answered or ``--max-seconds`` pass. Reports throughput and
p50/p99 latency; then a burst against a server with a small queue shows the HTTP 503 answer under overload.
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import numpy as np  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--psim", type=Path)
    parser.add_argument("--victim", type=Path)
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT_DIR / "serve_load.json")
    return parser


def parse_args() -> argparse.Namespace:
    return build_parser().parse_args()


def _client(port: int, texts: list[str], budget: dict[str, Any], latencies: list[float], statuses: list[int]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while True:
        with budget["lock"]:
            if budget["left"] <= 0 or time.perf_counter() > budget["deadline"]:
                break
            budget["left"] -= 1
            index = budget["left"]
        body = json.dumps({"text": texts[index % len(texts)]})
        started = time.perf_counter()
        connection.request("POST", "/screen", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        latencies.append(time.perf_counter() - started)
        statuses.append(response.status)
    connection.close()


def load(port: int, texts: list[str], requests: int, clients: int, max_seconds: float) -> dict[str, Any]:
    budget = {"lock": threading.Lock(), "left": requests, "deadline": time.perf_counter() + max_seconds}
    latencies: list[float] = []
    statuses: list[int] = []
    threads = [threading.Thread(target=_client, args=(port, texts, budget, latencies, statuses)) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    ok = [lat for lat, status in zip(latencies, statuses) if status == 200]
    return {"requests": len(statuses), "ok": len(ok), "status_503": statuses.count(503), "clients": clients,
            "seconds": seconds, "requests_per_s": len(ok) / seconds,
            "latency_p50_ms": 1000 * float(np.percentile(ok, 50)) if ok else None,
            "latency_p99_ms": 1000 * float(np.percentile(ok, 99)) if ok else None}


def serving(psim_dir: Path, victim_dir: Path | None, **settings: Any):
    from peftguard.serve import ServeSettings, build_server

    server = build_server(psim_dir, victim_dir, port=0, settings=ServeSettings(**settings))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run_load_test(psim_dir: Path, victim_dir: Path | None, *, requests: int = 400, clients: int = 32,
                  max_seconds: float = 60.0) -> dict[str, Any]:
    """Throughput and latency under ``clients`` concurrent clients; then an overload burst against a 4-input queue."""
    texts = [ex.text for ex in common.sst2_examples("test", 500)]
    server = serving(psim_dir, victim_dir)
    try:
        load(server.server_address[1], texts, min(requests, 2 * clients), clients, max_seconds)  # warm-up
        result = load(server.server_address[1], texts, requests, clients, max_seconds)
    finally:
        server.shutdown()
        server.screener.close()
    small = serving(psim_dir, victim_dir, queue_limit=4, max_batch=4)
    try:
        burst = load(small.server_address[1], texts, 4 * clients, clients, max_seconds)
    finally:
        small.shutdown()
        small.screener.close()
    return {**result, "overload_burst": {k: burst[k] for k in ("requests", "ok", "status_503")},
            "load_average": list(__import__("os").getloadavg())}


def main() -> None:
    args = parse_args()
    common.setup()
    if args.psim and args.victim:
        psim_dir, victim_dir = args.psim, args.victim
    else:
        from bench_models import ensure_bench_models

        models = ensure_bench_models()
        psim_dir, victim_dir = args.psim or models.psim, args.victim or models.victim
    result = run_load_test(psim_dir, victim_dir, requests=args.requests, clients=args.clients, max_seconds=args.max_seconds)
    result["machine"] = common.machine()
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    common.write_json(args.out, result)


if __name__ == "__main__":
    main()
