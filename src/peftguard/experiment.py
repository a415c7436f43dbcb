"""Grids of runs: a config expands into stages with dependencies, each run once and reused.

Stages: ``poison`` (once per model × dataset × attack × scenario × seed) → ``victim`` (per method,
on the poisoned weights, and on the clean model for the Normal row) and ``psim`` (per PSIM setting)
→ ``evaluate`` (per victim × defense × evaluation setting). A stage's key is a hash of its full
settings and of its upstream keys, so a changed setting is recomputed and an unchanged one is
reused; a stage is finished when its ``stage.json`` exists (written last, atomically), so a
killed run resumes where it stopped.

``cells.json`` lists every result the grid asks for with its axis values; reports read it.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from peftguard.artifacts import read_json, write_json
from peftguard.config import METHOD_SETTINGS, ExperimentConfig
from peftguard.defenses.psim_budget import BudgetRule
from peftguard.errors import PeftguardError
from peftguard.stage_names import STAGE_FILE, STAGE_KINDS, Stage, is_stage_name, stage_dir

__all__ = ["CELLS_FILE", "STAGE_FILE", "Plan", "Stage", "StageError", "is_stage_name", "plan_grid", "run_local",
           "run_parallel", "run_ray", "stage_dir"]
log = logging.getLogger(__name__)
CELLS_FILE = "cells.json"


class StageError(PeftguardError):
    """Stages of a grid failed; the others finished and are kept."""


@dataclass
class Plan:
    stages: dict[str, Stage] = field(default_factory=dict)  # insertion order is a valid run order
    cells: list[dict[str, Any]] = field(default_factory=list)

    def add(self, stage: Stage) -> str:
        self.stages.setdefault(stage.name, stage)
        return stage.name


# --- planning --------------------------------------------------------------------------------

def plan_grid(config: ExperimentConfig) -> Plan:
    """Expand a config into stages and result cells."""
    plan = Plan()
    psim_variants = _variants(config, "psim")
    eval_variants = _variants(config, "evaluate")
    victim_variants = _variants(config, "victim")
    g = config.grid
    named = _defense_settings(config)
    for model, dataset, attack, scenario, seed in itertools.product(g.models, g.datasets, g.attacks, g.scenarios, g.seeds):
        attacks = [attack] if isinstance(attack, str) else list(attack)
        axes = {"model": model, "dataset": dataset, "attack": "+".join(attacks), "scenario": scenario, "seed": seed}
        poison = plan.add(_poison_stage(config, model, dataset, attacks, scenario, seed))
        if config.poisoned_model:  # the poisoned weights themselves, before anyone fine-tunes them
            _add_eval(plan, config, poison, None, "none", attacks, {}, {**axes, "method": None, "row": "poisoned"})
        psims = {tuple(v.items()): plan.add(_psim_stage(config, poison, dataset, seed, v)) for v in psim_variants}
        for method, victim_v in itertools.product(g.methods, victim_variants):
            method_axes = {**axes, "method": method, **_swept("victim", victim_v)}
            victim = plan.add(_victim_stage(config, poison, dataset, method, seed, victim_v))
            if config.victim.normal:
                normal = plan.add(_victim_stage(config, model, dataset, method, seed, victim_v))
                _add_eval(plan, config, normal, None, "none", attacks, {}, {**method_axes, "row": "normal"})
            for defense in g.defenses:
                for psim_v, psim_name in (psims.items() if defense == "psim" else [((), None)]):
                    for eval_v in _eval_variants_for(defense, eval_variants):
                        row = "attack" if defense == "none" else "defense"
                        cell = {**method_axes, "row": row, "defense": defense, **named.get(defense, {}),
                                **_swept("psim", dict(psim_v)), **_swept("evaluate", eval_v)}
                        _add_eval(plan, config, victim, psim_name, defense, attacks, eval_v, cell)
            if config.clean_model and config.victim.normal:  # the first PSIM setting, every evaluation setting
                clean_psim = plan.add(_psim_stage(config, model, dataset, seed, psim_variants[0]))
                normal = _victim_stage(config, model, dataset, method, seed, victim_v).name
                for eval_v in eval_variants:
                    _add_eval(plan, config, normal, clean_psim, "psim", attacks, eval_v,
                              {**method_axes, "row": "defense_clean", "defense": "psim", **_swept("evaluate", eval_v)})
    return plan


def _defense_settings(config: ExperimentConfig) -> dict[str, dict[str, str]]:
    """Per baseline defense, the backend and settings its report row names (``defense_setting``); PSIM's
    settings are the config's psim section, which every report states."""
    from peftguard.defenses.registry import setting_label

    return {name: {"defense_setting": setting_label(name, config.defense_options.get(name, {}))}
            for name in config.grid.defenses if name not in ("none", "psim")}


