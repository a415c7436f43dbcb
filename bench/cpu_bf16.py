#!/usr/bin/env python
"""bfloat16 on the CPU: ONION's language-model pass in float32 vs under ``torch.autocast(bfloat16)``.

CPUs with AMX or AVX512-BF16 (this machine's Xeon has both) run bf16 matrix multiplies much faster
than float32. Measures the packaged SmolLM2's forward on one batch of SST-2 test sentences (the
shape ONION scores) both ways, alternating, and how far the per-text perplexities move, which is
what ONION's suspicion scores are made of. Not used by the tool yet (perplexities change; see
BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32, help="sentences in the batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT_DIR / "cpu_bf16.json")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    threads = common.setup()
    import numpy as np
    import torch

    from peftguard.defenses.onion import CausalLMScorer

    scorer = CausalLMScorer("smollm2")
    ids = [scorer.encode(ex.text) for ex in common.sst2_examples("test", args.samples)]
    width = max(len(x) for x in ids)
    batch = torch.full((len(ids), width), scorer.tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, x in enumerate(ids):
        batch[row, : len(x)], mask[row, : len(x)] = torch.tensor(x), 1

    def perplexities(bf16: bool) -> np.ndarray:  # the computation of CausalLMScorer._perplexities
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = scorer.model(input_ids=batch, attention_mask=mask).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
            target = mask[:, 1:].float()
            return torch.exp((nll * target).sum(1) / target.sum(1)).numpy()

    results = common.interleaved({"float32": lambda: perplexities(False), "bfloat16 autocast": lambda: perplexities(True)},
                                 args.repeats)
    fp32, bf16 = perplexities(False), perplexities(True)
    relative = np.abs(bf16 - fp32) / fp32
    spearman = float(np.corrcoef(np.argsort(np.argsort(fp32)), np.argsort(np.argsort(bf16)))[0, 1])
    rows: list[dict[str, Any]] = [{"case": case, "median_s": round(common.median(r["wall"]), 3),
                                   "samples_per_s": round(args.samples / common.median(r["wall"]), 2)} for case, r in results.items()]
    print(f"SmolLM2 perplexity of {args.samples} SST-2 test sentences (one batch), {threads} threads, medians of {args.repeats}")
    print(common.table(rows, ["case", "median_s", "samples_per_s"]))
    speedup = rows[0]["median_s"] / rows[1]["median_s"]
    print(f"bf16 speedup {speedup:.2f}x; perplexity relative change median {np.median(relative):.4f}, "
          f"max {relative.max():.4f}; Spearman rank correlation {spearman:.4f}")
    common.write_json(args.out, {"machine": common.machine(), "args": vars(args), "rows": rows, "speedup": speedup,
                                 "relative_change_median": float(np.median(relative)), "relative_change_max": float(relative.max()),
                                 "spearman": spearman})


if __name__ == "__main__":
    main()
