"""Reports of a grid run: the paper's table layout (Markdown, CSV, LaTeX) and plots (PNG).

Every number comes from the run's ``metrics.json`` files, through ``cells.json``. Rows follow the
paper: Normal (clean model fine-tuned), Attack (poisoned then fine-tuned), Defense (behind a
defense), Defense_clean (clean model behind PSIM); columns are CA and ASR per fine-tuning method.
Over several seeds a cell shows mean ± standard deviation.
"""
from __future__ import annotations

import csv
import io
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from peftguard.artifacts import read_json, write_text
from peftguard.experiment import CELLS_FILE
from peftguard.stage_names import stage_dir

log = logging.getLogger(__name__)

ROW_ORDER = {"normal": 0, "attack": 1, "defense": 2, "defense_clean": 3, "poisoned": 4}
ROW_LABELS = {"normal": "Normal", "attack": "Attack", "defense": "Defense", "defense_clean": "Defense_clean",
              "poisoned": "Poisoned (before fine-tuning)"}
GROUP_KEYS = ("model", "dataset", "attack", "scenario")
SWEPT_SECTIONS = ("victim.", "psim.", "evaluate.")  # cell axes that a config's sweep adds
# What a swept null stands for, where "default" would not say it.
NULL_LABELS = {"evaluate.gamma": "calibrated", "psim.epochs": "budget rule", "victim.lr": "method default"}


