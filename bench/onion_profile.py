#!/usr/bin/env python
"""ONION's default path before and after issue 19's profiling pass, beside the reference, at one thread.

Cases, interleaved round-robin in one process (medians; ratios only, the machine is shared):

* ``reference``: one float32 LM pass per candidate text (sentence and each single-word deletion);
* ``before``: the default path as of ``--before-rev`` (prefix-shared deletions in groups of ~64, bf16
  autocast casting every weight at every call, float32 re-check one sentence at a time); its
  ``deletion_scoring`` module is read from git at that revision;
* ``after``: today's default (bf16 twin of the LM's linear layers cast once, deletions of ~512 at a
  time sorted by suffix length across sentences, cached prefix trimmed to the longest one needed,
  one batched float32 re-check);
* ``after_margin_<m>`` (``--margin``): today's default with a wider re-check margin.

Then, per case, the cleaned texts at bar 0 against the reference's (decisions identical on how many
sentences), the deletions re-scored in float32, and, before and after, the bf16 error that the re-check
margin must cover: |(deletion loss - sentence loss) in bf16 - the same in float32| over every deletion
(bar 0's decision is the sign of that difference), before any re-check. Optionally the bf16 forwards
alone with one change undone at a time (``--ablate``) and a torch.profiler table of ``after``.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import numpy as np  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16, help="SST-2 test sentences (from the first)")
    parser.add_argument("--skip", type=int, default=0, help="sentences skipped first")
    parser.add_argument("--repeats", type=int, default=2, help="rounds (medians are over rounds)")
    parser.add_argument("--before-rev", default="eac6387", help="git revision of the 'before' deletion_scoring")
    parser.add_argument("--margin", type=float, action="append", default=[], help="extra case: re-check margin (nats)")
    parser.add_argument("--no-reference", action="store_true", help="leave the (slow) reference out")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators of 'after'")
    parser.add_argument("--ablate", action="store_true",
                        help="also time the bf16 forwards alone (no re-check): today's, groups of 64, autocast on float32 weights")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT_DIR / "onion_profile.json")
    return parser


def previous_module(rev: str) -> Any:
    """``peftguard.defenses.deletion_scoring`` as it was at ``rev``."""
    source = subprocess.run(["git", "show", f"{rev}:src/peftguard/defenses/deletion_scoring.py"], cwd=common.REPO,
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "deletion_scoring_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("deletion_scoring_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def before_losses(scorer: Any, old: Any, texts: list[str], bars: tuple[float, ...], stats: dict) -> list:
    """The previous ``CausalLMScorer._mean_losses``: the old scorer on the float32 model under autocast, then a
    float32 re-check per sentence (as at ``--before-rev``)."""
    sentences = [old.Sentence(*scorer._sentence_ids(t)) for t in texts]
    deleter = old.DeletionScorer(scorer.model, scorer.tokenizer.pad_token_id or 0, rows=2 * scorer.batch_size)
    out = []
    for sentence, (full, each) in zip(sentences, deleter.mean_losses(sentences, bf16=True)):
        near = near_bar(full, each, bars, old.CHECK_MARGIN_NATS)
        if near.any():
            chosen = np.flatnonzero(near)
            full, exact = deleter.mean_losses([old.Sentence(sentence.full, [sentence.deletions[i] for i in chosen])],
                                              bf16=False)[0]
            each = each.copy()
            each[chosen] = exact
            stats["rechecked"] = stats.get("rechecked", 0) + len(chosen)
        out.append((full, each))
    return out


def near_bar(full: float, each: np.ndarray, bars: tuple[float, ...], margin: float) -> np.ndarray:
    near = np.zeros(len(each), dtype=bool)
    for bar in bars:
        boundary = math.log(math.exp(full) - bar) if math.exp(full) > bar else -math.inf
        with np.errstate(invalid="ignore"):
            near |= np.abs(each - boundary) < margin
    return near


def main() -> None:
    args = build_parser().parse_args()
    threads = common.setup()
    import torch

    from peftguard.data import load_dataset
    from peftguard.defenses import deletion_scoring as ds
    from peftguard.defenses.onion import OnionConfig, OnionDefense

    load_before = list(__import__("os").getloadavg())
    texts = [e.text for e in load_dataset("sst2").split("test").examples][args.skip:args.skip + args.samples]
    bars = (0.0,)
    fast = OnionDefense(OnionConfig(precision="bf16"))
    scorer = fast.scorer
    old = previous_module(args.before_rev)
    counts: dict[str, dict] = {}

    def after(margin: float | None = None, name: str = "after"):
        def run():
            saved = ds.CHECK_MARGIN_NATS
            ds.CHECK_MARGIN_NATS = margin if margin is not None else saved
            original = ds.DeletionScorer.mean_losses

            def counting(self, *a, **k):
                out = original(self, *a, **k)
                counts.setdefault(name, {})["rechecked"] = self.rechecked
                return out

            ds.DeletionScorer.mean_losses = counting
            try:
                return suspicion(scorer._mean_losses(texts, bars))
            finally:
                ds.DeletionScorer.mean_losses, ds.CHECK_MARGIN_NATS = original, saved
        return run

    def before():
        stats = counts.setdefault("before", {})
        stats["rechecked"] = 0
        return suspicion(before_losses(scorer, old, texts, bars, stats))

    cases = {} if args.no_reference else {"reference": lambda: fast.reference_suspicion(texts)}
    cases |= {"before": before, "after": after()}
    cases |= {f"after_margin_{m:g}": after(m, f"after_margin_{m:g}") for m in args.margin}
    scorer._bf16_model()  # made once per scorer (a copy of the LM): not timed
    for fn in cases.values():  # warm-up (oneDNN kernels, first allocations) on two sentences
        with_texts(texts[:2], texts, fn)
    torch.set_num_threads(threads)
    results: dict[str, Any] = {}
    started = time.perf_counter()
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            results[name] = fn()
            seconds[name].append(time.perf_counter() - t0)
    figures = {name: {"median_s": common.median(v), "sentences_per_s": len(texts) / common.median(v), "runs": v}
               for name, v in seconds.items()}
    base = "reference" if "reference" in results else "before"
    cleaned = {name: [fast.clean(t, s) for t, s in zip(texts, res)] for name, res in results.items()}
    for name in cases:
        figures[name]["identical_to_" + base] = int(sum(a == b for a, b in zip(cleaned[name], cleaned[base])))
        figures[name]["speedup_vs_before"] = figures["before"]["median_s"] / figures[name]["median_s"]
        if "reference" in figures:
            figures[name]["speedup_vs_reference"] = figures["reference"]["median_s"] / figures[name]["median_s"]
        figures[name] |= counts.get(name, {})
    error = {"before": bf16_error(scorer, old, texts, before=True), "after": bf16_error(scorer, ds, texts)}
    deletions = sum(len(t.split()) for t in texts)
    result = {"machine": common.machine(), "threads": threads, "load_average_at_start": load_before,
              "load_average_at_end": list(__import__("os").getloadavg()), "samples": len(texts), "skip": args.skip,
              "deletions": deletions, "before_rev": args.before_rev, "check_margin_nats": ds.CHECK_MARGIN_NATS,
              "bf16_decision_error_nats": error, "figures": figures, "timed_seconds": time.perf_counter() - started}
    if args.ablate:
        result["ablation_bf16_forwards"] = ablation(scorer, ds, texts, args.repeats)
    if args.profile:
        result["profile_after"] = profile(cases["after"])
    rows = [{"case": n, **{k: v for k, v in f.items() if k != "runs"}} for n, f in figures.items()]
    print(f"{len(texts)} SST-2 test sentences ({deletions} deletions), {threads} thread(s), load "
          f"{load_before[0]:.1f} -> {result['load_average_at_end'][0]:.1f}")
    print(common.table(rows, list(dict.fromkeys(k for row in rows for k in row))))
    print("bf16 decision error (nats):", error)
    common.write_json(args.out, result)
    print(f"wrote {args.out}")


def with_texts(subset, texts, fn):
    saved = list(texts)
    texts[:] = subset
    try:
        fn()
    finally:
        texts[:] = saved


def suspicion(losses) -> list[np.ndarray]:
    return [np.exp(full) - np.exp(each) for full, each in losses]


def bf16_error(scorer, module, texts, before: bool = False) -> dict[str, float]:
    """|(deletion - sentence) mean loss, bf16 minus float32| over the deletions before any re-check: what the
    margin must cover (``before``: the previous module, sentences in bf16 too)."""
    sentences = [module.Sentence(*scorer._sentence_ids(t)) for t in texts]
    pad = scorer.tokenizer.pad_token_id or 0
    deleter = (module.DeletionScorer(scorer.model, pad) if before
               else module.DeletionScorer(scorer.model, pad, bf16_model=scorer._bf16_model()))
    low, exact = deleter.mean_losses(sentences, bf16=True), deleter.mean_losses(sentences, bf16=False)
    diffs = np.concatenate([np.abs((e - f) - (E - F)) for (f, e), (F, E) in zip(low, exact)])
    diffs = diffs[np.isfinite(diffs)]
    return {"max": float(diffs.max()), "p99": float(np.percentile(diffs, 99)), "median": float(np.median(diffs)),
            "over_margin": int((diffs >= module.CHECK_MARGIN_NATS).sum()), "deletions": int(len(diffs))}


def ablation(scorer, ds, texts, repeats) -> dict[str, float]:
    """Median seconds of the bf16 forwards alone, relative to today's layout, with one change undone each."""
    sentences = [ds.Sentence(*scorer._sentence_ids(t)) for t in texts]
    pad, twin = scorer.tokenizer.pad_token_id or 0, scorer._bf16_model()
    variants = {"today": dict(bf16_model=twin), "groups_of_64": dict(bf16_model=twin, group=64),
                "autocast_on_fp32_weights": dict(bf16_model=None)}
    cases = {name: (lambda kw=kw: ds.DeletionScorer(scorer.model, pad, rows=2 * scorer.batch_size, **kw)
                    .mean_losses(sentences, bf16=True)) for name, kw in variants.items()}
    seconds = common.interleaved(cases, repeats)
    today = common.median(seconds["today"]["wall"])
    out = {name: common.median(v["wall"]) / today for name, v in seconds.items()}
    print("bf16 forwards alone, time relative to today's:", out)
    return out


def profile(fn) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    top = [{"op": e.key, "self_share": e.self_cpu_time_total / total, "calls": e.count} for e in events[:12]]
    print(common.table(top, ["op", "self_share", "calls"]))
    return top


if __name__ == "__main__":
    main()
