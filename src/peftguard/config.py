"""Experiment configs: one YAML file describes a grid; validated into typed objects.

A grid crosses models × datasets × attacks × scenarios × victim methods × defenses × seeds, and
``sweep`` crosses any victim, PSIM or evaluation setting with a list of values (the paper's
ablations); a null value stands for the setting's default (``evaluate.gamma: [null, 0.7]``:
calibrated, then the paper's fixed gamma).
Unknown keys, wrong types and impossible combinations are rejected with the key's path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from peftguard.bounds import bounded
from peftguard.defenses.psim_budget import AUTO_PSIM_METHOD, DEFAULT_PSIM_LR, BudgetRule
from peftguard.errors import DataError, OptionError
from peftguard.metrics import DEFAULT_TARGET_FPR


def _registered(registry: str, extra: tuple[str, ...] = ()) -> Any:
    """A validator accepting the names in one of the registries (methods, attacks, defenses), and ``extra`` ones."""

    def check(name: str) -> str:
        names = (*extra, *registered_names(registry))
        if name not in names:
            raise ValueError(f"unknown {registry[:-1]} '{name}'; choose from {', '.join(names)}")
        return name

    return AfterValidator(check)


def registered_names(registry: str) -> tuple[str, ...]:
    """What a config accepts for a method, an attack or a defense ("none": no defense): the registries' names."""
    if registry == "methods":
        from peftguard.methods import METHODS

        return METHODS.names()
    if registry == "attacks":
        from peftguard.triggers import ATTACKS

        return ATTACKS.names()
    from peftguard.defenses.registry import DEFENSES

    return ("none", *DEFENSES.names())


