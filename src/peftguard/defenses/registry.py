"""Defense name → builder, and the options each defense takes (the CLI's ``--defense``).

Input defenses (psim, onion, back-translation, scpd) screen or rewrite the test inputs; the
model-level defense (fine-mixing) yields a new victim that is evaluated in place of the old one.
An option given for a defense that does not use it is an error, not silently ignored.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from peftguard.data import subsample
from peftguard.defenses.base import DefenseContext, InputDefense, ModelDefense
from peftguard.errors import OptionError, PeftguardError


@dataclass(frozen=True)
class DefenseOptions:
    """Defense settings as the user gave them; None (or empty) means the defense's default."""

    psim_dir: Path | None = None
    gamma: float | None = None
    target_fpr: float | None = None
    backend: str | None = None
    lm: tuple[str, ...] = ()
    onion_bar: tuple[float, ...] = ()
    onion_cache: Path | None = None
    precomputed: Path | None = None
    precomputed_triggered: Path | None = None
    mix_ratio: float | None = None
    clean_model: str | None = None
    fine_mixed: Path | None = None
    max_train_samples: int | None = None

    def given(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) not in (None, ())]


FLAGS = {
    "psim_dir": "--psim", "gamma": "--gamma", "target_fpr": "--target-fpr", "backend": "--backend", "lm": "--lm",
    "onion_bar": "--onion-bar", "onion_cache": "--onion-cache", "precomputed": "--precomputed",
    "precomputed_triggered": "--precomputed-triggered", "mix_ratio": "--mix-ratio", "clean_model": "--clean-model",
    "fine_mixed": "--fine-mixed",
    "max_train_samples": "--max-train-samples",
}

Defense = InputDefense | ModelDefense


def _psim(o: DefenseOptions, c: DefenseContext) -> Defense:
    from peftguard.defenses.psim import PSIM, PSIMDefense, check_gamma_options

    check_gamma_options(o.gamma, o.target_fpr)
    if o.psim_dir is None:
        raise OptionError("--defense psim needs --psim PSIM_DIR (train one with `peftguard psim train`)")
    psim = PSIM(o.psim_dir, options=c.options)
    if psim.num_labels != c.dataset.num_labels:
        raise PeftguardError(f"PSIM {o.psim_dir} has {psim.num_labels} labels; the dataset has {c.dataset.num_labels}")
    dev = subsample(c.dataset.dev.examples, c.max_eval_samples, c.seed)
    return PSIMDefense(psim, psim.gamma_for(dev, o.gamma, o.target_fpr))


def _onion(o: DefenseOptions, c: DefenseContext) -> Defense:
    from peftguard.defenses.onion import OnionConfig, build_onion

    if len(o.lm) > 1:
        raise OptionError("--defense onion takes one --lm (a causal language model)")
    config = OnionConfig(lm=o.lm[0] if o.lm else OnionConfig.lm, cache=o.onion_cache)
    return build_onion(config, bars=o.onion_bar, options=c.options)


def _back_translation(o: DefenseOptions, c: DefenseContext) -> Defense:
    from peftguard.defenses.back_translation import BackTranslationConfig, build_back_translation

    config = BackTranslationConfig(backend=o.backend or "apertium", precomputed=o.precomputed,
                                   precomputed_triggered=o.precomputed_triggered)
    if o.lm:
        if config.backend != "marian":
            raise OptionError("--lm with --defense back-translation is for --backend marian (two translation models)")
        config = BackTranslationConfig(backend="marian", models=o.lm)
    return build_back_translation(config, c)


def _scpd(o: DefenseOptions, c: DefenseContext) -> Defense:
    from peftguard.defenses.scpd import SCPDConfig, build_scpd

    if len(o.lm) > 1:
        raise OptionError("--defense scpd takes one --lm (a paraphrase model)")
    config = SCPDConfig(backend=o.backend or "precomputed", model=o.lm[0] if o.lm else None,
                        precomputed=o.precomputed, precomputed_triggered=o.precomputed_triggered)
    return build_scpd(config, c)


def _fine_mixing(o: DefenseOptions, c: DefenseContext) -> Defense:
    from peftguard.defenses.fine_mixing import FineMixingConfig, FineMixingDefense

    config = FineMixingConfig(**{k: v for k, v in {"mix_ratio": o.mix_ratio, "clean_model": o.clean_model}.items()
                                 if v is not None}, seed=c.seed)
    return FineMixingDefense(config, c.dataset, out_dir=o.fine_mixed, max_train_samples=o.max_train_samples,
                             max_eval_samples=c.max_eval_samples, options=c.options)


@dataclass(frozen=True)
class DefenseEntry:
    build: Callable[[DefenseOptions, DefenseContext], Defense]
    options: frozenset[str]
    summary: str


REWRITE_OPTIONS = frozenset({"backend", "lm", "precomputed", "precomputed_triggered"})
DEFENSES: dict[str, DefenseEntry] = {
    "psim": DefenseEntry(_psim, frozenset({"psim_dir", "gamma", "target_fpr"}),
                         "flag inputs a PSIM is confident on (Zhao et al., 2024)"),
    "onion": DefenseEntry(_onion, frozenset({"lm", "onion_bar", "onion_cache"}),
                          "remove words whose removal lowers LM perplexity (Qi et al., 2021a)"),
    "back-translation": DefenseEntry(_back_translation, REWRITE_OPTIONS,
                                     "translate to a pivot language and back (Qi et al., 2021b)"),
    "scpd": DefenseEntry(_scpd, REWRITE_OPTIONS,
                         "paraphrase into a fixed syntactic template (Qi et al., 2021b)"),
    "fine-mixing": DefenseEntry(_fine_mixing, frozenset({"mix_ratio", "clean_model", "fine_mixed", "max_train_samples"}),
                                "mix weights with the clean model, fine-tune again (Zhang et al., 2022)"),
}


def build_defense(name: str | None, options: DefenseOptions, context: DefenseContext) -> Defense | None:
    """The defense called ``name`` (None: no defense), refusing options it does not take."""
    given = options.given()
    if name is None:
        if given:
            raise OptionError(f"{'/'.join(FLAGS[g] for g in given)} need a --defense ({', '.join(DEFENSES)})")
        return None
    try:
        entry = DEFENSES[name]
    except KeyError:
        raise OptionError(f"unknown defense '{name}'; available: {', '.join(DEFENSES)}") from None
    stray = [g for g in given if g not in entry.options]
    if stray:
        raise OptionError(f"{'/'.join(FLAGS[g] for g in stray)} are not options of --defense {name}")
    return entry.build(options, context)
