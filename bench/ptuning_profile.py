#!/usr/bin/env python
"""The P-tuning v1 training-cost anomaly: where a training step's time goes, per method, in one run.

Measures seconds per training step of full fine-tuning, LoRA and P-tuning v1 (peft
``PromptEncoderConfig``) on MiniLM, batch 32, max length 64, real SST-2 training sentences, in
these loops, interleaved round-robin so that the machine's load falls on every case alike:

* ``plain-max64`` ("before"): a tutorial-style loop: tokenize each batch with
  ``padding="max_length"`` (every batch 64 tokens), forward, backward, AdamW step;
* ``plain-max64-oversub``: the same with torch threads at twice the cores (oversubscription);
* ``ours`` ("after"): ``peftguard.training.train_classifier`` (tokenized once, dynamic padding,
  threads from the cores).

``ptuning-v1-lstm`` (the original P-tuning's LSTM prompt encoder, peft's non-default) runs in the
plain loop only. Per-epoch figures are seconds per step times the steps of the issue's setting
(3000 samples / batch 32 = 94). Then a dynamically padded step is split into forward, backward
and optimizer time per method, and ``torch.profiler`` lists the top operators of P-tuning v1
and full steps. Output: tables on stdout and a JSON file (``--out``).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ("full", "lora", "ptuning-v1")
MAX_LENGTH = 64
BATCH = 32
EPOCH_STEPS = math.ceil(3000 / BATCH)  # the setting: 3000 SST-2 samples, batch 32


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="training steps per case per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (medians are over rounds)")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT_DIR / "ptuning_profile.json")
    return parser


def parse_args() -> argparse.Namespace:
    return build_parser().parse_args()


def build(method: str) -> tuple[Any, Any]:
    """A fresh MiniLM classifier wrapped for ``method`` (``ptuning-v1-lstm``: LSTM prompt encoder)."""
    from peft import PromptEncoderConfig, TaskType, get_peft_model

    from peftguard.models import LoadOptions
    from peftguard.training import TrainSettings
    from peftguard.tuning import method_config
    from peftguard.victims import prepare_tunable

    if method == "ptuning-v1-lstm":
        model, tokenizer = build("full")
        config = PromptEncoderConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=5, encoder_hidden_size=128,
                                     encoder_reparameterization_type="LSTM")
        return get_peft_model(model, config), tokenizer
    return prepare_tunable("minilm", 2, method_config(method), TrainSettings(max_length=MAX_LENGTH), LoadOptions())


def learning_rate(method: str) -> float:
    from peftguard.tuning import method_config

    return method_config(method.removesuffix("-lstm")).lr


def plain_loop(model: Any, tokenizer: Any, examples: list, lr: float, threads: int) -> None:
    """A tutorial-style loop: pad every batch to max length, tokenize per step."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        for start in range(0, len(examples), BATCH):
            chunk = examples[start:start + BATCH]
            batch = tokenizer([e.text for e in chunk], padding="max_length", truncation=True,
                              max_length=MAX_LENGTH, return_tensors="pt")
            loss = model(**batch, labels=torch.tensor([e.label for e in chunk])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(before)


def our_loop(model: Any, tokenizer: Any, examples: list, lr: float) -> None:
    from peftguard.training import TrainSettings, train_classifier

    settings = TrainSettings(epochs=1, lr=lr, batch_size=BATCH, max_length=MAX_LENGTH, keep_best_on_dev=False)
    train_classifier(model, tokenizer, examples, None, settings)


def step_phases(model: Any, tokenizer: Any, examples: list, lr: float, repeats: int) -> dict[str, float]:
    """Median CPU seconds of forward, backward and optimizer step of a dynamically padded step."""
    import torch

    from peftguard.training import collate, encode

    ids, _ = encode(tokenizer, [e.text for e in examples[:BATCH]], MAX_LENGTH)
    batch = collate(tokenizer, ids)
    labels = torch.tensor([e.label for e in examples[:BATCH]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    phases: dict[str, list[float]] = {"forward_cpu_s": [], "backward_cpu_s": [], "optimizer_cpu_s": []}
    for turn in range(repeats + 1):  # the first turn allocates the optimizer state: not counted
        holder: dict[str, Any] = {}
        forward = common.timed_cpu(lambda: holder.update(loss=model(**batch, labels=labels).loss))[1]
        backward = common.timed_cpu(lambda: holder["loss"].backward())[1]
        step = common.timed_cpu(optimizer.step)[1]
        optimizer.zero_grad(set_to_none=True)
        if turn:
            for key, value in zip(phases, (forward, backward, step)):
                phases[key].append(value)
    return {key: common.median(values) for key, values in phases.items()}


def profile_steps(model: Any, tokenizer: Any, examples: list, lr: float, threads: int, top: int = 12) -> str:
    """torch.profiler's top operators (self CPU time) over two plain-max64 steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        plain_loop(model, tokenizer, examples[: 2 * BATCH], lr, threads)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def make_cases(models: dict[str, tuple[Any, Any]], examples: list, threads: int) -> dict[str, Any]:
    cases = {}
    for method, (model, tokenizer) in models.items():
        lr = learning_rate(method)
        cases[f"{method}|plain-max64"] = lambda a=(model, tokenizer, examples, lr, threads): plain_loop(*a)
        if method.endswith("-lstm"):
            continue
        cases[f"{method}|plain-max64-oversub"] = lambda a=(model, tokenizer, examples, lr, 2 * threads): plain_loop(*a)
        cases[f"{method}|ours"] = lambda a=(model, tokenizer, examples, lr): our_loop(*a)
    return cases


def summarize(seconds: dict[str, dict[str, list[float]]], steps: int) -> list[dict[str, Any]]:
    """Per-step and per-epoch medians, and the ratio to full fine-tuning in the same loop."""
    def per_step(case: str, kind: str) -> float:
        return common.median(seconds[case][kind]) / steps

    rows = []
    for case in seconds:
        method, loop = case.split("|")
        full = f"full|{loop}"
        rows.append({
            "loop": loop, "method": method,
            "wall_s_per_step": per_step(case, "wall"), "cpu_s_per_step": per_step(case, "cpu"),
            "wall_s_per_epoch": per_step(case, "wall") * EPOCH_STEPS,
            "wall_vs_full": per_step(case, "wall") / per_step(full, "wall"),
            "cpu_vs_full": per_step(case, "cpu") / per_step(full, "cpu"),
        })
    return sorted(rows, key=lambda r: (r["loop"], r["method"]))


def main() -> None:
    args = parse_args()
    threads = common.setup()
    examples = common.sst2_examples("train", 3000)[: args.steps * BATCH]
    models = {m: build(m) for m in (*METHODS, "ptuning-v1-lstm")}
    cases = make_cases(models, examples, threads)
    for fn in cases.values():  # warm-up: first-call allocations and oneDNN primitive creation
        fn()
    seconds = common.interleaved(cases, args.repeats)
    rows = summarize(seconds, args.steps)
    phases = [{"method": m, **step_phases(*models[m], examples, learning_rate(m), args.repeats)} for m in METHODS]
    profiles = {m: profile_steps(*models[m], examples, learning_rate(m), threads) for m in ("ptuning-v1", "full")}
    print(f"MiniLM, batch {BATCH}, max length {MAX_LENGTH}, {threads} threads; medians of {args.repeats} rounds "
          f"of {args.steps} steps; per epoch = {EPOCH_STEPS} steps")
    print(common.table(rows, ["loop", "method", "wall_s_per_step", "cpu_s_per_step", "wall_s_per_epoch",
                              "wall_vs_full", "cpu_vs_full"]))
    print()
    print(common.table(phases, ["method", "forward_cpu_s", "backward_cpu_s", "optimizer_cpu_s"]))
    for method, text in profiles.items():
        print(f"\ntorch.profiler, {method}, 2 plain-max64 steps:\n{text}")
    common.write_json(args.out, {"machine": common.machine(), "steps": args.steps, "repeats": args.repeats,
                                 "batch": BATCH, "max_length": MAX_LENGTH, "epoch_steps": EPOCH_STEPS,
                                 "per_step": rows, "raw_seconds": seconds, "phases": phases, "profiles": profiles})


if __name__ == "__main__":
    main()
