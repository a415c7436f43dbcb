"""SCPD, the syntactically controlled paraphrase defense (Qi et al., 2021b, "Hidden Killer", Section 6).

Every input is paraphrased by SCPN into one fixed, common syntactic template before the victim
sees it; a trigger tied to the surface form (a word, a sentence, a rare syntax) rarely survives.

Backends:

* ``precomputed`` (default): the PSIM authors' SCPN paraphrases shipped with the data,
  ``paraphrase_defense/test_spcn.csv`` (clean test set) and ``test_char_spcn.csv`` (label-1 test
  rows with BadNet ``mn`` inserted at the authors' positions, then paraphrased); the template they
  used is not documented. Only sst2, cr and cola have them, and only for BadNet ``mn``.
* ``seq2seq``: a paraphrase model the user provides (``--lm`` folder or hub id, an optional text
  ``prefix``). Departs from the paper: a generic seq2seq paraphraser is not told a target syntax,
  unlike SCPN. No paraphrase model is available offline here, so this path is untested offline.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftguard.defenses.base import DefenseContext
from peftguard.defenses.registry import register_defense
from peftguard.defenses.rewriting import Rewrite, RewritingDefense, precomputed_backend
from peftguard.errors import OptionError


@dataclass(frozen=True)
class SCPDConfig:
    """The defense's options: ``flag`` is the CLI flag that sets a field."""

    backend: str = field(default="precomputed", metadata={"help": "precomputed (default) | seq2seq", "flag": "--backend"})
    model: str | None = field(default=None, metadata={"help": "seq2seq: paraphrase model (folder or hub id)", "flag": "--lm"})
    prefix: str = field(default="", metadata={"help": "seq2seq: text put before each input (e.g. 'paraphrase: ')"})
    batch_size: int = field(default=16, metadata={"help": "seq2seq: texts per generate call"})
    precomputed: Path | None = field(default=None, metadata={
        "help": "clean test paraphrases, aligned by row [test_spcn.csv]", "flag": "--precomputed"})
    precomputed_triggered: Path | None = field(default=None, metadata={
        "help": "triggered ones [test_char_spcn.csv: BadNet mn only]", "flag": "--precomputed-triggered"})

    def label(self) -> str:
        """The backend a report row names."""
        if self.backend == "precomputed":
            return f"precomputed {self.precomputed.name}" if self.precomputed else "SCPN paraphrases of the PSIM authors"
        return f"{self.backend} {self.model}" if self.model else self.backend


def _precomputed(config: SCPDConfig, context: DefenseContext) -> tuple[Rewrite, dict[str, Any]]:
    try:
        return precomputed_backend(context, config.precomputed, config.precomputed_triggered,
                                   ("test_spcn.csv", "test_char_spcn.csv"), "SCPN paraphrases")
    except OptionError as exc:
        if config.precomputed is None and "no precomputed" in str(exc):
            raise OptionError(f"{exc}, or use --backend seq2seq --lm MODEL with your own paraphrase model "
                              "(no paraphrase model is available offline here)") from None
        raise


def _seq2seq(config: SCPDConfig, context: DefenseContext) -> tuple[Rewrite, dict[str, Any]]:
    if config.model is None:
        raise OptionError("--backend seq2seq needs --lm MODEL, a paraphrase model folder or hub id "
                          "(no paraphrase model is available offline here)")
    from peftguard.paraphrase import Seq2SeqParaphraser

    model = Seq2SeqParaphraser(config.model, batch_size=config.batch_size, prefix=config.prefix,
                               options=context.options)
    return (lambda texts: [" ".join(t.split()) for t in model.paraphrase(texts)],
            {"backend": "seq2seq", "model": config.model, "prefix": config.prefix})


BACKENDS: dict[str, Callable[[SCPDConfig, DefenseContext], tuple[Rewrite, dict[str, Any]]]] = {
    "precomputed": _precomputed,
    "seq2seq": _seq2seq,
}


@register_defense("scpd", options=SCPDConfig, summary="paraphrase into a fixed syntactic template (Qi et al., 2021b)", order=3)
def build_scpd(config: SCPDConfig, context: DefenseContext) -> RewritingDefense:
    try:
        backend = BACKENDS[config.backend]
    except KeyError:
        raise OptionError(f"unknown SCPD backend '{config.backend}'; choose from {', '.join(BACKENDS)}") from None
    if config.backend != "precomputed" and (config.precomputed or config.precomputed_triggered):
        raise OptionError("--precomputed/--precomputed-triggered need --backend precomputed")
    if config.backend != "seq2seq" and config.model is not None:
        raise OptionError("--lm is for --backend seq2seq (the paraphrase model)")
    rewrite, settings = backend(config, context)
    return RewritingDefense("scpd", rewrite, settings)
