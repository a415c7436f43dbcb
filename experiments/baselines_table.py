"""Print the baseline comparison written by experiments/baselines.sh as Markdown tables.

Usage: python experiments/baselines_table.py runs/baselines
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

METHODS = ["full", "lora", "prompt", "ptuning-v1", "ptuning-v2"]
ROWS = [
    ("none", "Attack (no defense)"),
    ("onion", "ONION (SmolLM2, bar 0)"),
    ("back-translation-apertium", "Back-translation (apertium eng-spa-eng)"),
    ("back-translation-precomputed", "Back-translation (precomputed, PSIM authors')"),
    ("scpd-precomputed", "SCPD (precomputed SCPN, PSIM authors')"),
    ("fine-mixing", "Fine-mixing (ratio 0.5)"),
    ("fine-mixing-0.2", "Fine-mixing (ratio 0.2)"),
    ("psim", "PSIM (calibrated gamma)"),
]


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def load(folder: Path, name: str) -> dict | str | None:
    if (folder / f"{name}.json").is_file():
        return json.loads((folder / f"{name}.json").read_text())
    if (folder / f"{name}.error").is_file():
        return "n/a"
    return None


def cells(record: dict | str | None, name: str) -> tuple[str, str]:
    if record is None:
        return "", ""
    if isinstance(record, str):
        return record, record
    if name == "none":
        return pct(record["clean_accuracy"]), pct(record.get("attack_success_rate"))
    return pct(record["defended_clean_accuracy"]), pct(record.get("defended_attack_success_rate"))


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/baselines")
    columns = [("badnet", m) for m in METHODS] + [("insent", "lora")]
    samples = next((r["clean_samples"] for a, m in columns for r in [load(out / a / m, "none")] if isinstance(r, dict)), "?")
    lines = [f"# Baselines against PSIM: MiniLM, SST-2 ({samples} test samples, seed 0), CA / ASR in %", ""]
    lines.append("| Defense | " + " | ".join(f"{a} {m} CA | {a} {m} ASR" for a, m in columns) + " |")
    lines.append("|---|" + "---|" * (2 * len(columns)))
    for name, label in ROWS:
        row = [c for a, m in columns for c in cells(load(out / a / m, name), name)]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines += ["", "Cost of each defense on the BadNet LoRA victim (defense_timing in metrics.json):", "",
              "| Defense | seconds | samples/s |", "|---|---|---|"]
    for name, label in ROWS[1:]:
        record = load(out / "badnet" / "lora", name)
        if name == "onion":  # the main runs reuse cached perplexities: take the uncached 40-sample run
            record, label = load(out / "badnet" / "lora", "onion-cost"), f"{label}, uncached, 40 test samples"
        if isinstance(record, dict):
            timing = record["defense_timing"]
            lines.append(f"| {label} | {timing['seconds']:.1f} | {timing['samples_per_second']:.2f} |")
    errors = sorted(out.glob("*/*/*.error"))
    if errors:
        lines += ["", "Refused (n/a):"] + [f"- {e.parent.parent.name} {e.parent.name} {e.stem}: {e.read_text().strip()}" for e in errors]
    sweep = load(out / "badnet" / "lora", "onion-sweep")
    if isinstance(sweep, dict):
        lines += ["", "ONION bar sweep, BadNet LoRA victim:", "", "| bar | CA | ASR |", "|---|---|---|"]
        lines += [f"| {s['setting'].split('=')[1]} | {pct(s['defended_clean_accuracy'])} | {pct(s.get('defended_attack_success_rate'))} |"
                  for s in sweep.get("sweep", [])]
    ratios = [(r, load(out / "badnet" / "lora", f"fine-mixing-{r}")) for r in ("0", "0.2", "0.5", "0.8")]
    ratios[2] = ("0.5", load(out / "badnet" / "lora", "fine-mixing"))
    if any(isinstance(rec, dict) for _, rec in ratios):
        lines += ["", "Fine-mixing ratio (share of weights kept from the poisoned model), BadNet LoRA victim:", "",
                  "| ratio | CA | ASR |", "|---|---|---|"]
        lines += [f"| {r} | {' | '.join(cells(rec, 'fine-mixing'))} |" for r, rec in ratios if isinstance(rec, dict)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
