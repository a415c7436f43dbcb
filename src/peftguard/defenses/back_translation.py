"""Back-translation (Qi et al., 2021b, "Mind the Style of Text!"; the PSIM paper's "Back Tr.").

Every input is translated into a pivot language and back; the paraphrase keeps the meaning but may
lose an inserted trigger. The victim classifies the round-tripped text.

Backends:

* ``apertium`` (default, offline): Debian's rule-based ``apertium`` with ``apertium-eng-spa``,
  English → Spanish → English. Departs from the paper's neural English → German → English: a rule-
  based translator copies words it does not know through unchanged, so a rare-word trigger such as
  ``mn`` survives the round trip by design, and its English is stiffer than a neural model's.
* ``marian``: any MarianMT pair from folders or the hub (default Helsinki-NLP opus-mt en-de and
  de-en, the paper's pivot), given as ``--lm TO_PIVOT --lm BACK``. No translation model is
  installed here, so this path is untested offline.
* ``precomputed``: rewrites read from files aligned with the test split, by default the PSIM
  authors' ``paraphrase_defense/test_back.csv`` (clean) and ``test_char_back.csv`` (BadNet ``mn``).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftguard.defenses.base import DefenseContext
from peftguard.defenses.registry import register_defense
from peftguard.defenses.rewriting import Rewrite, RewritingDefense, precomputed_backend
from peftguard.errors import OptionError, PeftguardError
from peftguard.models import LoadOptions

APERTIUM_INSTALL = "apt-get install -y apertium apertium-eng-spa"
MARIAN_DEFAULT = ("Helsinki-NLP/opus-mt-en-de", "Helsinki-NLP/opus-mt-de-en")


@dataclass(frozen=True)
class BackTranslationConfig:
    """The defense's options: ``flag`` is the CLI flag that sets a field."""

    backend: str = field(default="apertium", metadata={"help": "apertium (default) | marian | precomputed", "flag": "--backend"})
    pivot: str = field(default="spa", metadata={"help": "apertium: pivot language (modes eng-<pivot>, <pivot>-eng)"})
    models: tuple[str, ...] = field(default=MARIAN_DEFAULT, metadata={
        "help": "marian: give twice (English→pivot, pivot→English) [opus-mt en-de, de-en]", "flag": "--lm"})
    batch_size: int = field(default=16, metadata={"help": "marian: texts per generate call"})
    precomputed: Path | None = field(default=None, metadata={
        "help": "clean test rewrites, aligned by row [<data>/<dataset>/paraphrase_defense/test_back.csv]", "flag": "--precomputed"})
    precomputed_triggered: Path | None = field(default=None, metadata={
        "help": "triggered test rewrites, aligned with the non-target test rows [test_char_back.csv: BadNet mn only]",
        "flag": "--precomputed-triggered"})

    def label(self) -> str:
        """The backend a report row names (apertium is named as such: it copies unknown words through)."""
        if self.backend == "apertium":
            return f"apertium eng-{self.pivot}-eng"
        if self.backend == "marian":
            return "marian " + " + ".join(self.models)
        if self.backend == "precomputed" and self.precomputed is None:
            return "precomputed round trips of the PSIM authors"
        return f"{self.backend} {self.precomputed.name}" if self.precomputed else self.backend


class Apertium:
    """English → pivot → English with the ``apertium`` command, one text per line."""

    def __init__(self, pivot: str = "spa", source: str = "eng", binary: str = "apertium") -> None:
        if shutil.which(binary) is None:
            raise PeftguardError(f"the apertium backend needs the apertium command: {APERTIUM_INSTALL}")
        self.modes, self.binary = (f"{source}-{pivot}", f"{pivot}-{source}"), binary

    def __call__(self, texts: list[str]) -> list[str]:
        lines = [" ".join(t.split()) for t in texts]  # one line per text
        out = self._run(self.modes[1], self._run(self.modes[0], lines))
        return [_unmark(back, source) for back, source in zip(out, lines)]

    def _run(self, mode: str, lines: list[str]) -> list[str]:
        # -u: unknown words are copied through without apertium's '*' mark.
        proc = subprocess.run([self.binary, "-u", mode], input="\n".join(lines) + "\n",
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["no message"])[0]
            raise PeftguardError(f"apertium {mode} failed ({reason}); is the pair installed? {APERTIUM_INSTALL}")
        out = proc.stdout.split("\n")
        if out and out[-1] == "":
            out.pop()
        if len(out) != len(lines):
            raise PeftguardError(f"apertium {mode} returned {len(out)} lines for {len(lines)} texts")
        return out


def _unmark(text: str, source: str) -> str:
    """Drop apertium's '#' (generation) and '@' (untranslated) marks where the source had none."""
    for mark in "#@":
        if mark not in source:
            text = text.replace(mark, "")
    return re.sub(r"\s+", " ", text).strip()


class Marian:
    """English → pivot → English with two seq2seq translation models (MarianMT or alike)."""

    def __init__(self, to_pivot: str, back: str, batch_size: int, options: LoadOptions) -> None:
        from peftguard.paraphrase import Seq2SeqParaphraser  # a plain seq2seq generate loop

        self.to_pivot = Seq2SeqParaphraser(to_pivot, batch_size=batch_size, options=options)
        self.back = Seq2SeqParaphraser(back, batch_size=batch_size, options=options)

    def __call__(self, texts: list[str]) -> list[str]:
        return [" ".join(t.split()) for t in self.back.paraphrase(self.to_pivot.paraphrase(texts))]


def _apertium(config: BackTranslationConfig, context: DefenseContext) -> tuple[Rewrite, dict[str, Any]]:
    rewrite = Apertium(config.pivot)
    return rewrite, {"backend": "apertium", "pivot": config.pivot, "modes": list(rewrite.modes)}


def _marian(config: BackTranslationConfig, context: DefenseContext) -> tuple[Rewrite, dict[str, Any]]:
    if len(config.models) != 2:
        raise OptionError(f"--backend marian takes two models (--lm TO_PIVOT --lm BACK), got {len(config.models)}")
    to_pivot, back = config.models
    rewrite = Marian(to_pivot, back, config.batch_size, context.options)
    return rewrite, {"backend": "marian", "models": list(config.models)}


def _precomputed(config: BackTranslationConfig, context: DefenseContext) -> tuple[Rewrite, dict[str, Any]]:
    return precomputed_backend(context, config.precomputed, config.precomputed_triggered,
                               ("test_back.csv", "test_char_back.csv"), "back-translations")


BACKENDS: dict[str, Callable[[BackTranslationConfig, DefenseContext], tuple[Rewrite, dict[str, Any]]]] = {
    "apertium": _apertium,
    "marian": _marian,
    "precomputed": _precomputed,
}


@register_defense("back-translation", options=BackTranslationConfig,
                  summary="translate to a pivot language and back (Qi et al., 2021b)", order=2)
def build_back_translation(config: BackTranslationConfig, context: DefenseContext) -> RewritingDefense:
    if config.backend != "marian" and config.models != MARIAN_DEFAULT:
        raise OptionError("--lm with --defense back-translation is for --backend marian (two translation models)")
    try:
        backend = BACKENDS[config.backend]
    except KeyError:
        known = ", ".join(BACKENDS)
        raise OptionError(f"unknown back-translation backend '{config.backend}'; choose from {known}") from None
    if config.backend != "precomputed" and (config.precomputed or config.precomputed_triggered):
        raise OptionError("--precomputed/--precomputed-triggered need --backend precomputed")
    rewrite, settings = backend(config, context)
    return RewritingDefense("back-translation", rewrite, settings)
