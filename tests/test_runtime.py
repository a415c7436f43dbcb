"""Thread settings: one place decides them (peftguard.runtime)."""
from __future__ import annotations

import os

import pytest

from peftguard.errors import OptionError
from peftguard.runtime import THREADS_ENV, available_cores, configure_threads, thread_count


def test_peftguard_threads_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(THREADS_ENV, "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert thread_count() == 3


def test_omp_num_threads_then_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert thread_count() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert thread_count() == available_cores() >= 1


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_thread_count_is_an_option_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(THREADS_ENV, value)
    with pytest.raises(OptionError, match=THREADS_ENV):
        thread_count()


def test_configure_sets_torch_and_keeps_a_given_wait_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv(THREADS_ENV, "1")
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    try:
        assert configure_threads() == 1
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    finally:
        torch.set_num_threads(before)


def test_compute_device_is_the_gpu_when_torch_sees_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from peftguard.runtime import compute_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compute_device() == torch.device("cuda")
