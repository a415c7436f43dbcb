"""experiments/zoo_provenance_check.py: a rebuilt zoo model is compared byte for byte with a recorded audit's files."""
from __future__ import annotations

from conftest import load_experiment

from peftguard.audit.sources import sha256_file


def recorded(*entries: tuple[str, str, str], base: str) -> dict:
    return {"base": base, "files": [{"role": role, "file": name, "format": "safetensors", "sha256": digest}
                                    for role, name, digest in entries]}


def test_same_bytes_pass_and_one_changed_byte_fails(tmp_path):
    script = load_experiment("zoo_provenance_check")
    victim, poisoned = tmp_path / "m" / "victim", tmp_path / "m" / "poisoned"
    victim.mkdir(parents=True)
    poisoned.mkdir()
    (victim / "adapter_model.safetensors").write_bytes(b"adapter")
    (poisoned / "model.safetensors").write_bytes(b"weights")
    provenance = recorded(("suspect", "adapter_model.safetensors", sha256_file(victim / "adapter_model.safetensors")),
                          ("base", "model.safetensors", sha256_file(poisoned / "model.safetensors")),
                          base="/elsewhere/runs/zoo/m/poisoned")
    assert script.check(victim, provenance)["same"] is True
    (poisoned / "model.safetensors").write_bytes(b"weightz")
    result = script.check(victim, provenance)
    assert result["same"] is False and [f["same"] for f in result["files"]] == [True, False]


def test_a_packaged_base_is_not_compared(tmp_path):
    script = load_experiment("zoo_provenance_check")
    adapter = tmp_path / "victim" / "adapter_model.safetensors"
    adapter.parent.mkdir()
    adapter.write_bytes(b"adapter")
    provenance = recorded(("suspect", adapter.name, sha256_file(adapter)), ("base", "model.safetensors", "0" * 64),
                          base="minilm")
    result = script.check(tmp_path / "victim", provenance)
    assert result["same"] is True and [f["role"] for f in result["files"]] == ["suspect"]
