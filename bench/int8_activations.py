"""Issue 19: PSIM int8 with 8-bit activations (VNNI) and its re-check margin, against torch fp32 and PSIM int8 as
it was (torch's 7-bit activations, margin 0.1). One process, ONE thread, cases interleaved round-robin, medians;
only ratios measured in the same run mean anything on a shared machine. Inputs: the first 1000 SST-2 test
sentences, every other one with "bb" inserted (bench/onnx_probe.py on branch issue19-ort); PSIM: zoo-audit sst2-bb.

    PYTHONPATH=src .venv/bin/python bench/int8_activations.py --out bench/int8_activations.json
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402

PSIM_DIR = "/work/main/runs/zoo-audit/psim/sst2-bb/psim"
SST2_TEST = "/work/shared/data/sst2/test.csv"


def test_inputs(samples: int) -> list[str]:
    from peftguard.triggers import BadNetTrigger

    with open(SST2_TEST, newline="") as f:
        sentences = [row["text"] for _, row in zip(range(samples), csv.DictReader(f))]
    trigger = BadNetTrigger(words=("bb",))
    return [trigger.triggered(t, i) if i % 2 else t for i, t in enumerate(sentences)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--psim", default=PSIM_DIR)
    parser.add_argument("--out", type=Path, default=Path("bench/int8_activations.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    from peftguard.defenses import psim as psim_module
    from peftguard.defenses.psim import PSIM
    from peftguard.inference import encode, predict_proba
    from peftguard.precision import cpu_has_vnni

    if not cpu_has_vnni():
        raise SystemExit("the 8-bit case needs a CPU with VNNI")
    texts = test_inputs(args.samples)
    new = PSIM(args.psim, precision="int8")  # 8-bit activations here, INT8_RECHECK_MARGIN
    old = PSIM(args.psim, precision="int8")
    old.activation_bits, old.recheck_margin = 7, 0.1  # main before issue 19: torch's 7-bit Linear, margin 0.1
    old.fast_model = psim_module.quantize_int8(psim_module.copy.deepcopy(old.model), activation_bits=7)
    gamma, tok, bs, ml = float(new.manifest["gamma"]), new.tokenizer, new.batch_size, new.max_length
    encode(tok, texts, ml)
    rechecked: dict[str, int] = {}

    def psim_case(psim: PSIM, name: str):
        def run() -> np.ndarray:
            psim._memo = {}
            quick = psim._probabilities(psim.fast_model, texts, "int8").max(1) if name not in rechecked else None
            if quick is not None:  # counted once, outside the timed calls below
                rechecked[name] = int((np.abs(quick - gamma) < psim.recheck_margin).sum())
            t = time.perf_counter()
            scores = psim.confidences(texts)
            return scores, time.perf_counter() - t
        return run

    def fp32() -> tuple[np.ndarray, float]:
        t = time.perf_counter()
        scores = predict_proba(new.model, tok, texts, bs, ml, bf16=False).max(1)
        return scores, time.perf_counter() - t

    old_name = "PSIM int8 as on main (7-bit activations, margin 0.1)"
    new_name = f"PSIM int8 issue 19 (8-bit activations, margin {new.recheck_margin})"
    cases = {"torch fp32": fp32, old_name: psim_case(old, old_name), new_name: psim_case(new, new_name)}
    for fn in cases.values():
        fn()  # warm-up
    times = {n: [] for n in cases}
    scores = {}
    for _ in range(args.rounds):
        for n, fn in cases.items():
            scores[n], seconds = fn()
            times[n].append(seconds)
    ref = scores["torch fp32"]
    base, main_t = statistics.median(times["torch fp32"]), statistics.median(times[old_name])
    rows = []
    for n in cases:
        med = statistics.median(times[n])
        rows.append({"case": n, "median_s": round(med, 3), "speedup_vs_torch_fp32": round(base / med, 3),
                     "speedup_vs_psim_int8_main": round(main_t / med, 3),
                     "flags_equal_fp32": float(((scores[n] > gamma) == (ref > gamma)).mean()),
                     "max_conf_change_vs_fp32": float(np.abs(scores[n] - ref).max()),
                     "share_rechecked": rechecked[n] / len(texts) if n in rechecked else None,
                     "times_s": [round(t, 3) for t in times[n]]})
        print(rows[-1], flush=True)
    args.out.write_text(json.dumps({"psim": args.psim, "samples": len(texts), "gamma": gamma, "threads": 1,
                                    "rounds": args.rounds, "recheck_precision": new.recheck_precision,
                                    "torch": torch.__version__, "load_average": os.getloadavg(), "rows": rows},
                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
