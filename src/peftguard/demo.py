"""``peftguard demo``: the paper's Table 1 on the embedded defaults, end to end.

MiniLM, SST-2, BadNet, full data knowledge: fine-tune the clean model with the five methods
(Normal row), poison it once, fine-tune the poisoned model with the five methods (Attack row),
train one PSIM on the poisoned weights and put it in front of every victim (Defense rows, with
the calibrated gamma and with the paper's fixed 0.7). ``defenses`` adds one Defense row per baseline
(ONION, back-translation, SCPD, Fine-mixing) measured on the same victims and test subset.

Finished stages are reused when the demo is rerun into the same folder with the same settings.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer

from peftguard.artifacts import read_json, write_json, write_text
from peftguard.data import TextDataset, load_dataset, subsample
from peftguard.defenses.psim import PAPER_GAMMA, PSIM, PSIMDefense, train_psim
from peftguard.defenses.psim_budget import DEFAULT_PSIM_LR, BudgetRule
from peftguard.defenses.registry import DEFENSES, make_options
from peftguard.errors import OptionError, PeftguardError
from peftguard.evaluation import EvalSettings, evaluate
from peftguard.pipeline import evaluate_model, load_model
from peftguard.poisoning import MANIFEST as POISON_MANIFEST
from peftguard.poisoning import PoisonSpec, poison_weights
from peftguard.provenance import versions
from peftguard.training import TrainSettings
from peftguard.triggers import build_triggers, triggered_test_set
from peftguard.tuning import METHODS as METHOD_REGISTRY
from peftguard.tuning import method_config
from peftguard.victims import MANIFEST as VICTIM_MANIFEST
from peftguard.victims import finetune

METHODS = list(METHOD_REGISTRY.names())
BASELINES = [name for name in DEFENSES if name != "psim"]


@dataclass(frozen=True)
class DemoConfig:
    dataset: str = "sst2"
    attack: str = "badnet"
    model: str = "minilm"
    max_train_samples: int = 2000
    max_eval_samples: int | None = None
    epochs: int = 2
    poison_epochs: int = 3
    poison_lr: float = 5e-5
    poison_rate: float = 0.2
    psim_epochs: int | None = None  # None: the clean-data budget rule
    psim_lr: float = DEFAULT_PSIM_LR
    target_label: int = 0
    seed: int = 0
    methods: tuple[str, ...] = tuple(METHODS)
    max_length: int = 128


DEMO_MARKER = "demo_config.json"  # what makes a folder a demo run (written first, so a killed demo resumes)


def run_demo(out: Path, *, data_dir: Path | None = None, baselines: tuple[str, ...] = (), **overrides: Any) -> dict[str, Any]:
    """Run (or resume) the demo into ``out``; ``baselines`` are extra defenses, each one more Defense row.

    The baselines are not part of the demo's identity: adding one to a finished demo only adds its rows.
    """
    config = DemoConfig(**overrides)
    _check_methods(config.methods)
    baselines = expand_baselines(baselines)
    out = Path(out)
    _start_or_resume(out, config)
    data = load_dataset(config.dataset, data_dir=data_dir)
    started = time.perf_counter()
    if config.max_train_samples < len(data.train):
        typer.echo(f"demo: training on {config.max_train_samples} of {len(data.train)} {config.dataset} training samples "
                   "(subsampled to finish within 45 minutes on 2 CPU cores)")
    trigger = build_triggers([config.attack], dataset=data)[0]
    eval_settings = EvalSettings(max_length=config.max_length, seed=config.seed)
    test = subsample(data.test.examples, config.max_eval_samples, config.seed)

    normal = {m: _victim(out / "normal" / m, config.model, data, m, config) for m in config.methods}
    poisoned_dir = out / "poisoned"
    if not (poisoned_dir / POISON_MANIFEST).is_file():
        typer.echo("demo: poisoning the model")
        spec = PoisonSpec(target_label=config.target_label, poison_count=None, poison_rate=config.poison_rate)
        settings = TrainSettings(epochs=config.poison_epochs, lr=config.poison_lr, max_length=config.max_length, seed=config.seed)
        poison_weights(config.model, data, [trigger], spec, settings, poisoned_dir,
                       max_train_samples=config.max_train_samples, max_eval_samples=config.max_eval_samples)
    attacked = {m: _victim(out / "attack" / m, str(poisoned_dir), data, m, config) for m in config.methods}
    psim_dir = out / "psim"
    if not (psim_dir / "psim.json").is_file():
        typer.echo("demo: training the PSIM on the poisoned weights")
        psim_settings = TrainSettings(epochs=config.psim_epochs or 1, lr=config.psim_lr, max_length=config.max_length, seed=config.seed)
        train_psim(str(poisoned_dir), data, psim_settings, psim_dir, budget=None if config.psim_epochs else BudgetRule(),
                   max_train_samples=config.max_train_samples, max_eval_samples=config.max_eval_samples)
    psim = PSIM(psim_dir)
    calibrated = PSIMDefense(psim, psim.gamma_for(None, None, None))
    paper = PSIMDefense(psim, psim.gamma_for(None, PAPER_GAMMA, None))

    metrics: dict[str, Any] = {"normal": {}, "attack": {}, "defense": {}, "defense_paper_gamma": {}}
    metrics["poisoned_model"] = _evaluate(out / "poisoned", poisoned_dir, data, test, trigger, config, eval_settings, None)
    for m in config.methods:
        metrics["normal"][m] = _evaluate(out / "normal" / m, normal[m], data, test, trigger, config, eval_settings, None)
        metrics["attack"][m] = _evaluate(out / "attack" / m, attacked[m], data, test, trigger, config, eval_settings, None)
        metrics["defense"][m] = _evaluate(out / "defense" / m, attacked[m], data, test, trigger, config, eval_settings, calibrated)
        metrics["defense_paper_gamma"][m] = _evaluate(out / "defense_paper_gamma" / m, attacked[m], data, test, trigger, config, eval_settings, paper)
    for name in baselines:
        metrics[f"defense-{name}"] = {m: _evaluate_baseline(out, name, attacked[m], data, [trigger], config) for m in config.methods}
    clean_scores = psim.confidences([ex.text for ex in test])
    triggered = triggered_test_set(test, trigger, target_label=config.target_label, seed=config.seed)
    triggered_scores = psim.confidences([ex.text for ex in triggered])
    _plot_histogram(out / "psim_confidence.png", clean_scores, triggered_scores, calibrated.choice.gamma)
    results = {
        "config": asdict(config),
        "baselines": list(baselines),
        "train_samples": min(config.max_train_samples, len(data.train)),
        "test_samples": len(test),
        "gamma": calibrated.choice.as_dict(),
        "metrics": metrics,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "versions": versions(),
    }
    write_json(out / "results.json", results)
    table = render_table(results)
    write_text(out / "results.md", table)
    typer.echo(table)
    return results


def _check_methods(methods: tuple[str, ...]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise OptionError(f"--method {', '.join(unknown) or '(none)'}: choose one or more of {', '.join(METHODS)}")


def expand_baselines(names: tuple[str, ...]) -> tuple[str, ...]:
    """``all`` → every baseline; ``psim`` is always in the table; unknown names are an error."""
    chosen = BASELINES if "all" in names else [n for n in names if n != "psim"]
    unknown = [n for n in chosen if n not in BASELINES]
    if unknown:
        raise OptionError(f"--defense {', '.join(unknown)}: choose from {', '.join(BASELINES)}, or all")
    return tuple(dict.fromkeys(chosen))


def _evaluate_baseline(out: Path, name: str, victim: str, data: TextDataset, triggers: list, config: DemoConfig) -> dict[str, Any]:
    """One baseline in front of one victim, with its defaults; a refusal (e.g. no SCPD paraphrases
    for this attack) is kept as the row's reason instead of stopping the demo."""
    path = out / f"defense-{name}" / Path(victim).name / "metrics.json"
    if path.is_file():
        return read_json(path)
    options = make_options(name, {
        "onion": {"cache": out / "onion_perplexities.json"},  # the LM pass is shared by all victims
        "fine-mixing": {"fine_mixed": path.parent / "fine-mixed", "max_train_samples": config.max_train_samples},
    }.get(name, {}))
    typer.echo(f"demo: {name} in front of attack/{Path(victim).name}")
    try:
        result = evaluate_model(victim, data, triggers, target_label=config.target_label, defense=name,
                                max_eval_samples=config.max_eval_samples, max_length=config.max_length,
                                seed=config.seed, defense_options=options)
    except PeftguardError as error:
        typer.echo(f"demo: {name} not measured: {error}", err=True)
        return {"error": str(error)}
    write_json(path, result)
    return result


