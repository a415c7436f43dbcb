"""Issue 19: the largest PSIM confidence change int8 makes against float32, with 7-bit (torch's default) and
8-bit (VNNI) activations, on clean dev sentences; it sets ``INT8_RECHECK_MARGIN`` (psim.py) and checks it.

Development PSIMs (the rule's input): the PSIM stages of the defense cells of runs/v2/psim_budget_dev and
runs/v2/psim_budget_dev_agnews. Rule, fixed before any validation PSIM was scored: margin = 2 x the largest
8-bit change over the development PSIMs, rounded up to 0.01. Validation PSIMs (scored after, never tuned on):
runs/zoo-audit/psim/*/psim. Each PSIM scores the first 1000 sentences (fewer where the split is smaller) of its
dataset's clean dev split, one thread.

    PYTHONPATH=src .venv/bin/python bench/int8_margin.py --runs /work/main/runs --out bench/int8_margin.json
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402

DEV_RUNS = ("v2/psim_budget_dev", "v2/psim_budget_dev_agnews")


def development_psims(runs: Path) -> list[Path]:
    out = []
    for run in DEV_RUNS:
        cells = json.loads((runs / run / "cells.json").read_text())["cells"]
        for cell in cells:
            if cell["row"] != "defense":
                continue
            stage = json.loads((runs / run / "stages" / cell["stage"] / "stage.json").read_text())
            out += [runs / run / "stages" / dep / "artifact" for dep in stage["deps"] if dep.startswith("psim-")]
    return out


def dev_texts(dataset: str, data: Path, samples: int) -> list[str]:
    with open(data / dataset / "dev.csv", newline="") as f:
        return [row["text"] for _, row in zip(range(samples), csv.DictReader(f))]


def changes(folder: Path, data: Path, samples: int) -> dict:
    from peftguard.defenses.psim import PSIM
    from peftguard.inference import predict_proba
    from peftguard.precision import quantize_int8

    psim = PSIM(folder, precision="fp32")
    texts = dev_texts(psim.manifest["dataset"], data, samples)
    gamma = float(psim.manifest["gamma"])

    def score(model):
        return predict_proba(model, psim.tokenizer, texts, psim.batch_size, psim.max_length, bf16=False).max(1)

    ref = score(psim.model)
    row = {"psim": str(folder), "dataset": psim.manifest["dataset"], "samples": len(texts), "gamma": gamma}
    for bits in (7, 8):
        diff = np.abs(score(quantize_int8(copy.deepcopy(psim.model), activation_bits=bits)) - ref)
        row[f"max_change_{bits}bit"] = float(diff.max())
        row[f"p99_change_{bits}bit"] = float(np.quantile(diff, 0.99))
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, default=Path("/work/main/runs"))
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("bench/int8_margin.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    from peftguard.precision import cpu_has_vnni

    if not cpu_has_vnni():
        sys.exit("8-bit activations are measured only on a CPU with VNNI")
    dev = [changes(f, args.data, args.samples) for f in development_psims(args.runs)]
    worst = max(r["max_change_8bit"] for r in dev)
    margin = math.ceil(round(2 * worst * 100, 9)) / 100  # rule fixed before validation: 2 x worst, up to 0.01
    print(f"rule: margin = ceil100(2 x {worst:.4f}) = {margin:.2f}", flush=True)
    validation = [changes(f, args.data, args.samples) for f in sorted(args.runs.glob("zoo-audit/psim/*/psim"))]
    record = {
        "rule": "margin = 2 x the largest 8-bit |int8 - fp32| confidence change over the development PSIMs, rounded up to 0.01",
        "threads": 1, "samples_per_psim": args.samples, "torch": torch.__version__,
        "development": dev, "dev_max_change_8bit": worst, "margin": margin,
        "validation": validation,
        "validation_max_change_8bit": max(r["max_change_8bit"] for r in validation),
        "validation_max_change_7bit": max(r["max_change_7bit"] for r in validation),
        "validation_exceeding_margin_8bit": [r["psim"] for r in validation if r["max_change_8bit"] >= margin],
        "load_average": os.getloadavg(),
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
