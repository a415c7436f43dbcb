"""Process-wide runtime settings: how many CPU threads torch uses.

One place decides it: ``PEFTGUARD_THREADS`` if set, else the cores this process may run on
(``os.sched_getaffinity``, which respects taskset and container CPU sets, unlike ``os.cpu_count``).
More threads than cores only adds contention (OpenMP threads spin-wait for each other).
"""
from __future__ import annotations

import logging
import os

from peftguard.errors import OptionError

log = logging.getLogger(__name__)

THREADS_ENV = "PEFTGUARD_THREADS"


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def thread_count() -> int:
    """``$PEFTGUARD_THREADS`` if set, else the cores available to this process."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return available_cores()
    if not value.isdigit() or int(value) < 1:
        raise OptionError(f"{THREADS_ENV} must be a positive integer, got {value!r}")
    return int(value)


def configure_threads() -> int:
    """Set torch's intra-op threads from :func:`thread_count`; returns the count."""
    import torch

    threads = thread_count()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        log.info("torch uses %d CPU threads", threads)
    return threads
