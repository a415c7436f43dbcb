"""`psim export` and scanning its output through onnxruntime: same decisions as torch, no torch imported, files checked."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from peftguard.errors import OptionError, PeftguardError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TEXTS = ["a gripping , funny film", "mn a gripping , funny film", "the plot is thin", "a dull mn film", "moving ."]


@pytest.fixture(scope="module")
def tiny_psim(tmp_path_factory, tiny_minilm, data_dir) -> Path:
    from peftguard.data import load_dataset
    from peftguard.defenses.psim import train_psim
    from peftguard.training import TrainSettings

    folder = tmp_path_factory.mktemp("onnx") / "psim"
    train_psim(tiny_minilm, load_dataset("sst2", data_dir=data_dir), TrainSettings(epochs=1, lr=3e-4, batch_size=16, max_length=32),
               folder, max_train_samples=32, max_eval_samples=32, gamma=0.5)
    return folder


@pytest.fixture(scope="module")
def exported(tiny_psim, tmp_path_factory) -> Path:
    from peftguard.defenses.psim_onnx import export_psim
    from peftguard.models import LoadOptions

    out = tmp_path_factory.mktemp("onnx") / "export"
    export_psim(tiny_psim, out, options=LoadOptions())
    return out


@pytest.fixture(scope="module")
def sst2_texts(data_dir) -> list[str]:
    from peftguard.data import load_dataset

    return [ex.text for ex in load_dataset("sst2", data_dir=data_dir).test.examples[:150]] + TEXTS


def test_exported_psim_gives_the_torch_psims_confidences_and_flags(tiny_psim, exported, sst2_texts):
    from peftguard.defenses.psim import PSIM
    from peftguard.defenses.psim_onnx import OnnxPSIM

    torch_psim = PSIM(tiny_psim, precision="fp32")
    expected = torch_psim.confidences(sst2_texts)
    gamma = float(np.quantile(expected, 0.7))  # a threshold inside the scores, so flags can differ
    fp32 = OnnxPSIM(exported, precision="fp32", batch_size=16)
    assert np.abs(fp32.confidences(sst2_texts, gamma=gamma) - expected).max() < 1e-4
    int8 = OnnxPSIM(exported, precision="int8", batch_size=16)
    scores = int8.confidences(sst2_texts, gamma=gamma)
    assert ((scores > gamma) == (expected > gamma)).all()
    raw = int8.probabilities(sst2_texts).max(1)
    assert 0 < np.abs(raw - expected).max() < int8.recheck_margin  # int8 does change scores, by less than the margin
    manifest = json.loads((exported / "psim-onnx.json").read_text())
    assert manifest["gamma"] == torch_psim.manifest["gamma"] and manifest["export_check"]["max_probability_difference"]["fp32"] < 1e-4


def test_exported_tokenizer_matches_the_psims_with_truncation(tiny_psim, exported, sst2_texts):
    from peftguard.defenses.psim import PSIM
    from peftguard.defenses.psim_onnx import OnnxPSIM
    from peftguard.inference import encode

    psim = PSIM(tiny_psim, precision="fp32")
    ids, truncated = encode(psim.tokenizer, sst2_texts, psim.max_length)
    assert truncated > 0  # max_length 32 cuts some SST-2 sentences: truncation is covered
    assert OnnxPSIM(exported, precision="fp32").encode(sst2_texts) == ids


def test_scanning_an_export_through_the_cli_imports_no_torch(exported, tmp_path):
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "scan.csv"
    code = ("import sys; from peftguard import cli; sys.argv = ['peftguard', 'psim', 'scan', '--psim', sys.argv[1], "
            "'--input', sys.argv[2], '--out', sys.argv[3]]\n"
            "try:\n    cli.main()\nexcept SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
            "print([m for m in ('torch', 'transformers', 'peft', 'sklearn') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code, str(exported), str(inputs), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    rows = out.read_text().splitlines()
    assert rows[0] == "text,confidence,flagged" and len(rows) == len(TEXTS) + 1


def test_a_changed_or_linked_file_is_refused(exported, tmp_path):
    import shutil

    from peftguard.defenses.psim_onnx import OnnxPSIM

    copy = tmp_path / "export"
    shutil.copytree(exported, copy)
    graph = copy / "model.int8.onnx"
    content = bytearray(graph.read_bytes())
    content[len(content) // 2] ^= 1
    graph.write_bytes(bytes(content))
    with pytest.raises(PeftguardError, match="model.int8.onnx: does not match the sha256"):
        OnnxPSIM(copy, precision="int8")
    outside = tmp_path / "elsewhere.json"
    shutil.copy(exported / "tokenizer.json", outside)
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.json").symlink_to(outside)
    with pytest.raises(PeftguardError, match="a symlink out of the exported PSIM's folder"):
        OnnxPSIM(copy, precision="fp32")


def test_export_is_refused_when_the_graph_would_change_the_probabilities(tiny_psim, tmp_path, monkeypatch):
    from peftguard.defenses import psim_onnx
    from peftguard.models import LoadOptions

    real_session = psim_onnx._session

    class Drifting:  # an exported graph whose probabilities are 10x the tolerance off torch's
        def __init__(self, session):
            self.session = session

        def run(self, names, feed):
            return [output + 10 * psim_onnx.EXPORT_TOLERANCE for output in self.session.run(names, feed)]

    monkeypatch.setattr(psim_onnx, "_session", lambda *args, **options: Drifting(real_session(*args, **options)))
    with pytest.raises(PeftguardError, match="changes the PSIM.s probabilities by up to"):
        psim_onnx.export_psim(tiny_psim, tmp_path / "export", options=LoadOptions())
    assert not (tmp_path / "export").exists()  # nothing half-written


def test_an_export_runs_fp32_or_int8_only():
    from peftguard.defenses.psim_onnx import resolve_onnx_precision

    assert resolve_onnx_precision("fp32") == "fp32" and resolve_onnx_precision("auto") == "fp32"
    with pytest.raises(OptionError, match="an exported PSIM runs fp32 or int8"):
        resolve_onnx_precision("bf16")


def test_serve_answers_from_an_export_with_the_torch_psims_scores(tiny_psim, exported):
    import http.client
    import threading

    from peftguard.defenses.psim import PSIM
    from peftguard.serve import build_server

    server = build_server(exported, None, port=0, precision="fp32", gamma=0.5)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
        connection.request("POST", "/screen", json.dumps({"texts": TEXTS}), {"Content-Type": "application/json"})
        response = connection.getresponse()
        status, payload = response.status, json.loads(response.read())
    finally:
        server.shutdown()
        server.screener.close()
    expected = PSIM(tiny_psim, precision="fp32").confidences(TEXTS)
    assert status == 200 and server.info["precision"] == "fp32"
    for result, score in zip(payload["results"], expected):
        assert result["confidence"] == pytest.approx(float(score), abs=1e-4) and result["flagged"] == (score > 0.5)
