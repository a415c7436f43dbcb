#!/usr/bin/env python
"""How PSIM training and scanning time grow with dataset size and with sequence length.

Model: a P-tuning v1 PSIM on MiniLM (the default PSIM), trained with
``peftguard.training.train_classifier`` and scanning with ``predict_proba``, cold caches.

* Size: one training epoch over ``--train-sizes`` SST-2 training samples, and a scan of
  ``--scan-sizes`` samples (max length 128, dynamic padding). The issue's sizes are 1k/2k/4k; the
  default training sizes are smaller so that the script finishes in minutes on 2 loaded cores.
* Length: inputs of exactly 32, 64 and 128 tokens (windows of concatenated SST-2 text), one
  training epoch over ``--length-train-samples`` and a scan of ``--length-scan-samples``.

The sizes/lengths take turns round-robin over ``--repeats`` rounds; figures are medians. For size,
a least-squares line ``seconds = a + b * n`` is fitted and its R² and the per-sample cost at the
largest size relative to the smallest are reported (1.0 = linear).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BATCH = 32


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-sizes", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--scan-sizes", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--length-train-samples", type=int, default=128)
    parser.add_argument("--length-scan-samples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT_DIR / "growth.json")
    return parser


def parse_args() -> argparse.Namespace:
    return build_parser().parse_args()


def psim_model() -> tuple[Any, Any]:
    from peftguard.models import LoadOptions
    from peftguard.training import TrainSettings
    from peftguard.tuning import PTuningV1Config
    from peftguard.victims import prepare_tunable

    return prepare_tunable("minilm", 2, PTuningV1Config(), TrainSettings(), LoadOptions())


def train_case(model: Any, tokenizer: Any, examples: list, max_length: int) -> Any:
    from peftguard.defenses.psim import DEFAULT_PSIM_LR
    from peftguard.training import TrainSettings, train_classifier

    settings = TrainSettings(epochs=1, lr=DEFAULT_PSIM_LR, batch_size=BATCH, max_length=max_length, keep_best_on_dev=False)

    def run() -> None:
        cold()
        train_classifier(model, tokenizer, examples, None, settings)

    return run


def scan_case(model: Any, tokenizer: Any, texts: list[str], max_length: int) -> Any:
    from peftguard.training import predict_proba

    def run() -> None:
        cold()
        predict_proba(model, tokenizer, texts, 64, max_length)

    return run


def cold() -> None:
    from peftguard import caches

    caches.clear()


def exact_length_texts(tokenizer: Any, length: int, count: int) -> list[str]:
    """``count`` texts that tokenize to at least ``length`` tokens (cut to exactly ``length``)."""
    from peftguard.data import Example

    stream: list[int] = []
    for example in common.sst2_examples("train", None):
        stream += tokenizer(example.text, add_special_tokens=False)["input_ids"]
        if len(stream) >= count * length:
            break
    texts = [tokenizer.decode(stream[i * length:(i + 1) * length]) for i in range(count)]
    return [Example(t, i % 2) for i, t in enumerate(texts)]


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares ``y = a + b x``, its R², and per-unit cost at the largest x over the smallest."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx if sxx else float("nan")
    intercept = mean_y - slope * mean_x
    total = sum((y - mean_y) ** 2 for y in ys)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    r2 = 1 - residual / total if total else float("nan")
    per_unit = (ys[-1] / xs[-1]) / (ys[0] / xs[0])
    return {"intercept_s": intercept, "slope_s_per_sample": slope, "r2": r2, "per_sample_cost_largest_vs_smallest": per_unit}


def size_cases(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    pool = common.sst2_examples("train", None)
    cases = {f"train|size|{n}": train_case(model, tokenizer, pool[:n], 128) for n in args.train_sizes}
    cases |= {f"scan|size|{n}": scan_case(model, tokenizer, [e.text for e in pool[:n]], 128) for n in args.scan_sizes}
    return cases


def length_cases(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    cases = {}
    count = max(args.length_train_samples, args.length_scan_samples)
    for length in args.lengths:
        examples = exact_length_texts(tokenizer, length, count)
        cases[f"train|length|{length}"] = train_case(model, tokenizer, examples[:args.length_train_samples], length)
        cases[f"scan|length|{length}"] = scan_case(model, tokenizer, [e.text for e in examples[:args.length_scan_samples]], length)
    return cases


def rows_of(seconds: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    rows = []
    for name, values in seconds.items():
        stage, axis, value = name.split("|")
        rows.append({"stage": stage, "axis": axis, "value": int(value), "median_s": common.median(values["wall"]),
                     "median_cpu_s": common.median(values["cpu"])})
    for row in rows:
        first = next(r for r in rows if r["stage"] == row["stage"] and r["axis"] == row["axis"])
        row["x_vs_first"] = row["value"] / first["value"]
        row["s_vs_first"] = row["median_s"] / first["median_s"]
        row["cpu_vs_first"] = row["median_cpu_s"] / first["median_cpu_s"]
    return rows


def fits(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for stage in ("train", "scan"):
        chosen = [r for r in rows if r["stage"] == stage and r["axis"] == "size"]
        for kind in ("median_s", "median_cpu_s"):
            out[f"{stage}_size_{kind}"] = linear_fit([r["value"] for r in chosen], [r[kind] for r in chosen])
    return out


def main() -> None:
    args = parse_args()
    threads = common.setup()
    model, tokenizer = psim_model()
    cases = size_cases(model, tokenizer, args) | length_cases(model, tokenizer, args)
    next(iter(cases.values()))()  # warm-up
    seconds = common.interleaved(cases, args.repeats)
    rows = rows_of(seconds)
    linearity = fits(rows)
    print(f"PSIM (P-tuning v1, MiniLM), {threads} threads, medians of {args.repeats} rounds; load "
          f"{common.machine()['load_average_1m_5m_15m'][0]:.1f}")
    print(common.table(rows, ["stage", "axis", "value", "median_s", "median_cpu_s", "x_vs_first", "s_vs_first", "cpu_vs_first"]))
    for name, fit in linearity.items():
        print(f"{name}: R² {fit['r2']:.4f}, per-sample cost at largest vs smallest {fit['per_sample_cost_largest_vs_smallest']:.2f}")
    common.write_json(args.out, {"machine": common.machine(), "args": vars(args), "rows": rows, "linearity": linearity,
                                 "raw_seconds": seconds})


if __name__ == "__main__":
    main()