def load_cells(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's plan and its finished cells, each with its metrics."""
    plan = read_json(run_dir / CELLS_FILE)
    cells = []
    for cell in plan["cells"]:
        folder = stage_dir(run_dir, cell["stage"])
        if (folder / "metrics.json").is_file():
            scores = folder / "scores.json"
            cells.append({**cell, "metrics": read_json(folder / "metrics.json"),
                          "scores": read_json(scores) if scores.is_file() else None})
    return plan, cells


def cell_values(cell: dict[str, Any]) -> tuple[float, float | None] | None:
    """(CA, ASR) as the paper's row reports them, in percent; None for a defense that refused the cell."""
    m = cell["metrics"]
    if "refused" in m:
        return None
    if cell["row"] in ("defense", "defense_clean"):
        ca, asr = m.get("defended_clean_accuracy"), m.get("defended_attack_success_rate")
    else:
        ca, asr = m["clean_accuracy"], m.get("attack_success_rate")
    return 100 * ca, None if cell["row"] == "normal" or asr is None else 100 * asr


def row_label(cell: dict[str, Any]) -> str:
    label = ROW_LABELS[cell["row"]]
    if cell["row"] == "defense" and cell.get("defense") not in (None, "psim"):
        label += f" ({cell.get('defense_setting') or cell['defense']})"  # a run planned before settings were named: the name
    extras = [f"{k.split('.', 1)[1]}={_swept_value(k, v)}" for k, v in cell.items() if k.startswith(SWEPT_SECTIONS)]
    return label + (f" [{', '.join(extras)}]" if extras else "")


def method_order(method: str) -> tuple[int, str]:
    """Columns follow the method registry's order; a method no longer registered goes last."""
    from peftguard.methods import METHODS

    names = METHODS.names()
    return (names.index(method) if method in names else len(names), method)


def _swept_value(key: str, value: Any) -> str:
    return NULL_LABELS.get(key, "default") if value is None else str(value)


def _sortable(value: Any) -> tuple[int, Any]:
    """Swept values in order, a null (the default) first."""
    return (0, "") if value is None else (1, value)


def paper_table(cells: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: group keys, row label, then CA and ASR per method (mean ± sd over seeds).

    A cell without a method (the poisoned model before fine-tuning) fills its row's every column:
    each method's victim starts from those weights.
    """
    methods = sorted({c["method"] for c in cells if c["method"]}, key=method_order)
    values: dict[tuple, dict[str, list[tuple[float, float | None] | None]]] = defaultdict(lambda: defaultdict(list))
    order: dict[tuple, tuple] = {}
    for cell in cells:
        key = (*(cell[k] for k in GROUP_KEYS), row_label(cell))
        for method in [cell["method"]] if cell["method"] else methods:
            values[key][method].append(cell_values(cell))
        swept = tuple(_sortable(cell[k]) for k in sorted(cell) if k.startswith(SWEPT_SECTIONS))
        order.setdefault(key, (*(str(cell[k]) for k in GROUP_KEYS), ROW_ORDER[cell["row"]], cell.get("defense") or "", swept))
    header = [*GROUP_KEYS, "row"] + [f"{m} {what}" for m in methods for what in ("CA", "ASR")]
    rows = []
    for key in sorted(values, key=lambda k: order[k]):
        row = [str(part) for part in key]
        for method in methods:
            measured = values[key].get(method, [])
            pairs = [p for p in measured if p is not None]
            if measured and not pairs:
                row += ["n/a", "n/a"]
                continue
            row += [_stat([p[0] for p in pairs]), _stat([p[1] for p in pairs if p[1] is not None])]
        rows.append(row)
    return header, rows


def _stat(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{np.mean(xs):.2f}" if len(xs) == 1 else f"{np.mean(xs):.2f} ± {np.std(xs, ddof=1):.2f}"


def long_rows(cells: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """One row per cell with every axis and metric, for analysis (CSV)."""
    axes = sorted({k for c in cells for k in c if k not in ("metrics", "scores", "stage")})
    metrics = ["clean_accuracy", "attack_success_rate", "defended_clean_accuracy", "defended_attack_success_rate",
               "false_positive_rate", "detection_rate", "auroc", "gamma"]
    rows = [[c.get(a, "") for a in axes] + [c["metrics"].get(m, "") for m in metrics] + [defense_seconds_per_1000(c), c["stage"]]
            for c in cells]
    return axes + metrics + ["defense_seconds_per_1000_inputs", "stage"], rows


def defense_seconds_per_1000(cell: dict[str, Any]) -> float | str:
    """Wall seconds the defense took per 1,000 of this cell's clean and triggered inputs ("" without a defense).

    Input defenses: screening or rewriting the inputs (calibration excluded). Model-level defenses (fine-mixing,
    fine-pruning): making the defended victim plus evaluating it, over the same inputs (``defend_seconds`` apart)."""
    timing = cell["metrics"].get("defense_timing") or {}
    rate = timing.get("samples_per_second")
    return round(1000 / rate, 2) if rate else ""


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]) + "\n"


def latex(header: list[str], rows: list[list[str]]) -> str:
    def esc(text: Any) -> str:
        return str(text).replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&").replace("±", r"$\pm$")

    lines = [r"\begin{tabular}{" + "l" * len(GROUP_KEYS) + "l" + "r" * (len(header) - len(GROUP_KEYS) - 1) + "}", r"\toprule",
             " & ".join(esc(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(x) for x in row) + r" \\" for row in rows]
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"


def csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def context_lines(run_dir: Path, plan: dict[str, Any], cells: list[dict[str, Any]]) -> list[str]:
    """Model, data sizes, seeds and versions, stated with every report."""
    config = read_json(run_dir / "config.json")
    versions = next((c["metrics"].get("versions") for c in cells if c["metrics"].get("versions")), None)
    stage_versions = _any_stage_versions(run_dir)
    return [
        f"Experiment `{plan['name']}`" + (f" (paper {plan['table']})" if plan.get("table") else ""),
        f"Models {config['grid']['models']}; datasets {config['grid']['datasets']}; seeds {config['grid']['seeds']}.",
        f"Training samples per stage {config['data']['max_train_samples']}; evaluation samples "
        f"{config['data']['max_eval_samples'] or 'all'}; poisoning {config['poison']}; victim {config['victim']}; "
        f"PSIM {config['psim']}; evaluation {config['evaluate']}; sweep {config['sweep'] or 'none'}.",
        f"Versions {versions or stage_versions}.",
        *(f"n/a: {c['defense']} refused {c['attack']}: {c['metrics']['refused']}" for c in cells if "refused" in c["metrics"]),
        *detection_lines(cells),
        *selection_lines(cells),
        f"{len(cells)} of {len(plan['cells'])} cells finished. CA/ASR in percent; Defense rows are the paper's "
        "defended figures (a flagged clean sample counts as wrong, a flagged triggered sample as a failed attack).",
    ]


def detection_lines(cells: list[dict[str, Any]]) -> list[str]:
    """Per detector row, its first cell's threshold and detection figures (the table shows CA/ASR only)."""
    firsts: dict[tuple, dict[str, Any]] = {}
    for cell in cells:
        if cell["row"] in ("defense", "defense_clean") and "false_positive_rate" in cell["metrics"]:
            firsts.setdefault((*(cell[k] for k in GROUP_KEYS), row_label(cell)), cell)
    lines = []
    for key, cell in firsts.items():
        m = cell["metrics"]
        gamma = f"gamma {m['gamma']:.4f}, " if m.get("gamma") is not None else ""
        auroc = f", AUROC {m['auroc']:.4f}" if m.get("auroc") is not None else ""
        detection = 100 * m.get("detection_rate", float("nan"))
        lines.append(f"{key[-1]} ({' '.join(str(k) for k in key[:-1])}, {cell['method']}): {gamma}"
                     f"FPR {100 * m['false_positive_rate']:.2f}, detection rate {detection:.2f}{auroc}.")
    return lines


def selection_lines(cells: list[dict[str, Any]]) -> list[str]:
    """Per cell of a defense that chose a setting on clean dev data (Fine-mixing's ratio), what it chose and why."""
    lines = []
    for cell in cells:
        record = cell["metrics"].get("defense")
        selection = record.get("selection") if isinstance(record, dict) else None
        if selection:
            tried = ", ".join(f"{t['mix_ratio']:g}: {t['dev_accuracy']:.4f}" for t in selection["tried"])
            lines.append(f"{row_label(cell)} ({' '.join(str(cell[k]) for k in GROUP_KEYS)}, {cell['method']}, seed "
                         f"{cell['seed']}): mix ratio {selection['chosen']:g} chosen on clean dev ({selection['criterion']}; "
                         f"victim dev accuracy {selection['victim_dev_accuracy']:.4f}; tried {tried}).")
    return lines


def _any_stage_versions(run_dir: Path) -> Any:
    for manifest in sorted((run_dir / "stages").glob("*/artifact/*.json")):
        data = read_json(manifest)
        if isinstance(data, dict) and "versions" in data:
            return data["versions"]
    return "unknown"


REPORT_MARKER = "cells.csv"  # a report folder holds it; no user's folder is likely to
RECORD_TABLE = "table.md"  # a results record's table: REPRODUCTION.md quotes its rows (tests/test_results_record.py)


def finished_cells(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """:func:`load_cells`, refusing a run with no finished cell."""
    plan, cells = load_cells(run_dir)
    if not cells:
        from peftguard.errors import PeftguardError

        raise PeftguardError(f"{run_dir}: no finished cells yet (run `peftguard run` first)")
    return plan, cells


def results_markdown(run_dir: Path, plan: dict[str, Any], cells: list[dict[str, Any]]) -> str:
    """The report's results.md: the run's context, then the paper-layout table."""
    intro = "\n".join(f"- {line}" for line in context_lines(run_dir, plan, cells))
    return f"# {plan['name']}\n\n{intro}\n\n{markdown(*paper_table(cells))}"


def write_report(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write results.{md,csv,tex} (+ cells.csv) and the plots; return the files written."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir / "report")
    out_dir.mkdir(parents=True, exist_ok=True)
    plan, cells = finished_cells(run_dir)
    header, rows = paper_table(cells)
    written = []
    for name, text in (("results.md", results_markdown(run_dir, plan, cells)),
                       ("results.csv", csv_text(header, rows)),
                       ("results.tex", latex(header, rows)),
                       ("cells.csv", csv_text(*long_rows(cells)))):
        write_text(out_dir / name, text)
        written.append(out_dir / name)
    from peftguard.extras import available, install_hint

    if not available("matplotlib"):  # the tables are the results; the PNGs only draw them
        log.warning("plots skipped: matplotlib is not installed (%s)", install_hint("matplotlib"))
        return written
    from peftguard import plots

    written += plots.write_plots([c for c in cells if "refused" not in c["metrics"]], out_dir)
    return written


def write_record(run_dir: Path, dest: Path) -> list[Path]:
    """The compact, committable record of a run: ``table.md`` (the report's results.md: the run's context and the
    paper-layout table), ``cells.csv`` (every cell and metric) and ``cells/<cell>.json`` (each cell's axes and
    metrics, without per-input scores), named by the axes that vary within the run, e.g. ``lora-psim.json``."""
    dest = Path(dest)
    plan, cells = finished_cells(Path(run_dir))
    written = []
    for name, text in ((RECORD_TABLE, results_markdown(Path(run_dir), plan, cells)), ("cells.csv", csv_text(*long_rows(cells)))):
        write_text(dest / name, text)
        written.append(dest / name)
    from peftguard.artifacts import write_json

    for name, cell in zip(cell_file_names(cells), cells):
        write_json(dest / "cells" / f"{name}.json", {"cell": {k: v for k, v in cell.items() if k not in ("metrics", "scores")},
                                                      "metrics": cell["metrics"]})
        written.append(dest / "cells" / f"{name}.json")
    return written


def cell_file_names(cells: list[dict[str, Any]]) -> list[str]:
    """One readable, unique name per cell: the values of the axes that differ between cells (the stage if need be)."""
    axes = sorted({k for c in cells for k in c if k not in ("metrics", "scores", "stage")}, key=_axis_order)
    varying = [a for a in axes if len({str(c.get(a)) for c in cells}) > 1]
    for chosen in ([a for a in varying if a not in ("row", "defense_setting")], varying):  # these follow from the defense
        names = ["-".join(_axis_value(a, c.get(a)) for a in chosen) or "cell" for c in cells]
        if len(set(names)) == len(names):
            return names
    return [f"{n}-{c['stage']}" for n, c in zip(names, cells)]


def _axis_order(axis: str) -> tuple[int, str]:
    order = ("model", "dataset", "attack", "scenario", "method", "defense", "row", "seed")
    return (order.index(axis), axis) if axis in order else (len(order), axis)


def _axis_value(axis: str, value: Any) -> str:
    text = f"s{value}" if axis == "seed" else (f"{axis.split('.')[-1]}={value}" if "." in axis else str(value))
    return "".join(ch if ch.isalnum() or ch in "-=._" else "_" for ch in text)
