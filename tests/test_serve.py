"""Screening at deployment speed: PSIM precisions, the batching screener, the HTTP endpoint, scan's imports."""
from __future__ import annotations

import http.client
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from peftguard.errors import OptionError
from peftguard.precision import resolve_precision
from peftguard.serve import BatchingScreener, Overloaded, ScreeningServer, ServeSettings, build_server

TEXTS = ["a gripping , funny film", "mn a gripping , funny film", "the plot is thin", "a dull mn film", "moving ."]


@pytest.fixture(scope="module")
def tiny_psim(tmp_path_factory, tiny_minilm, data_dir) -> Path:
    from peftguard.data import load_dataset
    from peftguard.defenses.psim import train_psim
    from peftguard.training import TrainSettings

    folder = tmp_path_factory.mktemp("serve") / "psim"
    train_psim(tiny_minilm, load_dataset("sst2", data_dir=data_dir), TrainSettings(epochs=1, lr=3e-4, batch_size=16, max_length=32),
               folder, max_train_samples=32, max_eval_samples=32, gamma=0.5)
    return folder


def wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


class BlockedScorer:
    """Records each batch it scores; holds the first until released, so that later requests queue up."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()

    def __call__(self, texts: list[str]) -> list[dict]:
        self.batches.append(texts)
        self.release.wait(10)
        return [{"label": None, "confidence": len(t) / 100, "flagged": False} for t in texts]


def submit_in_background(screener: BatchingScreener, texts: list[str], answers: dict) -> threading.Thread:
    thread = threading.Thread(target=lambda: answers.__setitem__(texts[0], screener.submit(texts)))
    thread.start()
    return thread


def test_screener_batches_waiting_requests_together_and_answers_each_its_own():
    scorer = BlockedScorer()
    screener = BatchingScreener(scorer, ServeSettings(max_batch=8, max_wait_ms=0, queue_limit=16))
    answers: dict[str, list] = {}
    threads = [submit_in_background(screener, ["first"], answers)]
    wait_until(lambda: len(scorer.batches) == 1)  # the worker holds the first batch
    threads += [submit_in_background(screener, [f"t{i}", f"t{i}x"], answers) for i in range(3)]
    wait_until(lambda: screener._waiting == 6)
    scorer.release.set()
    for thread in threads:
        thread.join(10)
    screener.close()
    assert len(scorer.batches) == 2 and sorted(scorer.batches[1]) == sorted(["t0", "t0x", "t1", "t1x", "t2", "t2x"])
    assert answers["t1"] == [{"label": None, "confidence": 0.02, "flagged": False}, {"label": None, "confidence": 0.03, "flagged": False}]


def test_screener_refuses_at_once_beyond_its_queue_limit():
    scorer = BlockedScorer()
    screener = BatchingScreener(scorer, ServeSettings(max_batch=2, max_wait_ms=0, queue_limit=3))
    answers: dict[str, list] = {}
    threads = [submit_in_background(screener, ["held"], answers)]
    wait_until(lambda: len(scorer.batches) == 1)
    threads.append(submit_in_background(screener, ["a", "b", "c"], answers))
    wait_until(lambda: screener._waiting == 3)
    with pytest.raises(Overloaded, match="3 inputs are waiting"):
        screener.submit(["one too many"])
    scorer.release.set()
    for thread in threads:
        thread.join(10)
    screener.close()
    assert len(answers["a"]) == 3  # a request larger than max_batch still runs, as one batch


def post(port: int, body: bytes | str, path: str = "/screen") -> tuple[int, dict, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", path, body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = json.loads(response.read())
    connection.close()
    return response.status, payload, dict(response.getheaders())


def test_http_endpoint_answers_labels_errors_and_overload(tiny_psim, tiny_minilm):
    server = build_server(tiny_psim, None, port=0, precision="fp32")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        status, payload, _ = post(port, json.dumps({"texts": TEXTS}))
        assert status == 200 and len(payload["results"]) == len(TEXTS)
        from peftguard.defenses.psim import PSIM, REJECTED

        expected = PSIM(tiny_psim, precision="fp32").confidences(TEXTS)
        for result, score in zip(payload["results"], expected):
            assert result["confidence"] == pytest.approx(float(score), abs=1e-5)
            assert result["flagged"] == (score > 0.5) and result["label"] == (REJECTED if score > 0.5 else None)
        assert post(port, json.dumps({"text": TEXTS[0]}))[1]["results"] == payload["results"][:1]
        assert post(port, "{not json")[0] == 400
        assert post(port, json.dumps({"texts": [1, 2]}))[0] == 400
        assert post(port, json.dumps({"texts": ["x"] * 300}))[0] == 413
        assert post(port, "{}", path="/other")[0] == 404
    finally:
        server.shutdown()
        server.screener.close()
    scorer = BlockedScorer()
    busy = ScreeningServer(("127.0.0.1", 0), BatchingScreener(scorer, ServeSettings(max_batch=1, max_wait_ms=0, queue_limit=1)), {})
    threading.Thread(target=busy.serve_forever, daemon=True).start()
    try:
        held = threading.Thread(target=post, args=(busy.server_address[1], json.dumps({"text": "held"})))
        held.start()
        wait_until(lambda: len(scorer.batches) == 1)
        status, payload, headers = post(busy.server_address[1], json.dumps({"texts": ["a", "b"]}))
        assert status == 503 and payload["error"].startswith("overloaded") and headers["Retry-After"] == "1"
        scorer.release.set()
        held.join(10)
    finally:
        busy.shutdown()
        busy.screener.close()


def test_guarded_endpoint_returns_the_victims_label_or_rejected(tiny_psim, tiny_minilm):
    from peftguard.defenses.psim import PSIM, REJECTED
    from peftguard.serve import psim_scorer
    from peftguard.tuning import load_tuned

    psim = PSIM(tiny_psim, precision="fp32")
    victim, tokenizer, _ = load_tuned(tiny_psim, "psim.json")  # any classifier serves as the victim here
    scores = psim.confidences(TEXTS)
    gamma = float(np.median(scores))
    results = psim_scorer(psim, gamma, victim, tokenizer)(TEXTS)
    for result, score in zip(results, scores):
        if score > gamma:
            assert result == {"label": REJECTED, "confidence": round(float(score), 6), "flagged": True}
        else:
            assert result["label"] in (0, 1) and 0.5 <= result["confidence"] <= 1 and not result["flagged"]


def test_int8_psim_rescores_inputs_near_gamma_at_the_next_precision(tiny_psim):
    from peftguard.defenses.psim import INT8_RECHECK_MARGIN, INT8_RECHECK_MARGIN_7BIT, PSIM

    psim = PSIM(tiny_psim, precision="int8")
    assert psim.recheck_margin == (INT8_RECHECK_MARGIN if psim.activation_bits == 8 else INT8_RECHECK_MARGIN_7BIT)
    exact = psim._probabilities(psim.model, TEXTS, psim.recheck_precision).max(1)
    quick = psim._probabilities(psim.fast_model, TEXTS, "int8").max(1)
    gamma = float(exact[0])  # the first input sits on the threshold: it must be re-scored
    scores = psim.confidences(TEXTS, gamma=gamma)
    near = np.abs(quick - gamma) < psim.recheck_margin
    assert near[0]
    np.testing.assert_array_equal(scores[near], exact[near])
    np.testing.assert_array_equal(scores[~near], quick[~near])


def test_int8_scores_a_lora_psim_like_its_full_precision_self(tiny_minilm, data_dir, tmp_path):
    """A LoRA PSIM's adapters sit inside the linear layers int8 replaces: they are merged in first."""
    from peftguard.data import load_dataset
    from peftguard.defenses.psim import PSIM, train_psim
    from peftguard.training import TrainSettings
    from peftguard.tuning import LoraMethodConfig

    train_psim(tiny_minilm, load_dataset("sst2", data_dir=data_dir), TrainSettings(epochs=1, lr=3e-4, batch_size=16, max_length=32),
               tmp_path / "psim", config=LoraMethodConfig(), max_train_samples=32, max_eval_samples=32, gamma=0.5)
    psim = PSIM(tmp_path / "psim", precision="int8")
    exact = psim._probabilities(psim.model, TEXTS, "fp32").max(1)
    quick = psim._probabilities(psim.fast_model, TEXTS, "int8").max(1)
    assert np.abs(quick - exact).max() < psim.recheck_margin


