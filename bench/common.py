"""Helpers shared by the benchmarks: timing with medians, peak memory, the machine, tables, JSON.

The machine these run on is shared and noisy, so every benchmark interleaves the things it compares
(round-robin over repeats) and reports medians and ratios measured in the same run, never a single
absolute time.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO / "runs" / "bench"


def setup(wait_policy: str | None = "PASSIVE") -> int:
    """Quiet logs, no tokenizer thread pool, torch threads and OpenMP wait policy as the CLI sets
    them (``peftguard.runtime``); returns the thread count. Call before anything imports torch."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is first imported
    from peftguard.runtime import configure_threads

    threads = configure_threads(wait_policy)  # before torch loads OpenMP: the wait policy is read then
    import transformers

    transformers.logging.set_verbosity_error()
    return threads


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of one call, and its result."""
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall and CPU seconds (this process, all threads) of one call.

    On a loaded machine wall time includes waiting for a core; CPU time does not, so it is the
    steadier figure for comparing work (it still counts OpenMP threads spinning at barriers).
    """
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def interleaved(cases: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds of each case over ``repeats`` rounds, the cases taking turns in each round.

    Taking turns spreads the load of other processes over all cases alike, so ratios stay fair.
    Returns ``{case: {"wall": [...], "cpu": [...]}}``.
    """
    seconds: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            wall, cpu = timed_cpu(fn)
            seconds[name]["wall"].append(wall)
            seconds[name]["cpu"].append(cpu)
    return seconds


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def machine() -> dict[str, Any]:
    """Cores, CPU model, load and versions: what a figure was measured on."""
    import torch

    from peftguard.provenance import versions

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_5m_15m": list(os.getloadavg()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions(),
        "argv": sys.argv,
    }


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (dicts) with the given columns, floats rounded."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def sst2_examples(split: str, count: int | None, seed: int = 0) -> list:
    """``count`` examples of SST-2's ``split`` (a reproducible subset)."""
    from peftguard.data import load_dataset, subsample

    dataset = load_dataset("sst2")
    return subsample(dataset.split(split).examples, count, seed)