def _start_or_resume(out: Path, config: DemoConfig) -> None:
    marker = out / DEMO_MARKER
    # settings added since an older demo wrote its marker count as their defaults
    if marker.is_file() and {**_as_json(DemoConfig()), **read_json(marker)} != _as_json(config):
        raise typer.BadParameter(f"{out} holds a demo with other settings; choose another --out or remove it")
    write_json(marker, asdict(config))


def _as_json(config: DemoConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config)))


def _victim(folder: Path, base: str, data: TextDataset, method: str, config: DemoConfig) -> str:
    if not (folder / VICTIM_MANIFEST).is_file():
        typer.echo(f"demo: fine-tuning {folder.parent.name}/{method}")
        method_cfg = method_config(method)
        settings = TrainSettings(epochs=config.epochs, lr=method_cfg.lr, max_length=config.max_length, seed=config.seed)
        finetune(base, data, method_cfg, settings, folder,
                 max_train_samples=config.max_train_samples, max_eval_samples=config.max_eval_samples)
    return str(folder)


def _evaluate(folder: Path, model_dir: Any, data: TextDataset, test: list, trigger: Any, config: DemoConfig,
              settings: EvalSettings, defense: PSIMDefense | None) -> dict[str, Any]:
    path = folder / "metrics.json"
    if path.is_file():
        return read_json(path)
    model, tokenizer, _ = load_model(str(model_dir), data.num_labels)
    result = evaluate(model, tokenizer, test, [trigger], target_label=config.target_label, settings=settings, defense=defense)
    if defense is not None:
        result["gamma"] = defense.choice.gamma
    write_json(path, result)
    return result