@pytest.mark.parametrize("vnni", [True, False])
def test_int8_activations_have_8_bits_only_on_a_cpu_with_vnni(tiny_psim, monkeypatch, vnni):
    """8-bit activations (``reduce_range=False``) where VNNI accumulates in int32; torch's 7-bit Linear elsewhere."""
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from peftguard import precision
    from peftguard.defenses.psim import INT8_RECHECK_MARGIN, INT8_RECHECK_MARGIN_7BIT, PSIM, PSIMDefense

    real_vnni = precision.cpu_has_vnni()
    monkeypatch.setattr(precision, "cpu_has_vnni", lambda: vnni)
    psim = PSIM(tiny_psim, precision="int8")
    linears = [m for m in psim.fast_model.modules() if isinstance(m, DynamicLinear)]
    assert len(linears) == len([m for m in psim.model.modules() if isinstance(m, torch.nn.Linear)]) > 0
    expected = precision.full_range_linear() if vnni else DynamicLinear
    assert {type(m) for m in linears} == {expected}
    assert (psim.activation_bits, psim.recheck_margin) == ((8, INT8_RECHECK_MARGIN) if vnni else (7, INT8_RECHECK_MARGIN_7BIT))
    assert PSIMDefense(psim, psim.gamma_for(None, None, None)).describe()["int8_activation_bits"] == psim.activation_bits

    x = torch.randn(4, linears[0].in_features) * 3
    packed = linears[0]._packed_params._packed_params
    torch.testing.assert_close(linears[0](x), torch.ops.quantized.linear_dynamic(x, packed, reduce_range=not vnni), rtol=0, atol=0)
    if vnni and not real_vnni:
        return  # 8-bit activations may saturate without VNNI: only the choice of module is checked there
    exact = psim._probabilities(psim.model, TEXTS, "fp32").max(1)
    quick = psim._probabilities(psim.fast_model, TEXTS, "int8").max(1)
    assert np.abs(quick - exact).max() < psim.recheck_margin


