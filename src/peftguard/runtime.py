"""Process-wide runtime settings, each decided in one place: how many CPU threads torch uses, and which device
models run on (:func:`compute_device`).

``PEFTGUARD_THREADS`` if set; else ``OMP_NUM_THREADS`` if set to a number (what the user or a
test harness asked for); else the cores this process may run on (``os.sched_getaffinity``, which
respects taskset and container CPU sets, unlike ``os.cpu_count``). More threads than cores only
adds contention: OpenMP threads spin-wait for each other at every operator.

It also makes OpenMP threads sleep, not spin, while they wait (``OMP_WAIT_POLICY=PASSIVE``,
unless the environment says otherwise). torch's CPU wheel uses GNU OpenMP, which spins at every
barrier when it has as many threads as cores; on a machine shared with other processes a spinning
thread holds the core its descheduled partner needs. Measured on 2 loaded cores
(``bench/threads.py``): a MiniLM training step took 3.4-4.2x longer with the default policy than
with PASSIVE. Like the thread count, the policy is read when torch loads OpenMP, so call
:func:`configure_threads` before importing torch (the CLI does).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

from peftguard.errors import OptionError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

THREADS_ENV = "PEFTGUARD_THREADS"


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def thread_count() -> int:
    """``$PEFTGUARD_THREADS``, else a numeric ``$OMP_NUM_THREADS``, else the available cores."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise OptionError(f"{THREADS_ENV} must be a positive integer, got {value!r}")
        return int(value)
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(omp) if omp.isdigit() and int(omp) > 0 else available_cores()


def configure_threads(wait_policy: str | None = "PASSIVE") -> int:
    """Apply :func:`thread_count` and the wait policy: to torch if it is imported, else through
    ``OMP_NUM_THREADS`` (read when torch loads, so calling this early costs no torch import).
    ``wait_policy=None`` leaves OpenMP's default. Returns the thread count."""
    threads = thread_count()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if wait_policy:
        os.environ.setdefault("OMP_WAIT_POLICY", wait_policy)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    log.debug("CPU threads: %d", threads)
    return threads


def compute_device() -> torch.device:
    """Where models run: the first CUDA GPU when torch sees one, else the CPU. One place decides it, so a model
    and the tensors fed to it never land on different devices."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