def render_table(results: dict[str, Any]) -> str:
    """The paper's Table 1 layout: rows Normal / Attack / Defense, CA and ASR per method."""
    m = results["metrics"]
    gamma = results["gamma"]["gamma"]
    methods = results["config"].get("methods", METHODS)
    header = "| Row | " + " | ".join(f"{x} CA | {x} ASR" for x in methods) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(methods))]

    def pct(value: Any) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    def row(name: str, key: str, ca: str, asr: str | None) -> str:
        cells = [f"{pct(m[key][x].get(ca))} | {pct(m[key][x].get(asr)) if asr else '-'}"
                 if "error" not in m[key][x] else "n/a | n/a" for x in methods]
        return f"| {name} | " + " | ".join(cells) + " |"

    lines.append(row("Normal", "normal", "clean_accuracy", None))
    lines.append(row("Attack", "attack", "clean_accuracy", "attack_success_rate"))
    lines.append(row(f"Defense (PSIM, gamma {gamma:.3f} calibrated)", "defense", "defended_clean_accuracy", "defended_attack_success_rate"))
    lines.append(row(f"Defense (PSIM, gamma {PAPER_GAMMA} paper)", "defense_paper_gamma", "defended_clean_accuracy", "defended_attack_success_rate"))
    for name in results.get("baselines", []):
        lines.append(row(f"Defense ({name})", f"defense-{name}", "defended_clean_accuracy", "defended_attack_success_rate"))
    poisoned = m["poisoned_model"]
    defense = m["defense"][methods[0]]
    paper = m["defense_paper_gamma"][methods[0]]
    c = results["config"]
    notes = [
        "",
        f"Model {c['model']}, dataset {c['dataset']}, attack {c['attack']} (target label {c['target_label']}), "
        f"full data knowledge; {results['train_samples']} training samples, {results['test_samples']} test samples, seed {c['seed']}.",
        f"Poisoned model before fine-tuning: CA {pct(poisoned['clean_accuracy'])}, ASR {pct(poisoned['attack_success_rate'])}.",
        f"PSIM detection (calibrated gamma {gamma:.4f}, target FPR {results['gamma'].get('target_fpr')} on clean dev): "
        f"FPR {pct(defense['false_positive_rate'])}, detection rate {pct(defense['detection_rate'])}, AUROC {defense['auroc']:.4f}.",
        f"PSIM detection (paper gamma {PAPER_GAMMA}): FPR {pct(paper['false_positive_rate'])}, detection rate {pct(paper['detection_rate'])}.",
        *_baseline_notes(results),
        f"Wall time {results['wall_seconds']} s; versions {results['versions']}.",
    ]
    return "\n".join(lines + notes) + "\n"


def _baseline_notes(results: dict[str, Any]) -> list[str]:
    """Each baseline's settings and cost (from its first victim), or why it was not measured."""
    notes = []
    for name in results.get("baselines", []):
        first = next(iter(results["metrics"][f"defense-{name}"].values()))
        if "error" in first:
            notes.append(f"{name}: not measured ({first['error']}).")
            continue
        timing = first.get("defense_timing", {})
        notes.append(f"{name}: {json.dumps(first.get('defense', {}), sort_keys=True)}; "
                     f"{timing.get('seconds', '?')} s, {timing.get('samples_per_second', '?')} samples/s on the first victim.")
    return notes


def _plot_histogram(path: Path, clean: np.ndarray, triggered: np.ndarray, gamma: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(min(clean.min(), triggered.min(), 0.5), 1.0, 41)
    ax.hist(clean, bins=bins, alpha=0.6, label=f"clean (n={len(clean)})")
    ax.hist(triggered, bins=bins, alpha=0.6, label=f"triggered (n={len(triggered)})")
    ax.axvline(gamma, color="k", linestyle="--", label=f"calibrated gamma {gamma:.3f}")
    ax.axvline(PAPER_GAMMA, color="gray", linestyle=":", label=f"paper gamma {PAPER_GAMMA}")
    ax.set_xlabel("PSIM confidence (max softmax probability)")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
