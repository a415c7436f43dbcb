"""``peftguard demo``: the paper's Table 2 (full data knowledge) on the embedded defaults, end to end, as a grid config.

What the demo does is ``demo.yaml`` beside this module (MiniLM, SST-2, BadNet, full data knowledge; Normal,
poisoned-model, Attack and PSIM Defense rows at the calibrated and the paper's fixed gamma for the
five methods). This module only maps the command's options onto that config's keys and runs it
through the grid runner (``experiment``), so the demo's stages, resume and report are the grid's:
rerunning into the same folder reuses every finished stage, and adding a baseline defense adds only
its evaluation stages.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftguard.config import ExperimentConfig, load_config, registered_names
from peftguard.errors import DataError, OptionError

DEMO_CONFIG = Path(__file__).resolve().parent / "demo.yaml"  # package data: an installed peftguard has it too


def baseline_names() -> list[str]:
    """Defenses that may add a Defense row beside PSIM (the registry's, less PSIM)."""
    from peftguard.defenses.registry import DEFENSES

    return [name for name in DEFENSES if name != "psim"]


def expand_baselines(names: tuple[str, ...]) -> tuple[str, ...]:
    """``all`` → every baseline; ``psim`` is always in the table; unknown names are an error."""
    baselines = baseline_names()
    chosen = baselines if "all" in names else [n for n in names if n != "psim"]
    unknown = [n for n in chosen if n not in baselines]
    if unknown:
        raise OptionError(f"--defense {', '.join(unknown)}: choose from {', '.join(baselines)}, or all")
    return tuple(dict.fromkeys(chosen))


def demo_overrides(*, dataset: str | None = None, attack: str | None = None, model: str | None = None,
                   data_dir: Path | None = None, max_train_samples: int | None = None,
                   max_eval_samples: int | None = None, epochs: int | None = None, poison_epochs: int | None = None,
                   psim_epochs: int | None = None, methods: tuple[str, ...] = (), max_length: int | None = None,
                   seed: int | None = None) -> dict[str, Any]:
    """The demo's command-line options as config keys (an option not given keeps the config's value)."""
    given = {
        "grid.datasets": [dataset] if dataset else None,
        "grid.attacks": [attack] if attack else None,
        "grid.models": [model] if model else None,
        "grid.methods": list(methods) or None,
        "grid.seeds": [seed] if seed is not None else None,
        "data.data_dir": str(data_dir) if data_dir is not None else None,
        "data.max_train_samples": max_train_samples,
        "data.max_eval_samples": max_eval_samples,
        "victim.epochs": epochs,
        "poison.epochs": poison_epochs,
        "psim.epochs": psim_epochs,
        **{f"{section}.max_length": max_length for section in ("poison", "victim", "psim", "evaluate")},
    }
    return {key: value for key, value in given.items() if value is not None}


def demo_config(config_path: Path | None = None, baselines: tuple[str, ...] = (), **options: Any) -> ExperimentConfig:
    """The demo's config with the command's options applied and one Defense row per baseline added."""
    path = Path(config_path) if config_path is not None else DEMO_CONFIG
    if not path.is_file():
        raise DataError(path, "no such demo config; pass --config with a grid config")
    check_methods(options.get("methods", ()))
    overrides = demo_overrides(**options)
    config = load_config(path, overrides)
    extra = [name for name in expand_baselines(baselines) if name not in config.grid.defenses]
    return load_config(path, {**overrides, "grid.defenses": [*config.grid.defenses, *extra]}) if extra else config


def check_methods(methods: tuple[str, ...]) -> None:
    """Refuse an unknown ``--method`` by its option name, with the names a grid config accepts."""
    accepted = registered_names("methods")
    for method in methods:
        if method not in accepted:
            raise OptionError(f"--method {method}: unknown method; choose from {', '.join(accepted)}")


def run_demo(out: Path, config: ExperimentConfig, *, workers: int = 1, echo: Callable[[str], None] = print) -> str:
    """Run (or resume) the demo's grid into ``out``, write its report and return the report's table.

    ``workers`` > 1 runs that many stages at once in worker processes, sharing the cores between them."""
    from peftguard.experiment import plan_grid, run_on_this_machine, write_plan
    from peftguard.report import write_report

    out = Path(out)
    plan = plan_grid(config)
    write_plan(out, config, plan)  # first: it makes --out a run folder, so a killed demo resumes
    echo(f"{len(plan.stages)} stages, {len(plan.cells)} result cells; training on "
         f"{config.data.max_train_samples or 'all'} samples per stage (data.max_train_samples)")
    counts = run_on_this_machine(out, plan, workers=workers, echo=echo)
    echo(f"{counts['ran']} stages run, {counts['reused']} reused")
    write_report(out)
    return (out / "report" / "results.md").read_text(encoding="utf-8")