# Plain strings in the JSON Schema (no enum): adding a method, attack or defense then changes no
# generated file, only its own module; the names are checked when a config is read.
MethodName = Annotated[str, _registered("methods")]
PSIMMethodName = Annotated[str, _registered("methods", extra=(AUTO_PSIM_METHOD,))]  # auto: chosen by architecture
AttackName = Annotated[str, _registered("attacks")]
DefenseName = Annotated[str, _registered("defenses")]
ScenarioName = Literal["full-data", "full-task"]
# Proxy datasets of the full-task scenario (paper Section 5.1).
DEFAULT_PROXIES = {"sst2": "imdb/psim", "cr": "mr", "cola": "sst2"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataConfig(Strict):
    max_train_samples: Optional[int] = bounded("max_train_samples", 2000, description="training subset per stage")
    max_eval_samples: Optional[int] = bounded("max_eval_samples", None, description="dev/test subset")
    data_dir: Optional[str] = Field(None, description="folder of the short-named datasets")


class PoisonConfig(Strict):
    epochs: int = bounded("epochs", 3)
    lr: float = bounded("lr", 5e-5)
    poison_rate: Optional[float] = bounded("poison_rate", 0.2)
    poison_count: Optional[int] = bounded("poison_count", None)
    poison_mode: Literal["clean-label", "dirty-label"] = "clean-label"
    target_label: int = bounded("target_label", 0)
    instruction: Optional[Literal["sentiment", "acceptability", "topic"]] = None
    batch_size: int = bounded("batch_size", 32)
    max_length: int = bounded("max_length", 128)


class VictimConfig(Strict):
    epochs: int = bounded("epochs", 2)
    lr: Optional[float] = bounded("lr", None, description="default: the method's own default")
    batch_size: int = bounded("batch_size", 32)
    max_length: int = bounded("max_length", 128)
    normal: bool = Field(True, description="also fine-tune the clean model (the paper's Normal row)")
    num_virtual_tokens: Optional[int] = bounded("num_virtual_tokens", None, description=(
        "prompt, P-tuning and prefix victims: virtual tokens; null: the method's default (other methods ignore it)"))
    encoder_hidden_size: Optional[int] = bounded("encoder_hidden_size", None, description=(
        "P-tuning v1 victims: prompt encoder width; null: the method's default (other methods ignore it)"))


# Victim settings that belong to some fine-tuning methods only (a victim stage keeps those its method has).
METHOD_SETTINGS = ("num_virtual_tokens", "encoder_hidden_size")


class PSIMConfig(Strict):
    method: PSIMMethodName = Field(AUTO_PSIM_METHOD, description=(
        "PEFT method of the PSIM; auto: LoRA for a decoder-only model, the paper's ptuning-v1 otherwise"))
    epochs: Optional[int] = bounded("epochs", None, description="fixed epochs (the paper: 1); null: the clean-data budget rule")
    max_epochs: int = bounded("max_epochs", BudgetRule().max_epochs, description="budget rule: give up after this many epochs")
    max_restarts: int = bounded("max_restarts", BudgetRule().max_restarts, description=(
        "budget rule: start a search still above chance after one epoch again with another seed, at most this often"))
    lr: float = bounded("lr", DEFAULT_PSIM_LR)
    reset_rate: float = bounded("reset_rate", 1.0)
    num_virtual_tokens: int = bounded("num_virtual_tokens", 5)
    encoder_hidden_size: int = bounded("encoder_hidden_size", 128)
    batch_size: int = bounded("batch_size", 32)
    max_length: int = bounded("max_length", 128)


class EvalConfig(Strict):
    target_fpr: Optional[float] = bounded("target_fpr", DEFAULT_TARGET_FPR)
    gamma: Optional[float] = bounded("gamma", None, description="fixed threshold instead of target_fpr")
    batch_size: int = bounded("batch_size", 64)
    max_length: int = bounded("max_length", 128)


class GridConfig(Strict):
    models: list[str] = Field(["minilm"], min_length=1)
    datasets: list[str] = Field(["sst2"], min_length=1)
    attacks: list[Union[AttackName, list[AttackName]]] = Field(["badnet"], min_length=1,
                                                               description="a list entry poisons with several triggers at once")
    scenarios: list[ScenarioName] = Field(["full-data"], min_length=1)
    methods: list[MethodName] = Field(["lora"], min_length=1)
    defenses: list[DefenseName] = Field(["none", "psim"], min_length=1)
    seeds: list[Annotated[int, bounded("seed")]] = Field([0], min_length=1)


SWEEP_SECTIONS: dict[str, type[BaseModel]] = {"psim": PSIMConfig, "evaluate": EvalConfig, "victim": VictimConfig}
UNSWEEPABLE = {"victim.normal"}  # decides which rows exist, not a setting of one
SWEEPABLE = {f"{section}.{name}" for section, model in SWEEP_SECTIONS.items()
             for name in model.model_fields} - UNSWEEPABLE


class ExperimentConfig(Strict):
    name: str = Field(min_length=1, description="names the run and its report")
    description: str = ""
    table: Optional[str] = Field(None, description="report layout: which paper table this reproduces")
    grid: GridConfig = GridConfig()
    data: DataConfig = DataConfig()
    poison: PoisonConfig = PoisonConfig()
    victim: VictimConfig = VictimConfig()
    psim: PSIMConfig = PSIMConfig()
    evaluate: EvalConfig = EvalConfig()
    sweep: dict[str, list[Any]] = Field(default_factory=dict,
                                                            description="dotted key → values, e.g. psim.reset_rate")
    proxies: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_PROXIES))
    clean_model: bool = Field(False, description="also run every defense on the never-poisoned model (Table 9)")
    poisoned_model: bool = Field(False, description=(
        "also evaluate the poisoned weights before fine-tuning (a Poisoned row)"))
    defense_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="defense name → its options, e.g. onion: {bars: [0, -10]} (defenses/registry.py)")

    @field_validator("sweep")
    @classmethod
    def _known_sweep_keys(cls, sweep: dict[str, list]) -> dict[str, list]:
        for key, values in sweep.items():
            if key not in SWEEPABLE:
                raise ValueError(f"cannot sweep '{key}'; sweepable keys: {', '.join(sorted(SWEEPABLE))}")
            if not values:
                raise ValueError(f"sweep '{key}' has no values")
        return sweep

    @model_validator(mode="after")
    def _possible(self) -> ExperimentConfig:
        if "full-task" in self.grid.scenarios:
            missing = [d for d in self.grid.datasets if d not in self.proxies]
            if missing:
                raise ValueError(f"grid.scenarios has full-task but proxies has no entry for {missing}")
        decoders = [m for m in self.grid.models if m in DECODER_MODELS]
        if decoders and "ptuning-v2" in self.grid.methods:
            raise ValueError(f"grid.methods: ptuning-v2 is not run on decoders {decoders} (the paper has no "
                             "P-tuning v2 for LLaMA); list the decoder in a separate config without it")
        if self.poison.instruction and any(m not in DECODER_MODELS for m in self.grid.models):
            raise ValueError("poison.instruction needs causal-LM models (grid.models: smollm2)")
        return self


DECODER_MODELS = {"smollm2"}


