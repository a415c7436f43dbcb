"""Manifests read back from disk, validated before anything is loaded.

A manifest (``finetune.json``, ``psim.json``, ``poisoning.json``) says how to load and use an
artifact: its method, label count, base model, settings and, for a PSIM, its threshold gamma. A
hand-edited or damaged one could otherwise load a detector that flags nothing (gamma 1.0 or NaN)
or fail with a traceback deep inside the loader, so every value a loader uses is checked here, with
the ranges of :mod:`peftguard.bounds`, and a manifest that fails is refused with one line naming
the file and the field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from peftguard.bounds import bounded
from peftguard.errors import PeftguardError


def _registered_method(name: str) -> str:
    from peftguard.methods import METHODS

    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; choose from {', '.join(METHODS)}")
    return name


MethodName = Annotated[str, AfterValidator(_registered_method)]  # a name in the method registry


class Record(BaseModel):
    """Fields are checked strictly (no "2" for 2, no NaN); fields a loader does not use are kept as they are."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class SettingsRecord(Record):
    epochs: int = bounded("epochs")
    lr: float = bounded("lr")
    batch_size: int = bounded("batch_size")
    max_length: int = bounded("max_length")
    seed: int = bounded("seed")
    weight_decay: float = bounded("weight_decay", 0.0)
    warmup_ratio: float = bounded("warmup_ratio", 0.06)


class MethodConfigRecord(Record):
    lr: Optional[float] = bounded("lr", None)
    r: Optional[int] = bounded("r", None)
    alpha: Optional[int] = bounded("alpha", None)
    dropout: Optional[float] = bounded("dropout", None)
    num_virtual_tokens: Optional[int] = bounded("num_virtual_tokens", None)
    encoder_hidden_size: Optional[int] = bounded("encoder_hidden_size", None)


class TunedManifest(Record):
    """What :func:`peftguard.tuning.load_tuned` needs of any tuned artifact."""

    method: MethodName
    num_labels: int = bounded("num_labels")
    base_model: Optional[str] = Field(None, min_length=1)
    method_config: MethodConfigRecord = MethodConfigRecord()
    settings: Optional[SettingsRecord] = None

    @model_validator(mode="after")
    def _adapter_has_a_base(self) -> TunedManifest:
        if self.method != "full" and self.base_model is None:
            raise ValueError(f"base_model: missing (a {self.method} adapter needs the model it sits on)")
        return self


class VictimManifest(TunedManifest):
    pass


class ReplayableVictimManifest(VictimManifest):
    """A victim whose fine-tuning can be replayed (Fine-mixing): its settings must be there."""

    settings: SettingsRecord


class GammaChoiceRecord(Record):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # read back as GammaChoice(**it)

    gamma: float = bounded("gamma")
    how: Literal["fixed", "target-fpr"]
    target_fpr: Optional[float] = bounded("target_fpr", None)
    calibration_samples: Optional[int] = Field(None, ge=1)


class PSIMManifest(TunedManifest):
    settings: SettingsRecord
    gamma: float = bounded("gamma")
    gamma_choice: GammaChoiceRecord

    @model_validator(mode="after")
    def _one_gamma(self) -> PSIMManifest:
        if self.gamma != self.gamma_choice.gamma:
            raise ValueError(f"gamma: {self.gamma} differs from gamma_choice.gamma {self.gamma_choice.gamma}")
        return self


class ExportedPSIMManifest(Record):
    """``psim-onnx.json``: a PSIM exported by ``peftguard psim export`` (:mod:`peftguard.defenses.psim_onnx`)."""

    kind: Literal["psim-onnx"]
    num_labels: int = bounded("num_labels")
    max_length: int = Field(ge=1)
    pad_token_id: int = Field(ge=0)
    gamma: float = bounded("gamma")
    gamma_choice: GammaChoiceRecord
    files: dict[str, Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]]

    @model_validator(mode="after")
    def _one_gamma(self) -> ExportedPSIMManifest:
        if self.gamma != self.gamma_choice.gamma:
            raise ValueError(f"gamma: {self.gamma} differs from gamma_choice.gamma {self.gamma_choice.gamma}")
        return self


class PoisoningManifest(Record):
    base_model: Optional[str] = Field(None, min_length=1)
    num_labels: Optional[int] = bounded("num_labels", None)


class AdapterConfigRecord(Record):
    peft_type: str


SCHEMAS: dict[str, type[Record]] = {
    "finetune.json": VictimManifest,
    "psim.json": PSIMManifest,
    "psim-onnx.json": ExportedPSIMManifest,
    "poisoning.json": PoisoningManifest,
    "adapter_config.json": AdapterConfigRecord,
}


def read_manifest(path: str | Path, schema: type[Record] | None = None) -> dict[str, Any]:
    """The manifest at ``path`` as a dict, after checking it against ``schema`` (default: by file name)."""
    path = Path(path)
    schema = schema or SCHEMAS[path.name]
    raw = _read_json_object(path)
    try:
        schema.model_validate(raw)
    except ValidationError as exc:
        raise PeftguardError(f"{path}: {describe_error(exc)}") from None
    return raw


def describe_error(exc: ValidationError) -> str:
    """The first problem of a validation error as "field.path: what is wrong, got VALUE", on one line."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    if error["type"] == "missing":
        return f"{where}: missing"
    message = " ".join(str(error["msg"]).split()).removeprefix("Value error, ")
    if not where:  # a check across fields names its own field
        return message
    shown = "" if isinstance(error.get("input"), (dict, list)) else f", got {repr(error['input'])[:80]}"
    return f"{where}: {message}{shown}"


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PeftguardError(f"{path}: missing file") from None
    except UnicodeDecodeError:
        raise PeftguardError(f"{path}: not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise PeftguardError(f"{path}: invalid JSON: {exc.msg} (line {exc.lineno}, character {exc.colno})") from None
    except (ValueError, RecursionError) as exc:
        raise PeftguardError(f"{path}: invalid JSON: {str(exc).partition(':')[0]}") from None
    except OSError as exc:
        raise PeftguardError(f"{path}: cannot read: {exc.strerror}") from None
    if not isinstance(raw, dict):
        raise PeftguardError(f"{path}: a manifest must be a JSON object, got {type(raw).__name__}")
    return raw
