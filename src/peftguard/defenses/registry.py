"""Defense name → its options dataclass and builder; every defense module registers itself here.

A defense module declares an options dataclass (its schema: each field's ``metadata`` gives the
``help`` text, the CLI ``flag`` that sets it where there is one, and ``grid=False`` where a grid
stage sets it itself, e.g. the PSIM folder) and registers a builder with :func:`register_defense`.
The CLI's ``--defense`` choices and flags, a grid config's ``defense_options:`` section and the
stages all go through these options, so an option given to a defense that does not take it is an
error, not silently ignored.

Input defenses (psim, onion, back-translation, scpd) screen or rewrite the test inputs, and may
bind to the victim (:meth:`~peftguard.defenses.base.InputDefense.bind`) when they need its
predictions; the model-level defense (fine-mixing) yields a new victim evaluated in its place.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from pydantic import TypeAdapter, ValidationError

from peftguard.defenses.base import DefenseContext, InputDefense, ModelDefense
from peftguard.errors import OptionError
from peftguard.registries import Registry

Defense = InputDefense | ModelDefense


@dataclass(frozen=True)
class DefenseEntry:
    name: str
    options: type  # a dataclass: the defense's settings
    build: Callable[[Any, DefenseContext], Defense]
    summary: str
    order: int  # position in listings and reports


DEFENSES: Registry[DefenseEntry] = Registry("defense", "peftguard.defenses")


def register_defense(
    name: str, *, options: type, summary: str, order: int
) -> Callable[[Callable[[Any, DefenseContext], Defense]], Callable[[Any, DefenseContext], Defense]]:
    """Decorator: register ``build(options, context) -> defense`` as the defense ``name``."""
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"defense {name}: options must be a dataclass, got {options!r}")

    def register(build: Callable[[Any, DefenseContext], Defense]) -> Callable[[Any, DefenseContext], Defense]:
        DEFENSES.register(DefenseEntry(name, options, build, summary, order))
        return build

    return register


# --- the options as the CLI gives them --------------------------------------------------------

def flag_of(field: dataclasses.Field) -> str | None:
    return field.metadata.get("flag")


def defense_flags() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Every CLI flag any defense takes → (defense, field) pairs, in registry order."""
    flags: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for name, entry in DEFENSES.items():
        for field in fields(entry.options):
            if flag_of(field):
                flags.setdefault(flag_of(field), []).append((name, field))
    return flags


def flag_help(flag: str) -> str:
    """The help text of a defense flag, read from the fields it sets: ``defense: help`` for each."""
    return "; ".join(f"{name}: {field.metadata.get('help', field.name)}" for name, field in defense_flags().get(flag, []))


def options_from_flags(name: str | None, given: Mapping[str, Any]) -> Any:
    """The options of defense ``name`` from CLI flags (``--flag`` → value, None or empty: not given).

    A repeated flag arrives as a list: a tuple field takes it whole, any other field exactly one value.
    """
    given = {flag: value for flag, value in given.items() if value not in (None, (), [])}
    if name is None:
        if given:
            raise OptionError(f"{'/'.join(given)} need a --defense ({', '.join(DEFENSES)})")
        return None
    entry = DEFENSES[name]
    by_flag = {flag_of(f): f for f in fields(entry.options) if flag_of(f)}
    stray = [flag for flag in given if flag not in by_flag]
    if stray:
        raise OptionError(f"{'/'.join(stray)} are not options of --defense {name}")
    values = {}
    for flag, value in given.items():
        field = by_flag[flag]
        if isinstance(value, (list, tuple)) and not _is_sequence_field(entry.options, field):
            if len(value) != 1:
                raise OptionError(f"--defense {name} takes one {flag}")
            value = value[0]
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return entry.options(**values)


def _is_sequence_field(options: type, field: dataclasses.Field) -> bool:
    import typing

    annotation = typing.get_type_hints(options)[field.name]
    return typing.get_origin(annotation) in (tuple, list)


# --- the options as a grid config gives them -------------------------------------------------

def grid_keys(name: str) -> list[str]:
    """The keys ``defense_options.<name>`` accepts: the options a grid stage does not set itself."""
    return [f.name for f in fields(DEFENSES[name].options) if f.metadata.get("grid", True)]


def check_grid_options(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Validate a config's ``defense_options`` section; errors name the key path.

    Returns it unchanged (JSON values, as stage settings keep them) once every defense name, key
    and value has been checked against the defenses' option dataclasses.
    """
    if not isinstance(raw, Mapping):
        raise OptionError("defense_options: a mapping of defense name → its options")
    for name, section in raw.items():
        if name not in DEFENSES:
            raise OptionError(f"defense_options.{name}: unknown defense; choose from {', '.join(DEFENSES)}")
        if not isinstance(section, Mapping):
            raise OptionError(f"defense_options.{name}: a mapping of option → value")
        allowed = grid_keys(name)
        for key in section:
            if key not in allowed:
                raise OptionError(f"defense_options.{name}.{key}: unknown key; valid keys here: {', '.join(allowed) or 'none'}")
        make_options(name, dict(section), where=f"defense_options.{name}")
    return {name: dict(section) for name, section in raw.items()}


def make_options(name: str, values: Mapping[str, Any], *, where: str | None = None) -> Any:
    """The options dataclass of defense ``name`` from plain values (a grid stage's), type-checked."""
    options = DEFENSES[name].options
    known = {f.name for f in fields(options)}
    unknown = sorted(set(values) - known)
    where = where or f"--defense {name}"
    if unknown:
        raise OptionError(f"{where}: unknown options {unknown}; valid: {', '.join(sorted(known))}")
    try:
        return TypeAdapter(options).validate_python(dict(values))
    except ValidationError as exc:
        error = exc.errors()[0]
        path = ".".join(str(part) for part in error["loc"])
        raise OptionError(f"{where}.{path}: {error['msg']}") from None


def setting_label(name: str, values: Mapping[str, Any]) -> str:
    """How a report row names defense ``name`` with these grid options: the name, and the backend or setting
    its options' ``label()`` gives (``back-translation: apertium eng-spa-eng``); for a defense whose options
    have no ``label()``, the options that differ from its defaults (none: the name alone)."""
    options = make_options(name, values)
    label = getattr(options, "label", None)
    if callable(label):
        return f"{name}: {label()}"
    defaults = DEFENSES[name].options()
    changed = [f"{f.name}={getattr(options, f.name)}" for f in fields(options)
               if getattr(options, f.name) != getattr(defaults, f.name)]
    return f"{name}: {', '.join(changed)}" if changed else name


def build_defense(name: str | None, options: Any, context: DefenseContext) -> Defense | None:
    """The defense called ``name`` (None: no defense) with ``options`` (None: its defaults)."""
    if name is None:
        if options is not None:
            raise OptionError(f"defense options {options!r} need a --defense ({', '.join(DEFENSES)})")
        return None
    entry = DEFENSES[name]
    if options is None:
        options = entry.options()
    if not isinstance(options, entry.options):
        raise OptionError(f"--defense {name} takes {entry.options.__name__}, not {type(options).__name__}")
    return entry.build(options, context)