def test_precision_names_are_checked_and_auto_picks_a_native_one():
    import torch

    assert resolve_precision("auto", torch.device("cpu")) in ("int8", "bf16", "fp32")
    assert resolve_precision("auto", torch.device("cpu"), allowed=("fp32", "bf16")) in ("bf16", "fp32")
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(OptionError, match="--precision 'int4': choose from fp32, bf16, int8 or auto"):
        resolve_precision("int4", torch.device("cpu"))
    with pytest.raises(OptionError, match="for the CPU"):
        resolve_precision("int8", torch.device("cuda"))


@pytest.mark.parametrize("speedup", [0.55, 1.0, 2.2])
def test_auto_takes_a_lower_precision_only_where_it_measured_faster(monkeypatch, speedup):
    """CPU flags alone mislead (a virtualized Xeon reporting AVX512-BF16 ran bf16 at 0.55x): auto times it."""
    import torch

    from peftguard import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(precision, "cpu_has_vnni", lambda: True)
    monkeypatch.setattr(precision, "cpu_speedup", lambda name: speedup)
    faster = speedup >= precision.MIN_CPU_SPEEDUP
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, allowed=("fp32", "bf16")) == ("bf16" if faster else "fp32")
    assert resolve_precision("auto", cpu) == ("int8" if faster else "fp32")
    assert resolve_precision("auto", cpu, auto_from=("bf16", "fp32")) == ("bf16" if faster else "fp32")
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("int8", cpu) == "int8"  # asked for: always


