"""How strong is each poisoned zoo model's backdoor? CA and the ASR of its own trigger, on the test split.

    python experiments/zoo_strength.py --zoo runs/zoo --part held-apart-5 --out results/audit_zoo/held_apart_5_strength.json

Runs `peftguard evaluate` on every poisoned model of the part (the folder the audit judges: a LoRA victim where the
zoo entry has one), with the entry's attack, trigger and target label, on a fixed random subset of the test split
(--max-eval-samples, seed 0). A finished evaluation (its JSON under --work) is reused, also where the model
itself is no longer there (a part built and evaluated on another machine). This is a measurement of the
zoo, read after the audits: no audit setting is chosen from it. It tells a miss by the scanner (a strong backdoor it
did not find) from a backdoor the poisoning did not plant.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo import PARTS, PEFTGUARD  # noqa: E402

from peftguard.artifacts import write_text  # noqa: E402


def evaluate_command(model: dict[str, Any], out: Path, samples: int) -> list[str]:
    return [*PEFTGUARD, "evaluate", "--model", model["model"], "--dataset", model["dataset"],
            "--attack", model["attack"], "--trigger", model["trigger"], "--target-label", str(model["target"]),
            "--max-eval-samples", str(samples), "--seed", "0", "--out", str(out)]


def strength(model: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    return {"name": model["name"], "dataset": model["dataset"], "attack": model["attack"], "trigger": model["trigger"],
            "target": model["target"], "victim": model["victim"], "clean_accuracy": metrics["clean_accuracy"],
            "attack_success_rate": metrics["attack_success_rate"], "triggered_samples": metrics["triggered_samples"]}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | trigger | target | CA | ASR | triggered |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['trigger']} | {r['target']} | {100 * r['clean_accuracy']:.2f} | "
              f"{100 * r['attack_success_rate']:.2f} | {r['triggered_samples']} |" for r in rows]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, required=True, help="the built zoo (its zoo.json names each model's folder)")
    parser.add_argument("--part", choices=PARTS, required=True)
    parser.add_argument("--only", action="append", help="evaluate only this entry (repeat)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write (a Markdown table beside it)")
    parser.add_argument("--work", type=Path, default=Path("runs/zoo-strength"), help="per-model evaluate outputs")
    parser.add_argument("--max-eval-samples", type=int, default=400, help="test subset per model")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    models = [m for m in json.loads((args.zoo / "zoo.json").read_text(encoding="utf-8"))
              if m["part"] == args.part and m["poisoned"] and (not args.only or m["name"] in args.only)]
    rows, not_built = [], [m["name"] for m in models
                           if not (args.work / f"{m['name']}.json").is_file() and not Path(m["model"]).is_dir()]
    if not_built:
        print(f"not built yet, left out: {', '.join(not_built)}", file=sys.stderr)
    for model in (m for m in models if m["name"] not in not_built):
        out = args.work / f"{model['name']}.json"
        if not out.is_file():
            command = evaluate_command(model, out, args.max_eval_samples)
            print(shlex.join(command), flush=True)
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        rows.append(strength(model, json.loads(out.read_text(encoding="utf-8"))))
    record = {"part": args.part, "max_eval_samples": args.max_eval_samples, "models": rows, "not_built": not_built}
    write_text(args.out, json.dumps(record, indent=2) + "\n")
    write_text(args.out.with_suffix(".md"), table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
