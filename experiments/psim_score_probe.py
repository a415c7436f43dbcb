#!/usr/bin/env python
"""Which score of a PSIM's softmax output to threshold: the top probability (the paper's) or another.

A development probe for four-class datasets, where the default PSIM keeps the backdoor's label on triggered inputs
but not their confidence (REPRODUCTION.md, AG News: 98.6% of triggered inputs still predicted as the target while
their top probability falls into the clean tail). It reads a grid run's calibrated PSIM evaluations, scores the same
clean dev, clean test and triggered test inputs with the PSIM's whole probability vectors, and for each candidate
score calibrates gamma on the clean dev inputs alone (at the run's target FPR), then reports test FPR, detection,
defended ASR and CA (with the victim's own predictions) and AUROC. The candidates were fixed before any was measured:

- ``top``: the largest probability with one gamma (the paper's);
- ``margin``: the largest minus the second largest probability;
- ``log_ratio``: log of the largest over the second largest (the logit margin, blind to a common temperature);
- ``neg_entropy``: minus the entropy of the probability vector;
- ``class_top``: the top probability, with gamma calibrated separately on the clean dev inputs of each predicted
  label (``label_gammas``; AUROC on ``gated``). Session 23 chose it from a first version of this probe that gave a
  label with fewer than 1 / target FPR such inputs the pooled gamma (dev FPR 3.4% on seed 3) and scored at bf16,
  made it PSIM's default for three labels or more (commit c5eb562: every label calibrated, as here), and reverted
  it after its validation cells (REPRODUCTION.md, "PSIM's gamma per label on four classes"). This probe scores at
  fp32, as evaluations do.

On two labels the first four order inputs alike, so only ``class_top`` could change a two-class cell.
``run_defended_asr`` and ``run_fpr`` are the run's own evaluation, by the code that made it: ``top`` (one gamma),
except for runs evaluated while ``class_top`` was the four-class default (commits c5eb562 to the revert); the
matching row equals them.
Usage: python experiments/psim_score_probe.py --out results/psim_score_dev RUN_DIR...
"""
from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = ("run", "dataset", "attack", "seed", "score", "target_fpr", "dev_fpr", "fpr", "detection", "defended_asr",
           "asr", "defended_ca", "ca", "auroc",
           "run_defended_asr", "run_fpr")


def _top_two(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    second, first = np.sort(p, axis=1)[:, -2:].T
    return first, second


SCORES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "top": lambda p: p.max(1),
    "margin": lambda p: np.subtract(*_top_two(p)),
    "log_ratio": lambda p: np.subtract(*np.log(np.stack(_top_two(p)) + 1e-12)),
    "neg_entropy": lambda p: (p * np.log(p + 1e-12)).sum(1),
}


def label_gammas(dev: np.ndarray, target_fpr: float) -> list[float]:
    """One gamma per predicted label, each flagging at most ``target_fpr`` of the clean dev inputs given that label
    (the pooled gamma for a label given none of them)."""
    from peftguard.metrics import calibrate_gamma

    top, labels = dev.max(1), dev.argmax(1)
    pooled = calibrate_gamma(top, target_fpr)
    return [calibrate_gamma(top[labels == k], target_fpr) if (labels == k).any() else pooled
            for k in range(dev.shape[1])]


def gated(probabilities: np.ndarray, gamma: float, gammas: list[float]) -> np.ndarray:
    """The top probability shifted so that it exceeds ``gamma`` exactly when it exceeds its predicted label's gamma."""
    return probabilities.max(1).astype(np.float64) - np.asarray(gammas)[probabilities.argmax(1)] + gamma


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def calibrated_cells(run_dir: Path, victim: str) -> list[tuple[dict[str, Any], str, str]]:
    """(cell, evaluate stage, psim stage) of each PSIM evaluation at a calibrated target FPR."""
    plan = read(run_dir / "cells.json")
    found = []
    for cell in plan["cells"]:
        if cell["defense"] != "psim" or cell["row"] != "defense" or cell["method"] != victim:
            continue
        settings = read(run_dir / "stages" / cell["stage"] / "stage.json")["settings"]
        if settings["evaluate"]["gamma"] is not None:
            continue
        psim_stage = next(d for d in plan["stages"][cell["stage"]]["deps"] if d.startswith("psim-"))
        found.append((cell, cell["stage"], psim_stage))
    return found


def scorer(score: str, dev: np.ndarray, target_fpr: float) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    """A score of probability vectors and its gamma, calibrated on the clean dev vectors only."""
    from peftguard.metrics import calibrate_gamma

    if score != "class_top":
        return SCORES[score], calibrate_gamma(SCORES[score](dev), target_fpr)
    pooled, gammas = calibrate_gamma(dev.max(1), target_fpr), label_gammas(dev, target_fpr)
    return (lambda p: gated(p, pooled, gammas)), pooled