INCLUDE_KEY = "include"


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate a YAML config; errors name the file and the key path.

    ``include:`` (a path or a list, relative to the including file) names files whose keys this one
    inherits, in the spirit of lm-evaluation-harness; what the file itself says wins, mapping by
    mapping. ``overrides`` (dotted keys, ``data.max_train_samples``) win over both: the demo maps
    its command-line options onto its config this way.
    """
    path = Path(path)
    raw = read_config_layers(path)
    for key, value in (overrides or {}).items():
        raw = merge_config(raw, _nested(key, value))
    return parse_config(raw, str(path))


def read_config_layers(path: Path) -> dict[str, Any]:
    """The mapping ``path`` holds with what it includes merged under it (not yet validated)."""
    return _read_with_includes(Path(path), ())


def included_values(path: Path) -> dict[str, Any]:
    """What ``path`` inherits from its includes (without its own keys)."""
    merged: dict[str, Any] = {}
    for target in _includes(Path(path), read_yaml_mapping(Path(path)), ()):
        merged = merge_config(merged, read_config_layers(target))
    return merged


def _read_with_includes(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    own = read_yaml_mapping(path)
    merged: dict[str, Any] = {}
    for target in _includes(path, own, chain):
        merged = merge_config(merged, _read_with_includes(target, (*chain, path.resolve())))
    return merge_config(merged, {k: v for k, v in own.items() if k != INCLUDE_KEY})


def _includes(path: Path, own: dict[str, Any], chain: tuple[Path, ...]) -> list[Path]:
    """The files ``own`` includes, checked: each exists and none includes its includer."""
    names = own.get(INCLUDE_KEY) or []
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise DataError(path, f"{INCLUDE_KEY}: a file name or a list of file names, relative to this file")
    targets = []
    for name in names:
        target = path.parent / name
        if target.resolve() in (*chain, path.resolve()):
            cycle = " -> ".join(str(p) for p in (*chain, path.resolve(), target.resolve()))
            raise DataError(path, f"{INCLUDE_KEY}: '{name}' includes itself in a cycle ({cycle})")
        if not target.is_file():
            raise DataError(path, f"{INCLUDE_KEY}: '{name}' is not a file (looked for {target})")
        targets.append(target)
    return targets


def merge_config(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists too) is replaced."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = value
    return merged


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    section, _, rest = dotted.partition(".")
    return {section: _nested(rest, value) if rest else value}


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """One YAML file as a mapping; every failure is a one-line error naming the file."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(path, "missing file") from None
    except IsADirectoryError:
        raise DataError(path, "a folder, not a config file") from None
    except UnicodeDecodeError:
        raise DataError(path, "not valid UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise DataError(path, f"invalid YAML: {problem}",
                        line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None) from None
    except RecursionError:
        raise DataError(path, "invalid YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        raise DataError(path, "a config must be a mapping of keys (name, grid, poison, ...)")
    return raw


def parse_config(raw: dict, source: str = "config") -> ExperimentConfig:
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise OptionError(f"{source}: {_where_and_what(exc)}") from None
    sweep = {}
    for key, values in config.sweep.items():  # each value as if it were given as the key itself
        try:
            sweep[key] = _sweep_values(key).validate_python(values)
        except ValidationError as exc:
            raise OptionError(f"{source}: {_where_and_what(exc, prefix=('sweep', key))}") from None
    from peftguard.defenses.registry import check_grid_options

    try:
        defense_options = check_grid_options(config.defense_options)
    except OptionError as exc:
        raise OptionError(f"{source}: {exc}") from None
    return config.model_copy(update={"sweep": sweep, "defense_options": defense_options})


def _where_and_what(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> str:
    error = exc.errors()[0]
    # without pydantic's tags of union branches ("function-after[check(), str]"), which name no key
    where = ".".join(str(part) for part in (*prefix, *error["loc"]) if "[" not in str(part)) or "(top level)"
    message = error["msg"]
    if error["type"] == "value_error":  # a validator's own sentence, without pydantic's "Value error, "
        message = str(error["ctx"]["error"])
    if error["type"] == "extra_forbidden":
        message = f"unknown key; valid keys here: {', '.join(_valid_keys(error['loc']))}"
    return f"{where}: {message}"


def _sweep_values(key: str) -> TypeAdapter:
    """A validator for a list of values of the setting ``key`` (``psim.lr``): the field's own type and range."""
    section, name = key.split(".", 1)
    model = SWEEP_SECTIONS[section]
    field = model.model_fields[name]
    item = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
    return TypeAdapter(list[item], config=ConfigDict(allow_inf_nan=False))


def _valid_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return sorted(model.model_fields)
