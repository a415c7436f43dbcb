#!/usr/bin/env python
"""Training cost per method: seconds per epoch, peak memory, trainable share; MiniLM's FLOP rate.

For each model (MiniLM; SmolLM2-135M at small sizes) and each of the five methods plus PSIM
(P-tuning v1 on uniformly reset labels, PSIM's learning rate), one child process loads the model,
takes a warm-up step, then times ``--repeats`` epochs of ``peftguard.training.train_classifier``
over the same SST-2 training subset (wall and CPU seconds, medians). A child per case makes the
peak resident memory (``ru_maxrss``) that case's own; it includes Python, torch and the model.

MiniLM extras: ``full-pad128`` is full fine-tuning with every batch padded to 128 tokens (the
dynamic-padding comparison; losses differ only by dropout draws), and for full fine-tuning the
achieved model FLOP rate: forward+backward FLOPs of the epoch (``torch.utils.flop_counter``)
over its seconds, as a share of the rate of a large float32 matrix multiply timed in the same
process between epochs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ("full", "lora", "prompt", "ptuning-v1", "ptuning-v2", "psim")
SIZES = {  # model: (samples, batch size, max length); SmolLM2 kept small (about 3 s per LoRA step)
    "minilm": (128, 32, 128),
    "smollm2": (32, 16, 32),
}
MATMUL_SIZE = 2048


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=[*METHODS, "full-pad128"])
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per case (medians)")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT_DIR / "training.json")
    return parser


def parse_args() -> argparse.Namespace:
    return build_parser().parse_args()


def pad_to(length: int) -> None:
    """Make ``training.collate`` pad every batch to ``length`` tokens (the before-dynamic-padding loop)."""
    from peftguard import training

    def collate(tokenizer: Any, ids: Any) -> Any:
        return tokenizer.pad({"input_ids": list(ids)}, padding="max_length", max_length=length, return_tensors="pt")

    training.collate = collate


def matmul_peak(size: int = MATMUL_SIZE, repeats: int = 3) -> dict[str, float]:
    """FLOP rate of a float32 ``size``² matrix product (wall and per CPU second), medians."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    runs = [common.timed_cpu(lambda: torch.mm(a, b)) for _ in range(repeats)]
    flops = 2 * size**3
    return {"wall_flops": flops / common.median([r[0] for r in runs]), "cpu_flops": flops / common.median([r[1] for r in runs])}