def probe(run_dir: Path, cell: dict[str, Any], stage: str, psim_stage: str) -> list[dict[str, Any]]:
    from peftguard import metrics
    from peftguard.data import subsample
    from peftguard.defenses.psim import MEASUREMENT_PRECISION, PSIM
    from peftguard.evaluation import _triggered_sets
    from peftguard.inference import predict_proba
    from peftguard.pipeline import load_model
    from peftguard.stages import _dataset, _ref, _triggers

    s = read(run_dir / "stages" / stage / "stage.json")["settings"]
    dataset = _dataset(s["dataset"], s["data"]["data_dir"])
    test = subsample(dataset.test.examples, s["data"]["max_eval_samples"], s["seed"])
    dev = subsample(dataset.dev.examples, s["data"]["max_eval_samples"], s["seed"])
    triggered, _ = _triggered_sets(test, _triggers(s["attacks"], dataset), s["target_label"], s["seed"])
    # fp32, as evaluations measure: bf16 moves the flags of inputs near gamma (seed 0: 84.76 left, 87.17 at fp32)
    psim = PSIM(run_dir / "stages" / psim_stage / "artifact", precision=MEASUREMENT_PRECISION)
    probs = {name: psim._probabilities(psim.model, [ex.text for ex in part], psim.precision)
             for name, part in (("dev", dev), ("clean", test), ("triggered", triggered))}
    model, tokenizer, _ = load_model(_ref(run_dir, s["victim"]), dataset.num_labels)
    e = s["evaluate"]
    victim = {name: predict_proba(model, tokenizer, [ex.text for ex in part], e["batch_size"],
                                  e["max_length"]).argmax(1)
              for name, part in (("clean", test), ("triggered", triggered))}
    labels = np.array([ex.label for ex in test])
    target_fpr = e["target_fpr"]
    rows = []
    for score in (*SCORES, "class_top"):
        value, gamma = scorer(score, probs["dev"], target_fpr)
        flags = {name: value(p) > gamma for name, p in probs.items()}
        rows.append({
            "run": run_dir.name, "dataset": s["dataset"], "attack": "+".join(s["attacks"]), "seed": s["seed"],
            "score": score, "target_fpr": target_fpr, "dev_fpr": round(100 * float(flags["dev"].mean()), 2),
            "fpr": round(100 * float(flags["clean"].mean()), 2),
            "detection": round(100 * float(flags["triggered"].mean()), 2),
            "defended_asr": round(100 * metrics.defended_attack_success_rate(victim["triggered"], s["target_label"],
                                                                               flags["triggered"]), 2),
            "asr": round(100 * metrics.attack_success_rate(victim["triggered"], s["target_label"]), 2),
            "defended_ca": round(100 * metrics.defended_clean_accuracy(victim["clean"], labels, flags["clean"]), 2),
            "ca": round(100 * metrics.clean_accuracy(victim["clean"], labels), 2),
            "auroc": round(metrics.auroc(value(probs["clean"]), value(probs["triggered"])), 3),
        })
    run_metrics = read(run_dir / "stages" / stage / "metrics.json")
    for row in rows:
        row["run_defended_asr"] = round(100 * run_metrics["defended_attack_success_rate"], 2)
        row["run_fpr"] = round(100 * run_metrics["false_positive_rate"], 2)
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="grid runs with calibrated PSIM evaluations")
    parser.add_argument("--out", type=Path, required=True, help="folder for cells.csv and table.md")
    parser.add_argument("--victim", default="lora", help="the victim method whose evaluations are read")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    from peftguard.runtime import configure_threads

    configure_threads()  # $PEFTGUARD_THREADS, as the CLI does
    cells = [(run, found) for run in args.runs for found in calibrated_cells(run, args.victim)]
    write(args.out, [row for run, found in cells for row in probe(run, *found)])


def write(out: Path, rows: list[dict[str, Any]]) -> None:
    """``cells.csv``, ``table.md`` and one JSON per cell (its rows, one per score) under ``cells/``."""
    (out / "cells").mkdir(parents=True, exist_ok=True)
    for key in dict.fromkeys((r["run"], r["dataset"], r["attack"], r["seed"]) for r in rows):
        name = "{}-{}-{}-seed{}.json".format(*key)
        cell = [r for r in rows if (r["run"], r["dataset"], r["attack"], r["seed"]) == key]
        (out / "cells" / name).write_text(json.dumps(cell, indent=2) + "\n", encoding="utf-8")
    with (out / "cells.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
