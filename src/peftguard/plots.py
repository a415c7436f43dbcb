"""Plots of a grid's results (PNG): confidence histograms, threshold sweep, ROC curves, attack ASR."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402



def write_plots(cells: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    written = []
    for plot in (confidence_histograms, psim_confidence, threshold_sweep, roc_curves, attack_asr_per_method):
        path = plot(cells, out_dir)
        if path is not None:
            written.append(path)
    return written


def save_figure(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG atomically (temporary name, then rename) and close it."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def _detector_cells(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in cells if c["row"] in ("defense", "defense_clean") and c["metrics"].get("confidence_histogram")]


def confidence_histograms(cells: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """PSIM confidence of clean vs triggered samples in the paper's Table 12 bins (one panel per attack)."""
    by_attack: dict[str, dict[str, Any]] = {}
    for cell in _detector_cells(cells):
        by_attack.setdefault(f"{cell['model']} {cell['dataset']} {cell['attack']}", cell)
    if not by_attack:
        return None
    fig, axes = plt.subplots(1, len(by_attack), figsize=(4.5 * len(by_attack), 3.4), squeeze=False)
    for ax, (title, cell) in zip(axes[0], by_attack.items()):
        hist = cell["metrics"]["confidence_histogram"]
        x = np.arange(len(hist["clean"]["bins"]))
        ax.bar(x - 0.2, hist["clean"]["shares"], 0.4, label="clean")
        ax.bar(x + 0.2, hist["triggered"]["shares"], 0.4, label="triggered")
        ax.set_xticks(x, hist["clean"]["bins"], rotation=45, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("share of samples")
        ax.legend(fontsize=7)
    return save_figure(fig, out_dir / "confidence_histograms.png")


def psim_confidence(cells: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """Each sample's PSIM confidence, clean vs triggered, with every gamma the grid used (calibrated
    and fixed): where the threshold falls between the two populations (one panel per attack)."""
    panels: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for cell in cells:
        psim_row = cell["row"] == "defense" and cell.get("defense") == "psim"
        if psim_row and cell.get("scores") and "gamma" in cell["metrics"]:
            panels[f"{cell['model']} {cell['dataset']} {cell['attack']}"].append(cell)
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), squeeze=False)
    for ax, (title, group) in zip(axes[0], panels.items()):
        clean, triggered = (np.asarray(group[0]["scores"][part], dtype=float) for part in ("clean", "triggered"))
        low = min([0.5, *clean, *triggered])
        bins = np.linspace(low, 1.0, 41)
        ax.hist(clean, bins=bins, alpha=0.6, label=f"clean (n={len(clean)})")
        ax.hist(triggered, bins=bins, alpha=0.6, label=f"triggered (n={len(triggered)})")
        gammas = {cell["metrics"]["gamma"]: _gamma_label(cell) for cell in group}
        for style, (gamma, label) in zip(("--", ":", "-.", "-"), sorted(gammas.items())):
            ax.axvline(gamma, color="k", linestyle=style, label=f"{label} {gamma:.3f}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("PSIM confidence (max softmax probability)")
        ax.set_ylabel("samples")
        ax.legend(fontsize=7)
    return save_figure(fig, out_dir / "psim_confidence.png")


def _gamma_label(cell: dict[str, Any]) -> str:
    choice = cell["metrics"].get("defense", {}).get("gamma_choice", {})
    return "fixed gamma" if choice.get("how") == "fixed" else "calibrated gamma"


def threshold_sweep(cells: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """Defended CA and ASR against a swept gamma (paper Figure 3(d)), one line per method."""
    swept = [c for c in cells if c["row"] == "defense" and c.get("evaluate.gamma") is not None]  # null: calibrated
    if not swept:
        return None
    series: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for cell in swept:
        m = cell["metrics"]
        series[cell["method"]].append((cell["evaluate.gamma"], 100 * m["defended_clean_accuracy"], 100 * m["defended_attack_success_rate"]))
    fig, (ax_ca, ax_asr) = plt.subplots(1, 2, figsize=(9, 3.4))
    for method, points in sorted(series.items()):
        points.sort()
        gammas, cas, asrs = zip(*points)
        ax_ca.plot(gammas, cas, marker="o", label=method)
        ax_asr.plot(gammas, asrs, marker="o", label=method)
    for ax, name in ((ax_ca, "defended CA (%)"), (ax_asr, "defended ASR (%)")):
        ax.set_xlabel("gamma")
        ax.set_ylabel(name)
        ax.legend(fontsize=7)
    return save_figure(fig, out_dir / "threshold_sweep.png")


def roc_curves(cells: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """ROC of each detector's score (clean = negative, triggered = positive)."""
    curves = {}
    for cell in cells:
        scores = cell.get("scores")
        if cell["row"] != "defense" or not scores or not scores["triggered"]:
            continue
        label = f"{cell['defense']} {cell['attack']} ({cell['method']})"
        y = np.r_[np.zeros(len(scores["clean"])), np.ones(len(scores["triggered"]))]
        curves.setdefault(label, roc_curve(y, np.r_[scores["clean"], scores["triggered"]])[:2] + (cell["metrics"].get("auroc"),))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    for label, (fpr, tpr, auc) in sorted(curves.items()):
        ax.plot(fpr, tpr, label=f"{label}, AUROC {auc:.3f}" if auc is not None else label)
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set_xlabel("false-positive rate (clean flagged)")
    ax.set_ylabel("detection rate (triggered flagged)")
    ax.legend(fontsize=6)
    return save_figure(fig, out_dir / "roc_curves.png")


def attack_asr_per_method(cells: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """Undefended ASR of each fine-tuning method, per attack (the paper's PEFT-vs-full contrast)."""
    attack = [c for c in cells if c["row"] == "attack" and c["metrics"].get("attack_success_rate") is not None]
    if not attack:
        return None
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for cell in attack:
        values[cell["attack"]][cell["method"]].append(100 * cell["metrics"]["attack_success_rate"])
    methods = sorted({c["method"] for c in attack})
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(methods) * len(values), 3.4))
    width = 0.8 / len(values)
    for i, (name, per_method) in enumerate(sorted(values.items())):
        ax.bar(np.arange(len(methods)) + i * width, [np.mean(per_method.get(m, [np.nan])) for m in methods], width, label=name)
    ax.set_xticks(np.arange(len(methods)) + width * (len(values) - 1) / 2, methods)
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir / "attack_asr_per_method.png")
