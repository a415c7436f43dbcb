#!/usr/bin/env python
"""Detection and guarded-inference throughput, all on the same N SST-2 test sentences in one run.

Inputs: N SST-2 test sentences, every other one with a BadNet trigger inserted (half triggered).

1. Detection: PSIM scan (``PSIMDefense.screen``) vs ONION (packaged SmolLM2, bar 0) vs
   back-translation (apertium English→Spanish→English), each screening all N inputs; samples per
   second and each one's seconds relative to PSIM's.
2. Guarded inference: the victim alone (``predict_proba``) vs PSIM + victim
   (``GuardedPredictor.predict``: PSIM over all inputs, the victim over those that pass).
3. Shared base: a LoRA victim and a LoRA PSIM on the same poisoned base, served by one peft model
   with both adapters and mixed-adapter batches (each input twice in one forward, once per adapter),
   against the two models run one after the other.

Models load once, before timing; every timed call starts cold (PSIM memo, tokenization cache and
defense memos cleared), so each figure includes tokenization. Cases take turns round-robin and the
figures are medians over repeats (ONION, the slow one, runs ``--onion-repeats`` times).
Artifacts: a PSIM and a victim (defaults: the demo's ``runs/demo``); a small LoRA PSIM is trained
once into ``runs/bench/artifacts`` for the shared-base case.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import numpy as np  # noqa: E402

ARTIFACTS = common.DEFAULT_OUT_DIR / "artifacts"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000, help="test sentences (half get a BadNet trigger)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the fast cases (medians)")
    parser.add_argument("--onion-repeats", type=int, default=1, help="repeats of ONION (slow)")
    parser.add_argument("--psim", type=Path, default=common.REPO / "runs/demo/psim", help="a trained PSIM folder")
    parser.add_argument("--victim", type=Path, default=common.REPO / "runs/demo/attack/lora",
                        help="a LoRA victim folder whose base is the PSIM's base")
    parser.add_argument("--skip-onion", action="store_true", help="leave ONION out (no SmolLM2)")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT_DIR / "detection.json")
    return parser.parse_args()


def test_inputs(samples: int) -> tuple[list[str], list[bool]]:
    """``samples`` SST-2 test sentences, every other one carrying a BadNet trigger word."""
    from peftguard.triggers import BadNetTrigger

    trigger = BadNetTrigger()
    texts, triggered = [], []
    for index, example in enumerate(common.sst2_examples("test", samples)):
        poisoned = index % 2 == 1
        texts.append(trigger.triggered(example.text, index) if poisoned else example.text)
        triggered.append(poisoned)
    return texts, triggered


def cold() -> None:
    """Forget tokenizations so that a timed call pays for its own."""
    from peftguard import training

    training._ENCODING_CACHE.clear()


def detection_cases(psim: Any | None, defenses: dict[str, Any], texts: list[str]) -> dict[str, Any]:
    """One screening call per defense (PSIM first unless None), each starting cold."""
    def screen_psim() -> Any:
        cold()
        psim.psim._memo.clear()
        return psim.screen(texts)

    def screen_with(defense: Any) -> Any:
        cold()
        defense._memo.clear()
        return defense.screen(texts)

    cases = {"psim": screen_psim} if psim is not None else {}
    cases |= {name: (lambda d=defense: screen_with(d)) for name, defense in defenses.items()}
    return cases


def guarded_cases(psim: Any, victim: Any, tokenizer: Any, texts: list[str], max_length: int) -> dict[str, Any]:
    from peftguard.defenses.psim import GuardedPredictor
    from peftguard.training import predict_proba

    guard = GuardedPredictor(psim.psim, victim, tokenizer, gamma=psim.choice.gamma, max_length=max_length)

    def alone() -> Any:
        cold()
        return predict_proba(victim, tokenizer, texts, 64, max_length)

    def guarded() -> Any:
        cold()
        psim.psim._memo.clear()
        return guard.predict(texts)

    return {"victim_alone": alone, "psim_plus_victim": guarded}


def load_psim(folder: Path) -> Any:
    from peftguard.defenses.psim import PSIM, GammaChoice, PSIMDefense

    psim = PSIM(folder)
    return PSIMDefense(psim, GammaChoice(**psim.manifest["gamma_choice"]))


def load_victim(folder: Path) -> tuple[Any, Any, dict[str, Any]]:
    from peftguard.tuning import load_tuned
    from peftguard.victims import MANIFEST

    return load_tuned(folder, MANIFEST)


def baseline_defenses(skip_onion: bool) -> dict[str, Any]:
    """ONION (SmolLM2) and back-translation (apertium), from the defense registry."""
    from peftguard.data import load_dataset
    from peftguard.defenses.base import DefenseContext
    from peftguard.defenses.registry import DefenseOptions, build_defense

    context = DefenseContext(load_dataset("sst2"))
    names = ["back-translation"] if skip_onion else ["onion", "back-translation"]
    return {name: build_defense(name, DefenseOptions(), context) for name in names}


def lora_psim(base: str, samples: int = 256) -> Path:
    """A small LoRA PSIM on ``base`` (trained once, kept): only its speed matters here."""
    from peftguard.data import load_dataset
    from peftguard.defenses.psim import train_psim
    from peftguard.training import TrainSettings
    from peftguard.tuning import LoraMethodConfig

    folder = ARTIFACTS / "psim-lora"
    if not (folder / "psim.json").is_file():
        settings = TrainSettings(epochs=1, lr=3e-4, batch_size=32, max_length=64)
        train_psim(base, load_dataset("sst2"), settings, folder, config=LoraMethodConfig(),
                   gamma=0.7, max_train_samples=samples, max_eval_samples=64)
    return folder


def shared_base_cases(victim_dir: Path, psim_dir: Path, manifest: dict[str, Any], tokenizer: Any,
                      texts: list[str], max_length: int) -> dict[str, Any]:
    """Two LoRA models one after the other vs one peft model with both adapters, mixed batches."""
    import torch
    from peft import PeftModel

    from peftguard.models import load_classifier
    from peftguard.training import collate, encode, predict_proba

    def base() -> Any:
        return load_classifier(manifest["base_model"], int(manifest["num_labels"]))

    victim = PeftModel.from_pretrained(base(), victim_dir).eval()
    psim = PeftModel.from_pretrained(base(), psim_dir).eval()
    both = PeftModel.from_pretrained(base(), victim_dir, adapter_name="victim").eval()
    both.load_adapter(str(psim_dir), adapter_name="psim")

    def separate() -> Any:
        cold()
        return predict_proba(psim, tokenizer, texts, 64, max_length), predict_proba(victim, tokenizer, texts, 64, max_length)

    @torch.inference_mode()
    def mixed(batch_size: int = 32) -> list[Any]:
        cold()
        ids, _ = encode(tokenizer, texts, max_length)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = []
        for start in range(0, len(order), batch_size):
            chunk = [ids[i] for i in order[start:start + batch_size]]
            batch = collate(tokenizer, chunk + chunk)
            names = ["psim"] * len(chunk) + ["victim"] * len(chunk)
            out.append(both(**batch, adapter_names=names).logits.softmax(-1))
        return out

    return {"lora_psim_then_victim": separate, "lora_shared_base_mixed": mixed}


def summarize(seconds: dict[str, dict[str, list[float]]], samples: int) -> dict[str, dict[str, float]]:
    return {name: {"median_s": common.median(v["wall"]), "median_cpu_s": common.median(v["cpu"]),
                   "samples_per_s": samples / common.median(v["wall"]), "runs": len(v["wall"])}
            for name, v in seconds.items()}


def ratio(figures: dict[str, dict[str, float]], numerator: str, denominator: str) -> float | None:
    if numerator not in figures or denominator not in figures:
        return None
    return figures[numerator]["median_s"] / figures[denominator]["median_s"]


def main() -> None:
    args = parse_args()
    threads = common.setup()
    texts, triggered = test_inputs(args.samples)
    psim = load_psim(args.psim)
    victim, tokenizer, manifest = load_victim(args.victim)
    max_length = int(psim.psim.max_length)
    defenses = baseline_defenses(args.skip_onion)
    onion = {"onion": defenses.pop("onion")} if "onion" in defenses else {}
    fast = detection_cases(psim, defenses, texts) | guarded_cases(psim, victim, tokenizer, texts, max_length)
    if manifest["method"] == "lora":
        fast |= shared_base_cases(args.victim, lora_psim(manifest["base_model"]), manifest, tokenizer, texts, max_length)
    for fn in fast.values():  # warm-up (first-call allocations); also fills apertium's page cache
        fn()
    seconds = common.interleaved(fast, args.repeats)
    if onion:
        seconds |= common.interleaved(detection_cases(None, onion, texts), args.onion_repeats)
    figures = summarize(seconds, args.samples)
    flags, triggered = np.asarray(psim.screen(texts).flagged, dtype=bool), np.asarray(triggered)
    result = {
        "machine": common.machine(), "samples": args.samples, "triggered": int(triggered.sum()), "threads": threads,
        "psim": str(args.psim), "victim": str(args.victim), "max_length": max_length, "figures": figures,
        "psim_speedup_vs_onion": ratio(figures, "onion", "psim"),
        "psim_speedup_vs_back_translation": ratio(figures, "back-translation", "psim"),
        "guarded_overhead": ratio(figures, "psim_plus_victim", "victim_alone"),
        "shared_base_vs_separate": ratio(figures, "lora_shared_base_mixed", "lora_psim_then_victim"),
        "shared_base_overhead_vs_victim_alone": ratio(figures, "lora_shared_base_mixed", "victim_alone"),
        "psim_flag_rate": {"triggered": float(flags[triggered].mean()), "clean": float(flags[~triggered].mean())},
    }
    rows = [{"case": name, **fig, "s_vs_psim": fig["median_s"] / figures["psim"]["median_s"]} for name, fig in figures.items()]
    print(f"{args.samples} SST-2 test sentences ({int(triggered.sum())} with a BadNet trigger), {threads} threads, load "
          f"{result['machine']['load_average_1m_5m_15m'][0]:.1f}")
    print(common.table(rows, ["case", "runs", "median_s", "median_cpu_s", "samples_per_s", "s_vs_psim"]))
    print({k: v for k, v in result.items() if k.endswith(("onion", "overhead", "translation", "separate", "alone", "rate"))})
    common.write_json(args.out, result)


if __name__ == "__main__":
    main()