# Evaluation settings only the PSIM reads: another defense's cells do not cross their sweep.
PSIM_THRESHOLD_SETTINGS = ("gamma", "target_fpr")


def _eval_variants_for(defense: str, eval_variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluation settings a defense's cells cross: none undefended, PSIM every one, another
    defense those it reads (a gamma sweep would only repeat its evaluation)."""
    if defense == "none":
        return [{}]
    if defense == "psim":
        return eval_variants
    reduced = [{k: v for k, v in variant.items() if k not in PSIM_THRESHOLD_SETTINGS} for variant in eval_variants]
    return [dict(items) for items in dict.fromkeys(tuple(v.items()) for v in reduced)]


def _swept(section: str, variant: dict[str, Any]) -> dict[str, Any]:
    """A variant's values as cell axes (``victim.lr``)."""
    return {f"{section}.{k}": v for k, v in variant.items()}


def grid_size(config: ExperimentConfig) -> tuple[int, int]:
    """(result cells, PSIM stages) that :func:`plan_grid` would make, counted without expanding the grid."""
    g = config.grid
    combos = math.prod(len(axis) for axis in (g.models, g.datasets, g.attacks, g.scenarios, g.seeds))
    psims, evals = _variant_count(config, "psim"), _variant_count(config, "evaluate")
    others = _variant_count(config, "evaluate", skip=PSIM_THRESHOLD_SETTINGS)
    per_defense = {"none": 1, "psim": psims * evals}
    per_method = sum(per_defense.get(defense, others) for defense in g.defenses)
    clean = int(config.clean_model and config.victim.normal)  # Table 9: PSIM on the clean model too
    per_method += int(config.victim.normal) + clean * evals
    victims = len(g.methods) * _variant_count(config, "victim")
    return combos * (victims * per_method + int(config.poisoned_model)), combos * (psims + clean)


def check_grid_size(config: ExperimentConfig, max_cells: int) -> None:
    """Refuse a grid larger than ``max_cells`` (cells or PSIM stages) before planning it."""
    from peftguard.errors import OptionError

    cells, psims = grid_size(config)
    if max(cells, psims) > max_cells:
        raise OptionError(f"{config.name}: the grid has {cells} result cells and {psims} PSIM stages, over the limit of "
                          f"{max_cells}; shrink grid/sweep, or pass --max-cells {max(cells, psims)} to run it anyway")


def _variant_count(config: ExperimentConfig, section: str, skip: tuple[str, ...] = ()) -> int:
    return math.prod(len(values) for key, values in config.sweep.items()
                     if key.startswith(section + ".") and key.split(".", 1)[1] not in skip)


def _variants(config: ExperimentConfig, section: str) -> list[dict[str, Any]]:
    keys = [k for k in config.sweep if k.startswith(section + ".")]
    combos = itertools.product(*(config.sweep[k] for k in keys))
    return [{k.split(".", 1)[1]: v for k, v in zip(keys, combo)} for combo in combos] or [{}]


def _poison_stage(config: ExperimentConfig, model: str, dataset: str, attacks: list[str], scenario: str, seed: int) -> Stage:
    proxy = config.proxies.get(dataset) if scenario == "full-task" else None
    return Stage("poison", {"model": model, "dataset": dataset, "attacks": attacks, "scenario": scenario, "proxy": proxy,
                            "seed": seed, "data": config.data.model_dump(), "poison": config.poison.model_dump()})


def _victim_stage(config: ExperimentConfig, base: str, dataset: str, method: str, seed: int,
                  overrides: dict[str, Any]) -> Stage:
    deps = (base,) if is_stage_name(base) else ()
    return Stage("victim", {"base": base, "dataset": dataset, "method": method, "seed": seed,
                            "data": config.data.model_dump(), "victim": _victim_settings(config, method, overrides),
                            "instruction": config.poison.instruction}, deps)


def _victim_settings(config: ExperimentConfig, method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The victim section as ``method`` reads it: a method setting (``num_virtual_tokens``) is kept
    only where the method has it and it is given, so a LoRA victim's key ignores a prompt-length sweep
    and stages made before these settings existed keep their keys."""
    from peftguard.tuning import method_config  # torch and peft: not for planning alone

    settings = {**config.victim.model_dump(exclude={"normal"}), **overrides}
    method_fields = {f.name for f in fields(method_config(method))}
    for name in METHOD_SETTINGS:
        if settings[name] is None or name not in method_fields:
            del settings[name]
    return settings


def _psim_stage(config: ExperimentConfig, base: str, dataset: str, seed: int, overrides: dict[str, Any]) -> Stage:
    deps = (base,) if is_stage_name(base) else ()
    settings = {**config.psim.model_dump(), **overrides}
    if settings["epochs"] is None:  # the rule's constants are part of what the stage computes (and of its key)
        settings["budget_rule"] = BudgetRule(max_epochs=settings["max_epochs"],
                                             max_restarts=settings["max_restarts"]).as_dict()
    return Stage("psim", {"base": base, "dataset": dataset, "seed": seed, "data": config.data.model_dump(),
                          "psim": settings, "calibration": _psim_calibration(config),
                          "instruction": config.poison.instruction}, deps)


def _psim_calibration(config: ExperimentConfig) -> dict[str, Any]:
    """The only evaluation settings a PSIM's training reads: how its manifest's gamma is chosen.

    Every evaluation recalibrates gamma from its own settings (``defenses/registry.py``), so
    evaluation batch sizes, lengths and swept gammas do not retrain the PSIM; the base section's
    fixed gamma is kept so that a PSIM meant for a fixed gamma is not refused for a calibration
    it will never use.
    """
    gamma = config.evaluate.gamma
    return {"gamma": gamma, "target_fpr": None if gamma is not None else config.evaluate.target_fpr}


def _add_eval(plan: Plan, config: ExperimentConfig, victim: str, psim: str | None, defense: str,
              attacks: list[str], overrides: dict[str, Any], cell: dict[str, Any]) -> None:
    settings = {**config.evaluate.model_dump(), **overrides}
    victim_stage = plan.stages[victim]
    stage = Stage("evaluate", {"victim": victim, "psim": psim, "defense": defense, "attacks": attacks,
                               "dataset": victim_stage.settings["dataset"], "seed": victim_stage.settings["seed"],
                               "data": config.data.model_dump(), "evaluate": settings,
                               "target_label": config.poison.target_label,
                               # only where given, so that stages without defense options keep their keys
                               **({"defense_options": config.defense_options[defense]}
                                  if config.defense_options.get(defense) else {})},
                  tuple(d for d in (victim, psim) if d))
    cell["stage"] = plan.add(stage)
    plan.cells.append(cell)


# --- running -----------------------------------------------------------------------------------

def link_stage_cache(run_dir: Path, cache: Path) -> None:
    """Make ``run_dir/stages`` point at a shared stage folder (stages are keyed by their settings)."""
    from peftguard.errors import OptionError

    cache = Path(cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    link = Path(run_dir) / "stages"
    if link.is_symlink() and link.resolve() == cache:
        return
    if link.exists() or link.is_symlink():
        raise OptionError(f"{link} already exists and is not a link to {cache}; use a new --out")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(cache, target_is_directory=True)


def is_done(run_dir: Path, stage: Stage) -> bool:
    return is_done_in(Path(run_dir) / "stages", stage)


def is_done_in(stages_root: Path, stage: Stage) -> bool:
    """Whether ``stages_root`` (a run's stages/ or a shared stage cache) holds ``stage`` finished."""
    path = Path(stages_root) / stage.name / STAGE_FILE
    return path.is_file() and read_json(path).get("settings") == stage.settings


def run_stage(run_dir: Path, stage: Stage, threads: int | None = None, *_upstream: Any) -> dict[str, Any]:
    """Run one stage (its dependencies must be done) and mark it finished.

    ``_upstream`` are the records of the stages it depends on; the Ray executor passes them so
    that a task starts only after its dependencies.
    """
    from peftguard import stages

    folder = stage_dir(run_dir, stage.name)
    folder.mkdir(parents=True, exist_ok=True)
    if threads:
        import torch

        torch.set_num_threads(threads)
    started = time.perf_counter()
    with _stage_log(folder / "stage.log"):
        log.info("stage %s: %s", stage.name, json.dumps(stage.settings, sort_keys=True))
        try:
            stages.RUNNERS[stage.kind](run_dir, stage, folder)
        except Exception:
            log.exception("stage %s failed", stage.name)  # the traceback, for a worker process or a rerun
            raise
    record = {"name": stage.name, "kind": stage.kind, "settings": stage.settings, "deps": list(stage.deps),
              "seconds": round(time.perf_counter() - started, 2)}
    write_json(folder / STAGE_FILE, record)
    return record


@contextmanager
def _stage_log(path: Path) -> Iterator[None]:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(min(previous, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()


def write_plan(run_dir: Path, config: ExperimentConfig, plan: Plan) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", config.model_dump())
    write_json(run_dir / CELLS_FILE, {"name": config.name, "table": config.table, "cells": plan.cells,
                                      "stages": {name: {"kind": s.kind, "deps": list(s.deps)} for name, s in plan.stages.items()}})


def run_on_this_machine(run_dir: Path, plan: Plan, *, workers: int = 1, threads: int | None = None,
                        echo: Callable[[str], None] = print) -> dict[str, int]:
    """The local executor: in this process for one worker, else ``workers`` processes sharing the cores
    (``threads`` per stage; default: cores / workers)."""
    if workers > 1:
        from peftguard.runtime import available_cores

        return run_parallel(run_dir, plan, workers=workers, threads=threads or max(1, available_cores() // workers), echo=echo)
    return run_local(run_dir, plan, threads=threads, echo=echo)


def run_local(run_dir: Path, plan: Plan, *, threads: int | None = None, echo: Callable[[str], None] = print) -> dict[str, int]:
    """Run every unfinished stage in order, in this process, with overall progress."""
    counts = {"reused": 0, "ran": 0}
    started = time.perf_counter()
    bar = tqdm(plan.stages.values(), desc="grid", unit="stage")
    with (run_dir / "run.log").open("a", encoding="utf-8") as run_log:
        for stage in bar:
            bar.set_postfix_str(stage.name)
            if is_done(run_dir, stage):
                counts["reused"] += 1
                _note(run_log, echo, f"reused {stage.name}")
                continue
            record = run_stage(run_dir, stage, threads)
            counts["ran"] += 1
            _note(run_log, echo, f"ran {stage.name} in {record['seconds']:.1f} s "
                                 f"({counts['ran'] + counts['reused']}/{len(plan.stages)}, "
                                 f"{time.perf_counter() - started:.0f} s elapsed)")
    return counts


def run_parallel(run_dir: Path, plan: Plan, *, workers: int, threads: int | None = None,
                 echo: Callable[[str], None] = print) -> dict[str, int]:
    """Run unfinished stages in ``workers`` processes of this machine, each after its dependencies.

    For one machine with many cores or one large GPU, where a single small-model stage uses a
    fraction of it (the processes share the card). Ready stages start lowest seed first, upstream
    kinds before downstream ones (a long poisoning must not wait behind another attack's
    evaluations: it is on the critical path), then in plan order, so a run stopped early holds whole
    seeds. A failed stage does not stop the others: its dependants are skipped, the rest run, and
    the failures are raised together at the end (a rerun retries them and reuses everything finished).
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    order = {name: (stage.settings.get("seed", 0), STAGE_KINDS.index(stage.kind), index)
             for index, (name, stage) in enumerate(plan.stages.items())}
    counts = {"reused": 0, "ran": 0}
    pending: dict[str, Stage] = {}
    for name, stage in plan.stages.items():
        if is_done(run_dir, stage):
            counts["reused"] += 1
        else:
            pending[name] = stage
    failed: dict[str, str] = {}
    running: dict[Any, str] = {}
    started = time.perf_counter()
    # spawn: a forked child would inherit this process's torch threads and any CUDA context
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    with (run_dir / "run.log").open("a", encoding="utf-8") as run_log, \
            tqdm(total=len(pending), desc=f"grid ({workers} workers)", unit="stage") as bar:
        try:
            while pending or running:
                for name in sorted(pending, key=order.__getitem__):
                    stage = pending[name]
                    blocked_by = next((d for d in stage.deps if d in failed), None)
                    if blocked_by:
                        failed[name] = f"skipped: {blocked_by} failed"
                        del pending[name]
                        bar.update()
                    elif len(running) < workers and not any(d in pending or d in running.values() for d in stage.deps):
                        running[pool.submit(run_stage, run_dir, stage, threads)] = name
                        del pending[name]
                if not running:
                    continue
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    name = running.pop(future)
                    bar.update()
                    try:
                        record = future.result()
                    except Exception as error:  # noqa: BLE001 -- one stage's failure must not lose the others
                        failed[name] = f"{type(error).__name__}: {error}".splitlines()[0]
                        _note(run_log, echo, f"FAILED {name}: {failed[name]} (log: {stage_dir(run_dir, name) / 'stage.log'})")
                        continue
                    counts["ran"] += 1
                    _note(run_log, echo, f"ran {name} in {record['seconds']:.1f} s ({counts['ran']} run, "
                                         f"{time.perf_counter() - started:.0f} s elapsed)")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    if failed:
        first = next(iter(failed.items()))
        raise StageError(f"{len(failed)} of {len(plan.stages)} stages failed or were skipped (first: {first[0]}: {first[1]}); "
                         f"see {run_dir / 'run.log'}; rerun to retry them")
    return counts


def _note(run_log: Any, echo: Callable[[str], None], message: str) -> None:
    run_log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")
    run_log.flush()
    echo(message)


def run_ray(run_dir: Path, plan: Plan, *, address: str | None = None, cpus_per_stage: int = 1,
            echo: Callable[[str], None] = print) -> dict[str, int]:
    """Run unfinished stages as Ray tasks, each after its dependencies, with its resource needs.

    ``run_dir`` must be on a path every Ray worker sees (a shared filesystem on a cluster).
    """
    import torch

    from peftguard.extras import require

    ray = require("ray", "--executor ray")

    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else os.cpu_count(), include_dashboard=False,
                 log_to_driver=False)
    task = ray.remote(run_stage)
    gpus = 1 if torch.cuda.is_available() else 0
    refs: dict[str, Any] = {}
    counts = {"reused": 0, "ran": 0}
    for stage in plan.stages.values():
        if is_done(run_dir, stage):
            counts["reused"] += 1
            continue
        deps = [refs[d] for d in stage.deps if d in refs]
        needs = {"num_cpus": cpus_per_stage, "num_gpus": gpus if stage.kind != "evaluate" else 0}
        refs[stage.name] = task.options(**needs).remote(run_dir, stage, cpus_per_stage, *deps)
    pending = list(refs.values())
    with (run_dir / "run.log").open("a", encoding="utf-8") as run_log, tqdm(total=len(pending), desc="grid (ray)", unit="stage") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            record = ray.get(done[0])
            counts["ran"] += 1
            bar.update()
            _note(run_log, echo, f"ran {record['name']} in {record['seconds']:.1f} s (ray)")
    return counts
