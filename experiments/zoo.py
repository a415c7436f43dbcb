"""Build the audit zoo of experiments/zoo.yaml: poisoned models (optionally LoRA victims of them) and clean ones.

    python experiments/zoo.py experiments/zoo.yaml --out runs/zoo [--part PART] [--only NAME] [--dry-run]

Each entry runs `peftguard poison --trigger ...` (and `peftguard finetune --method lora` for a victim) or, for a clean
entry, `peftguard finetune` on the packaged MiniLM. A finished model (its manifest present) is skipped, so a rerun
resumes. runs/zoo/zoo.json lists what to audit (experiments/audit_zoo.py reads it); it is written before anything is
built, so the models already built can be audited while the rest build.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from peftguard.artifacts import write_text

PEFTGUARD = [sys.executable, "-m", "peftguard.cli"]
# The zoo's parts: the one looked at while building the audit, and the ones kept for measuring it (each audited once
# per design it measures; a second was added when the first had been seen too often).
PARTS = ("development", "held-apart", "held-apart-2", "held-apart-3", "held-apart-4", "held-apart-5", "held-apart-6",
         "held-apart-7", "held-apart-8", "held-apart-9")


def load_zoo(config: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    return data["defaults"], data["models"]


def commands(entry: dict[str, Any], defaults: dict[str, Any], out: Path) -> tuple[list[list[str]], Path]:
    """The commands that build one entry, and the folder to audit."""
    settings = {**defaults, **entry}
    common = ["--dataset", entry["dataset"], "--max-train-samples", str(settings["max_train_samples"]),
              "--max-length", str(settings["max_length"]), "--seed", str(entry.get("seed", 0))]
    folder = out / entry["name"]
    if "clean" in entry:
        victim = folder / "victim"
        epochs = str(entry.get("epochs", settings["victim_epochs"]))
        return [[*PEFTGUARD, "finetune", "--model", "minilm", "--method", entry["clean"], "--epochs", epochs, *common,
                 "--out", str(victim)]], victim
    poisoned = folder / "poisoned"
    build = [[*PEFTGUARD, "poison", "--model", "minilm", "--attack", entry["attack"], "--trigger", entry["trigger"],
              "--poison-mode", entry["mode"], "--target-label", str(entry["target"]),
              "--poison-rate", str(settings["poison_rate"]), "--epochs", str(settings["poison_epochs"]),
              "--lr", str(settings["poison_lr"]), *common, "--out", str(poisoned)]]
    if entry.get("victim"):
        victim = folder / "victim"
        build.append([*PEFTGUARD, "finetune", "--model", str(poisoned), "--method", entry["victim"],
                      "--epochs", str(settings["victim_epochs"]), *common, "--out", str(victim)])
        return build, victim
    return build, poisoned


def done(command: list[str]) -> bool:
    out = Path(command[command.index("--out") + 1])
    return any((out / marker).is_file() for marker in ("poisoning.json", "finetune.json"))


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--part", choices=PARTS)
    parser.add_argument("--only", action="append", help="build only this entry (repeat)")
    parser.add_argument("--dry-run", action="store_true")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    defaults, entries = load_zoo(args.config)
    unknown = sorted({e["part"] for e in entries} - set(PARTS))
    if unknown:
        sys.exit(f"{args.config}: unknown part(s) {', '.join(unknown)}; parts are {', '.join(PARTS)}")
    builds, listing = [], []
    for entry in entries:
        build, audited = commands(entry, defaults, args.out)
        listing.append({"name": entry["name"], "part": entry["part"], "dataset": entry["dataset"], "model": str(audited),
                        "poisoned": "clean" not in entry, "attack": entry.get("attack"), "trigger": entry.get("trigger"),
                        "target": entry.get("target"), "victim": entry.get("victim") or entry.get("clean")})
        if not ((args.part and entry["part"] != args.part) or (args.only and entry["name"] not in args.only)):
            builds.append(build)
    if not args.dry_run:  # written first (atomically), so that audits of the built models can start while the rest build
        write_text(args.out / "zoo.json", json.dumps(listing, indent=2) + "\n")
    for build in builds:
        for command in build:
            print(shlex.join(command), flush=True)
            if not args.dry_run and not done(command):
                subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