def epoch_flops(model: Any, tokenizer: Any, examples: list, batch_size: int, max_length: int) -> int:
    """Forward+backward FLOPs of one epoch over ``examples`` as train_classifier batches them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from peftguard.training import collate, encode

    ids, _ = encode(tokenizer, [e.text for e in examples], max_length)
    model.train()
    with FlopCounterMode(display=False) as counter:
        for start in range(0, len(ids), batch_size):
            batch = collate(tokenizer, ids[start:start + batch_size])
            labels = torch.tensor([e.label for e in examples[start:start + batch_size]])
            model(**batch, labels=labels).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def prepare(model_ref: str, method: str, max_length: int) -> tuple[Any, Any, float]:
    from peftguard.defenses.psim import DEFAULT_PSIM_LR
    from peftguard.models import LoadOptions
    from peftguard.training import TrainSettings
    from peftguard.tuning import method_config
    from peftguard.victims import prepare_tunable

    config = method_config("ptuning-v1" if method == "psim" else method.removesuffix("-pad128"))
    model, tokenizer = prepare_tunable(model_ref, 2, config, TrainSettings(max_length=max_length), LoadOptions())
    return model, tokenizer, DEFAULT_PSIM_LR if method == "psim" else config.lr


def run_one(model_ref: str, method: str, repeats: int) -> dict[str, Any]:
    """One case in this process: warm-up step, ``repeats`` timed epochs, memory, trainable share."""
    from peftguard.defenses.psim import reset_labels
    from peftguard.training import TrainSettings, train_classifier
    from peftguard.tuning import trainable_share

    samples, batch_size, max_length = SIZES[model_ref]
    examples = common.sst2_examples("train", samples)
    if method == "psim":
        examples = reset_labels(examples, 2, 1.0, 0)
    if method == "full-pad128":
        pad_to(128)
        max_length = 128
    model, tokenizer, lr = prepare(model_ref, method, max_length)
    loaded_rss = common.current_rss_mb()
    settings = TrainSettings(epochs=1, lr=lr, batch_size=batch_size, max_length=max_length, keep_best_on_dev=False)
    train_classifier(model, tokenizer, examples[:batch_size], None, settings)  # warm-up step
    epochs, losses, peaks = [], [], []
    for _ in range(repeats):
        holder: dict[str, Any] = {}
        epochs.append(common.timed_cpu(lambda: holder.update(r=train_classifier(model, tokenizer, examples, None, settings))))
        losses.append(holder["r"].train_loss[-1])
        if model_ref == "minilm" and method == "full":
            peaks.append(matmul_peak())
    trainable, total = trainable_share(model)
    result = {
        "model": model_ref, "method": method, "samples": samples, "batch_size": batch_size, "max_length": max_length,
        "wall_s_per_epoch": common.median([e[0] for e in epochs]), "cpu_s_per_epoch": common.median([e[1] for e in epochs]),
        "epoch_walls": [e[0] for e in epochs], "last_losses": losses,
        "peak_rss_mb": common.peak_rss_mb(), "rss_after_load_mb": loaded_rss,
        "trainable": trainable, "total": total, "trainable_share": trainable / total,
    }
    if peaks:
        result |= flop_rate(model, tokenizer, examples, batch_size, max_length, result, peaks)
    return result


def flop_rate(model: Any, tokenizer: Any, examples: list, batch_size: int, max_length: int,
              result: dict[str, Any], peaks: list[dict[str, float]]) -> dict[str, Any]:
    flops = epoch_flops(model, tokenizer, examples, batch_size, max_length)
    peak_wall = common.median([p["wall_flops"] for p in peaks])
    peak_cpu = common.median([p["cpu_flops"] for p in peaks])
    achieved_wall = flops / result["wall_s_per_epoch"]
    achieved_cpu = flops / result["cpu_s_per_epoch"]
    return {"epoch_flops": flops, "matmul_peak_gflops": peak_wall / 1e9, "achieved_gflops": achieved_wall / 1e9,
            "share_of_peak_wall": achieved_wall / peak_wall, "share_of_peak_cpu": achieved_cpu / peak_cpu}


def spawn(model_ref: str, method: str, repeats: int) -> dict[str, Any]:
    """Run one case in a child process; its last stdout line is the JSON result."""
    command = [sys.executable, __file__, "--one", model_ref, method, "--repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"model": model_ref, "method": method, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    threads = common.setup()
    if args.one:
        print(json.dumps(run_one(*args.one, args.repeats)))
        return
    cases = [(m, k) for m in args.models for k in args.methods if not (k == "full-pad128" and m != "minilm")]
    if "minilm" in args.models and "full" in args.methods and "full-pad128" not in args.methods:
        cases.insert(1, ("minilm", "full-pad128"))
    rows = [spawn(model, method, args.repeats) for model, method in cases]
    for row in rows:
        full = next((r for r in rows if r["model"] == row["model"] and r["method"] == "full" and "error" not in r), None)
        if full and "error" not in row:
            row["cpu_vs_full"] = row["cpu_s_per_epoch"] / full["cpu_s_per_epoch"]
            row["wall_vs_full"] = row["wall_s_per_epoch"] / full["wall_s_per_epoch"]
    print(f"{threads} threads; medians of {args.repeats} epochs per case; sizes (samples, batch, max length): {SIZES}")
    print(common.table(rows, ["model", "method", "wall_s_per_epoch", "cpu_s_per_epoch", "wall_vs_full", "cpu_vs_full",
                              "peak_rss_mb", "trainable", "trainable_share", "error"]))
    flop_row = next((r for r in rows if r.get("epoch_flops")), None)
    if flop_row:
        print(f"MiniLM full fine-tuning: {flop_row['achieved_gflops']:.1f} GFLOP/s achieved vs "
              f"{flop_row['matmul_peak_gflops']:.1f} GFLOP/s float32 matmul peak: {flop_row['share_of_peak_wall']:.0%} "
              f"of peak (wall), {flop_row['share_of_peak_cpu']:.0%} (CPU time)")
    common.write_json(args.out, {"machine": common.machine(), "repeats": args.repeats, "sizes": SIZES, "cases": rows})


if __name__ == "__main__":
    main()
