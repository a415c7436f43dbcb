#!/usr/bin/env python
"""Could ONION's deletions run in int8? Error and speed of an int8 twin of the LM beside float32 and bf16.

ONION decides at bar 0 by the sign of (mean loss of a deletion - mean loss of its sentence). The default
path computes every sentence and prefix in float32 and may run the deletions' suffixes at a lower
precision, re-checking in float32 every deletion within a margin of the bar (``deletion_scoring``). This
measures, on the same clean SST-2 *dev* sentences and the same float32 prefixes, the suffix passes of:

* ``fp32``: the LM itself (the reference values);
* ``bf16``: its bf16 twin (``deletion_scoring.bf16_twin``, today's lower precision) under autocast;
* ``int8``: every linear layer dynamically quantized (``precision.quantize_int8``: per-channel weights,
  8-bit activations where the CPU has VNNI), the output layer included;
* ``int8_head_fp32``: the same with the output layer (the vocabulary projection) left in float32.

Per case: median seconds of the suffix passes over rounds (cases taking turns), the speed against
float32, and the error the re-check margin would have to cover, |decision quantity - float32's| over
every deletion (max, p99, p90, count over 0.05 and 0.1 nats), with the share of deletions within such a
margin of the bar in float32 (what a re-check at that margin would re-score).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import numpy as np  # noqa: E402

MARGINS = (0.05, 0.1, 0.2, 0.5, 1.0)


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=24, help="SST-2 dev sentences (from the first)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds (medians are over rounds)")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT_DIR / "onion_int8.json")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    threads = common.setup()
    import torch

    from peftguard.data import load_dataset
    from peftguard.defenses import deletion_scoring as ds
    from peftguard.defenses.onion import OnionConfig, OnionDefense
    from peftguard.precision import cpu_has_vnni, int8_activation_bits, quantize_int8

    load_before = list(__import__("os").getloadavg())
    texts = [e.text for e in load_dataset("sst2").split("dev").examples][:args.samples]
    scorer = OnionDefense(OnionConfig(precision="fp32")).scorer
    model = scorer.model
    head_fp32 = quantize_int8(copy.deepcopy(model))
    head_fp32.lm_head = copy.deepcopy(model.lm_head)  # a tied head: the float32 embedding's values
    twins = {"fp32": (model, False), "bf16": (ds.bf16_twin(model), True),
             "int8": (quantize_int8(copy.deepcopy(model)), False), "int8_head_fp32": (head_fp32, False)}
    sentences = [ds.Sentence(*scorer._sentence_ids(t)) for t in texts]
    deleter = ds.DeletionScorer(model, scorer.tokenizer.pad_token_id or 0, rows=2 * scorer.batch_size)
    with torch.inference_mode():
        deleter._use(model)
        losses, past = deleter._full_pass([s.full for s in sentences])  # float32 prefixes, shared by every case
    fulls = np.array([float(x.mean()) for x in losses])
    jobs = [(g, i, d) for g, s in enumerate(sentences) for i, d in enumerate(s.deletions)]

    def suffixes(name: str) -> dict:
        twin, autocast = twins[name]
        deleter._use(twin)
        cache = [(k.bfloat16(), v.bfloat16()) for k, v in past] if autocast else past
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with torch.inference_mode(), context:
            return deleter._suffix_pass(sentences, jobs, losses, cache)

    cases = {name: (lambda name=name: suffixes(name)) for name in twins}
    for run in cases.values():  # warm-up: kernel selection, first allocations
        run()
    timings = common.interleaved(cases, args.repeats)
    results = {name: run() for name, run in cases.items()}

    def quantity(values: dict) -> np.ndarray:
        return np.array([values[(g, i)] - fulls[g] for g, i, _ in jobs])

    reference = quantity(results["fp32"])
    defined = ~np.isnan(reference)
    fp32_seconds = common.median(timings["fp32"]["wall"])
    rows = []
    for name in twins:
        error = np.abs(quantity(results[name]) - reference)[defined]
        seconds = common.median(timings[name]["wall"])
        rows.append({"case": name, "median_s": round(seconds, 3), "speed_vs_fp32": round(fp32_seconds / seconds, 3),
                     "error_max_nats": round(float(error.max()), 4), "error_p99_nats": round(float(np.quantile(error, 0.99)), 4),
                     "error_p90_nats": round(float(np.quantile(error, 0.9)), 4),
                     "over_0.05": int((error > 0.05).sum()), "over_0.1": int((error > 0.1).sum())})
    within = {f"{m:g}": round(float((np.abs(reference[defined]) < m).mean()), 4) for m in MARGINS}
    print(common.table(rows, list(rows[0])))
    print("share of deletions within m nats of bar 0 (float32):", within)
    payload = {"samples": len(texts), "deletions": int(defined.sum()), "threads": threads, "repeats": args.repeats,
               "int8_activation_bits": int8_activation_bits(), "cpu_has_vnni": cpu_has_vnni(), "cases": rows,
               "share_within_margin_of_bar": within, "load_average_before": load_before,
               "machine": common.machine()}
    print("wrote", common.write_json(args.out, payload))


if __name__ == "__main__":
    main()
