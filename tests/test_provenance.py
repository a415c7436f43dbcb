"""What manifests record about the machine: enough to tell whether two runs could agree bit for bit."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peftguard import precision, provenance

CPUINFO = """processor\t: 0
model name\t: Example CPU 9000
flags\t\t: fpu sse2 avx512_bf16 avx512_vnni

processor\t: 1
model name\t: Example CPU 9000
flags\t\t: fpu sse2 avx512_bf16 avx512_vnni
"""


@pytest.fixture()
def fake_cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    monkeypatch.setattr(provenance, "CPUINFO", path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return path


def test_cpu_description_names_model_instruction_set_and_threads(fake_cpuinfo: Path) -> None:
    described = provenance.device_description()
    assert described == (f"cpu ({torch.get_num_threads()} threads; Example CPU 9000; "
                         f"{torch.backends.cpu.get_cpu_capability()})")


def test_cpuinfo_fields_are_read_by_name(fake_cpuinfo: Path) -> None:
    assert provenance.cpuinfo_field("model name") == "Example CPU 9000"
    assert provenance.cpuinfo_field("no such field") is None
    assert precision._cpu_flags() == ["fpu", "sse2", "avx512_bf16", "avx512_vnni"]


def test_no_cpuinfo_still_describes_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provenance, "CPUINFO", tmp_path / "missing")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert provenance.cpuinfo_field("model name") is None
    assert precision._cpu_flags() == []
    assert provenance.device_description().startswith(f"cpu ({torch.get_num_threads()} threads; ")