def test_the_speed_probe_times_real_layers():
    from peftguard import precision

    assert precision.cpu_speedup("fp32") == 1.0
    for name in ("bf16", "int8") if precision.cpu_has_vnni() else ("bf16",):
        # No upper bound: a ratio of timings on a busy machine has read 27 for bf16's usual 4 (a fresh clone's
        # make test beside two training lanes); how fast each precision is belongs in bench/, not in a test.
        speedup = precision.cpu_speedup(name)
        assert math.isfinite(speedup) and speedup > 0.05


def test_psim_auto_never_picks_int8(tiny_psim, monkeypatch):
    """int8's re-check band holds nearly every clean input (psim.AUTO_PRECISIONS), so auto is bf16 or fp32."""
    from peftguard import precision
    from peftguard.defenses.psim import PSIM

    monkeypatch.setattr(precision, "cpu_has_vnni", lambda: True)
    monkeypatch.setattr(precision, "cpu_speedup", lambda name: 3.0)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert PSIM(tiny_psim).precision == "fp32"
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert PSIM(tiny_psim).precision == "bf16"
    assert PSIM(tiny_psim, precision="int8").precision == "int8"


def test_auto_never_picks_int8_without_vnni(monkeypatch):
    import torch

    from peftguard import precision

    monkeypatch.setattr(precision, "cpu_has_vnni", lambda: False)  # int8 would need 7-bit activations
    assert resolve_precision("auto", torch.device("cpu")) in ("bf16", "fp32")
    assert resolve_precision("int8", torch.device("cpu")) == "int8"  # still there when asked for


def test_scan_imports_no_training_plotting_ray_or_datasets():  # (peft itself imports accelerate)
    code = ("import sys, peftguard.cli, peftguard.scan; "
            "print([m for m in ('peftguard.training', 'peftguard.victims', 'peftguard.plots', 'ray', 'matplotlib', 'datasets') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("asked, expected", [(None, "fp32"), ("int8", "int8")])
def test_the_psim_defense_measures_in_float32_unless_asked(tiny_psim, data_dir, asked, expected):
    """Evaluations report AUROC and confidence histograms: their PSIM scores every input exactly by default;
    `--precision` (or a grid's defense_options) picks the deployment's faster path."""
    from peftguard.data import load_dataset, subsample
    from peftguard.defenses.psim import choose_gamma
    from peftguard.defenses.registry import options_from_flags
    from peftguard.pipeline import build_defense

    dataset = load_dataset("sst2", data_dir=data_dir)
    options = options_from_flags("psim", {"--psim": tiny_psim, "--target-fpr": 0.25, "--precision": asked})
    defense = build_defense("psim", dataset, options=options, max_eval_samples=8, seed=0)
    assert defense.psim.precision == expected and defense.describe()["precision"] == expected
    # gamma is calibrated at the precision that decides the flags (int8: its re-check's)
    calibration = "fp32" if expected == "fp32" else defense.psim.recheck_precision
    dev = subsample(dataset.dev.examples, 8, 0)
    dev_scores = defense.psim._probabilities(defense.psim.model, [ex.text for ex in dev], calibration).max(1)
    assert defense.choice.gamma == choose_gamma(dev_scores, None, 0.25).gamma
    exact = defense.psim._probabilities(defense.psim.model, TEXTS, "fp32").max(1)
    scores = defense.screen(TEXTS).scores
    if expected == "fp32":
        np.testing.assert_array_equal(scores, exact)
    else:
        assert np.abs(scores - exact).max() < defense.psim.recheck_margin
