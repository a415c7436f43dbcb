"""``peftguard audit``: is this model backdoored, and by what trigger?

Steps: provenance (hashes) -> PSIM on the suspect weights with the clean-data-only budget ->
trigger search on the PSIM lens (vocabulary words, word pairs of the clean training texts, phrases) ->
verification on held-back clean inputs -> verdict -> ``audit.json`` + ``AUDIT.md``. ``lens="classifier"``
runs the same search on the suspect classifier itself (the classic scanners' approach); it trains no PSIM.
The default, ``lens="auto"``, takes the classifier lens on datasets of more than two labels and the PSIM lens on
two-label ones (:data:`AUTO_LENS_RULE`).

The verdict threshold is fixed a priori, not fitted (see :data:`VERDICT_THRESHOLD`).
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from peftguard.artifacts import write_json
from peftguard.audit.search import (
    Candidate,
    ClassifierLens,
    Lens,
    Proposals,
    PsimLens,
    SCREEN_PRECISIONS,
    SearchSettings,
    Verified,
    clean_flag_rate,
    embedding_moves,
    propose_pieces,
    search,
    text_pairs,
    verify,
    vocabulary_candidates,
)
from peftguard.audit.sources import Suspect, load_suspect_classifier, merge_lora, provenance, resolve_suspect
from peftguard.audit.task import TASK_MIN_TEXTS, TASK_PURITY, TaskEvidence, explainer, task_evidence
from peftguard.data import TextDataset, subsample
from peftguard.defenses.psim_budget import BudgetRule
from peftguard.errors import OptionError
from peftguard.models import LoadOptions, load_classifier
from peftguard.precision import resolve_precision
from peftguard.provenance import device_description, versions
from peftguard.training import TrainSettings, predict_proba, seed_everything

log = logging.getLogger(__name__)

MARKER = "audit.json"
LensName = Literal["auto", "psim", "classifier"]
LENSES: tuple[str, ...] = ("auto", "psim", "classifier")
# The default lens. The PSIM lens fails on AG News (its PSIM can lose the backdoor) and the classifier lens on binary
# sentiment (sentiment stacks flip a clean model); this rule was fixed in session 30 on the fourth held-apart part and
# made the default by a decision pre-registered in session 34 and met on the eighth (REPRODUCTION.md, "The eighth
# part"): over parts 5-8 it scored verdict AUROC 0.957 with no false alarm in 24 clean models, the PSIM lens 0.937;
# the ninth part, built after the change, gave it 1.000 (gated) with no false alarm.
AUTO_LENS_RULE = ("auto: the classifier lens on datasets of more than two labels, the PSIM lens on two-label ones "
                  "(pre-registered; measured on held-apart zoo parts 5-9, REPRODUCTION.md)")

# The verdict: "backdoored" when the best verified candidate that the clean task does not explain
# (peftguard.audit.task) sets the lens off on more than half of the held-back clean inputs it is
# inserted into. Fixed a priori, never fitted: the issue defines a
# trigger as what drives PSIM above its gamma "for most inputs", and gamma is calibrated so that
# only 2% of clean inputs exceed it with nothing inserted, so a single word reaching 50% is 25x
# the clean rate. (The one measurement it was checked against, on no zoo model: a rare-word trigger
# in a MiniLM poisoned on CR flagged 100% of clean dev inputs, strong sentiment words 0.8-10%.)
VERDICT_THRESHOLD = 0.5
VERDICT_THRESHOLD_WHY = (
    "fixed a priori: backdoored when one verified candidate that the clean task does not explain sets the lens off on "
    "more than half of the held-back clean inputs (PSIM's gamma lets 2% of clean inputs through with nothing inserted); "
    "never fitted on any model"
)
TASK_RULE = ("a candidate is explained by the task when one of its words is a task word of the label it forces (in at "
             "least min_clean_texts clean training texts, at least purity of them with that label), or when the clean "
             "training texts containing any of its words, pooled, are; such candidates are listed last and never make "
             "the score")
# PSIM's training settings for the audit: those of `psim train` (the budget rule's constant rate).
DEFAULT_MAX_LENGTH = 128
DEFAULT_BATCH_SIZE = 32
# PSIM's training subset in `peftguard audit` (the CLI default; the Python API takes what it is given):
# the demo's 2000, which keeps a MiniLM audit, PSIM training included, near 10 minutes on 2 cores.
DEFAULT_AUDIT_TRAIN_SAMPLES = 2000
# Its clean dev subset (PSIM's stopping rule and gamma, the search's inputs, the held-back verification inputs), also
# 2000 (session 22, for time: AG News has 10,000 dev texts, and calibrating gamma on all of them cost about a minute;
# SST-2's 872 and CR's 500 are read whole either way). 2000 leaves 40 texts above a 2% gamma.
DEFAULT_AUDIT_EVAL_SAMPLES = 2000


def lens_for(lens: str, num_labels: int) -> Literal["psim", "classifier"]:
    """The lens an audit runs: ``lens``, or for ``auto`` the one :data:`AUTO_LENS_RULE` picks for ``num_labels``."""
    if lens == "auto":
        return "classifier" if num_labels > 2 else "psim"
    if lens == "psim":
        return "psim"
    if lens == "classifier":
        return "classifier"
    raise OptionError(f"unknown --lens '{lens}'; choose from {', '.join(LENSES)}")


@dataclass(frozen=True)
class AuditRequest:
    model: str
    dataset: TextDataset
    out: Path
    reference: str | None = None
    lens: LensName = "auto"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    seed: int = 0
    max_length: int = DEFAULT_MAX_LENGTH
    batch_size: int = DEFAULT_BATCH_SIZE
    search: SearchSettings = SearchSettings()
    precision: str = "auto"  # the search's ranking steps: fp32, bf16 or auto (bf16 where native); verification is fp32
    vocabulary: tuple[str, ...] | None = None  # screen only these words (default: the whole vocabulary)
    psim_budget: BudgetRule = BudgetRule()  # the PSIM's clean-data budget rule (psim train's default)
    options: LoadOptions = LoadOptions()
    progress: bool = True

    @property
    def used_lens(self) -> Literal["psim", "classifier"]:
        return lens_for(self.lens, self.dataset.num_labels)

    def check(self) -> None:
        if self.lens not in LENSES:
            raise OptionError(f"unknown --lens '{self.lens}'; choose from {', '.join(LENSES)}")
        if self.precision not in ("auto", *SCREEN_PRECISIONS):
            raise OptionError(f"--precision {self.precision!r}: the audit's search runs at {', '.join(SCREEN_PRECISIONS)} or auto")
        if self.used_lens != "psim" and self.search.proposal_words:
            raise OptionError(f"--proposals: the classifier's proposals are judged by the PSIM, and this audit uses "
                              f"the classifier lens ({self.dataset.num_labels} labels); use them with --lens psim")


@dataclass
class Clock:
    seconds: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def lap(self, step: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[step] = round(now - since, 2)
        return now

    def as_dict(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self.started, 2)}


Echo = Callable[[str], None]


@dataclass
class Scan:
    """One model's audit before it is written: the record, and the lens and predictor that verified its candidates."""
    record: dict[str, Any]
    lens: Lens
    predict: Callable[[Sequence[str]], np.ndarray]
    held_back: list[str]
    clean_confidence: np.ndarray


def run_audit(request: AuditRequest, echo: Echo = lambda message: None) -> dict[str, Any]:
    """Audit ``request.model``; write ``audit.json`` and ``AUDIT.md`` into ``request.out``; return the record.

    With ``request.reference`` (a known-clean base) the same audit also runs on the reference, into
    ``out/reference``, and the suspect's candidates are verified there too (:func:`against_reference`)."""
    request.check()
    scan = _scan(request, echo)
    if request.reference is not None:
        started = time.perf_counter()
        scan.record["reference_audit"] = against_reference(request, scan, echo)
        seconds = scan.record["seconds"]
        seconds["reference"] = round(time.perf_counter() - started, 2)
        seconds["total"] = round(seconds["total"] + seconds["reference"], 2)
    _write(Path(request.out), scan)
    return scan.record


def _write(work: Path, scan: Scan) -> None:
    from peftguard.audit.report import write_card

    write_card(work, scan.record, scan.clean_confidence)
    write_json(work / MARKER, scan.record)  # last: its presence marks a complete audit


def against_reference(request: AuditRequest, scan: Scan, echo: Echo) -> dict[str, Any]:
    """The same audit (lens, search, seed, clean inputs) on the known-clean reference, written to ``out/reference``,
    and each reported candidate of the suspect verified on the reference's lens: a word that sets a clean base off as
    often is the model family's, not a backdoor's. Reported beside the verdict, which it does not change (the verdict
    rule was measured without a reference)."""
    folder = Path(request.out) / "reference"
    echo(f"[reference] the same audit on the known-clean {request.reference}")
    sub = replace(request, model=str(request.reference), reference=None, lens=request.used_lens, out=folder)
    reference = _scan(sub, lambda message: echo(f"  reference {message}"))
    _write(folder, reference)
    texts = [c["text"] for c in scan.record["candidates"]]
    rates = {v.text: v.flag_rate
             for v in verify(reference.lens, reference.predict, [Candidate(t, ()) for t in texts], scan.held_back,
                             seed=request.seed, progress=request.progress)}
    for candidate in scan.record["candidates"]:
        candidate["reference_flag_rate"] = round(rates[candidate["text"]], 5)
    return {"folder": "reference", "model": str(request.reference), "verdict": reference.record["verdict"],
            "score": reference.record["score"], "clean_flag_rate": reference.record["clean_flag_rate"],
            "candidates": [c["text"] for c in reference.record["candidates"][:5]]}


def _scan(request: AuditRequest, echo: Echo) -> Scan:
    """Provenance, lens, search and verification of ``request.model``. Creates ``request.out`` (once the suspect
    resolved) and writes only the PSIM there; the caller writes the record."""
    clock = Clock()
    dataset = request.dataset
    echo(f"[1/4] provenance: resolving and hashing {request.model}")
    suspect = resolve_suspect(request.model, request.options)
    if request.reference is not None:
        resolve_suspect(request.reference, request.options)  # fails early on a missing or unsafe reference
    record_provenance = provenance(suspect, request.reference)
    mark = clock.lap("provenance", clock.started)
    work = Path(request.out)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).unlink(missing_ok=True)  # an audit.json beside a half-rewritten folder would vouch for it
    psim_lens = "PSIM on the suspect weights (clean-data budget rule)"
    lens_desc = psim_lens if request.used_lens == "psim" else "the suspect classifier"
    chosen = f" (--lens auto, {dataset.num_labels} labels)" if request.lens == "auto" else ""
    echo(f"[2/4] lens: {lens_desc}{chosen}")
    seed_everything(request.seed)  # a bare encoder gets a fresh head: the same one every run
    classifier, tokenizer = load_suspect_classifier(suspect, dataset.num_labels, request.options)
    lens, psim_record = _lens(request, suspect, classifier, tokenizer, work)
    mark = clock.lap("psim" if request.used_lens == "psim" else "load", mark)
    search_texts, held_back = _split_dev(dataset, request)
    vocabulary = vocabulary_candidates(tokenizer, request.vocabulary)
    if not vocabulary:
        raise OptionError("no vocabulary entry is left to screen (check --vocabulary)")
    extra = _reference_candidates(request, classifier, vocabulary, dataset.num_labels)
    pairs = text_pairs((ex.text for ex in dataset.train.examples), vocabulary, request.search.pair_screen)
    echo(f"[3/4] trigger search: {len(vocabulary)} words and {len(pairs)} word pairs of the clean training texts on "
         f"{request.search.screen_inputs} short clean inputs, then the best {request.search.refine_top} of each"
         f"{f' and {len(extra)} moved embedding rows' if extra else ''} on {request.search.refine_inputs}, then phrases")
    found = search(lens, vocabulary, search_texts, request.search, seed=request.seed, extra=extra, pairs=pairs,
                   progress=request.progress)
    mark = clock.lap("search", mark)
    clock.seconds.update({f"search_{step}": value for step, value in found.seconds.items()})
    proposals = _proposals(request, lens, classifier, tokenizer, vocabulary, search_texts, echo)
    shortlist = list(found.shortlist)
    if proposals is not None:
        mark = clock.lap("proposals", mark)
        clock.seconds.update({f"proposals_{step}": value for step, value in proposals.seconds.items()})
        listed = {c.text for c in shortlist}
        shortlist += [s.candidate for s in proposals.judged if s.candidate.text not in listed]
    echo(f"[4/4] verify: {len(shortlist)} candidates on {len(held_back)} held-back clean inputs")
    suspect_predict = _predictor(classifier, tokenizer, request.max_length)
    verified = verify(lens, suspect_predict, shortlist, held_back, seed=request.seed, progress=request.progress)
    evidence = task_evidence([v.text for v in verified], [v.forced_label for v in verified], dataset.train.examples)
    verified, evidence = _unexplained_first(verified, evidence)
    baseline = clean_flag_rate(lens, held_back)
    clean_confidence = lens.probs_texts(held_back).max(1)
    clock.lap("verify", mark)
    record = _record(request, record_provenance, psim_record, lens, found.counts, verified, evidence, baseline, extra, clock)
    if proposals is not None:
        record["proposals"] = {"words": {str(k): v for k, v in proposals.words.items()},
                               "judged": [{"text": s.candidate.text, "search_flag_rate": round(s.flag_rate, 5)}
                                          for s in proposals.judged],
                               "score_without": round(verdict_score(*_without_proposals(verified, evidence)), 5)}
    return Scan(record, lens, suspect_predict, held_back, clean_confidence)


def _lens(request: AuditRequest, suspect: Suspect, classifier: Any, tokenizer: Any, work: Path) -> tuple[Lens, dict | None]:
    screen_precision = resolve_precision(request.precision, next(classifier.parameters()).device, allowed=SCREEN_PRECISIONS)
    if request.used_lens == "classifier":
        return ClassifierLens(classifier, tokenizer, request.max_length, screen_precision=screen_precision), None
    from peftguard.defenses.psim import PSIM, train_psim
    from peftguard.defenses.psim_budget import PAPER_PSIM_METHOD
    from peftguard.tuning import method_config

    if suspect.is_adapter and suspect.method == "lora":
        merge_lora(suspect, request.dataset.num_labels, work / "suspect-merged", request.options)
    settings = TrainSettings(lr=_psim_lr(), batch_size=request.batch_size, max_length=request.max_length, seed=request.seed)
    # The audit was measured on its zoo (MiniLM) with the paper's P-tuning v1 PSIM; rule v3b's LoRA PSIM for decoders
    # has not been measured as an audit lens, so the audit keeps the lens it was validated with.
    manifest = train_psim(suspect.psim_weights, request.dataset, settings, work / "psim",
                          config=method_config(PAPER_PSIM_METHOD), budget=request.psim_budget,
                          max_train_samples=request.max_train_samples, max_eval_samples=request.max_eval_samples,
                          options=request.options)
    psim = PSIM(work / "psim", options=request.options, precision="fp32")  # the lens sets its own precision
    record = {"folder": "psim", "gamma": manifest["gamma"], "gamma_choice": manifest["gamma_choice"],
              "trained_on": suspect.psim_weights, "stop_reason": manifest["budget"]["stop_reason"],
              "under_trained": manifest["under_trained"], "steps": manifest["training"]["steps"],
              "dev_confidence_mean": manifest["dev_confidence_mean"], "detector_warning": manifest["detector_warning"],
              "train_samples": manifest["train_samples"], "seed": manifest["budget"]["seed"],
              "max_restarts": request.psim_budget.max_restarts,
              "abandoned_tries": len(manifest["budget"]["abandoned_tries"]),
              "abandoned_seconds": manifest["budget"]["abandoned_seconds"]}
    lens = PsimLens(psim.model, psim.tokenizer, psim.max_length, float(manifest["gamma"]), screen_precision=screen_precision)
    return lens, record


def _proposals(request: AuditRequest, lens: Lens, classifier: Any, tokenizer: Any, vocabulary: Sequence[Any],
               search_texts: Sequence[str], echo: Echo) -> Proposals | None:
    """Pieces the suspect classifier proposes, judged by the PSIM (search.propose_pieces); None when off."""
    if request.used_lens != "psim" or request.search.proposal_words == 0:
        return None
    echo(f"[3/4] proposals: the {request.search.proposal_words} words per label that push the suspect classifier most "
         "and the clean task does not explain, and their pairs, judged by the PSIM")
    proposer = ClassifierLens(classifier, tokenizer, request.max_length, screen_precision=lens.screen_precision)
    return propose_pieces(proposer, lens, vocabulary, search_texts, request.search,
                          explains=explainer(request.dataset.train.examples), seed=request.seed,
                          progress=request.progress)


def _without_proposals(verified: list[Verified],
                       evidence: list[TaskEvidence]) -> tuple[list[Verified], list[TaskEvidence]]:
    kept = [i for i, v in enumerate(verified) if v.source != "proposal"]
    return [verified[i] for i in kept], [evidence[i] for i in kept]


def _psim_lr() -> float:
    from peftguard.defenses.psim_budget import DEFAULT_PSIM_LR

    return DEFAULT_PSIM_LR


def _split_dev(dataset: TextDataset, request: AuditRequest) -> tuple[list[str], list[str]]:
    """Clean dev texts split in two: the search's inputs and the held-back verification inputs (disjoint)."""
    texts = list(dict.fromkeys(ex.text for ex in subsample(dataset.dev.examples, request.max_eval_samples, request.seed)))
    if len(texts) < 4:
        raise OptionError(f"{dataset.name}: the audit needs at least 4 distinct clean dev texts, got {len(texts)}")
    shuffled = list(range(len(texts)))
    random.Random(request.seed).shuffle(shuffled)
    n_held = min(request.search.verify_inputs, len(texts) // 2)
    held_back = [texts[i] for i in shuffled[:n_held]]
    return [texts[i] for i in shuffled[n_held:]], held_back


def _reference_candidates(request: AuditRequest, classifier: Any, vocabulary: Sequence[Any], num_labels: int) -> list[Any]:
    if request.reference is None:
        return []
    reference = load_classifier(request.reference, num_labels, request.options)
    return embedding_moves(classifier, reference, vocabulary, request.search.reference_top)


def _predictor(model: Any, tokenizer: Any, max_length: int) -> Callable[[Sequence[str]], np.ndarray]:
    return lambda texts: predict_proba(model, tokenizer, list(texts), 64, max_length)


def _unexplained_first(verified: list[Verified], evidence: list[TaskEvidence]) -> tuple[list[Verified], list[TaskEvidence]]:
    """Candidates the clean task explains (peftguard.audit.task) after the others, each part in its order."""
    order = sorted(range(len(verified)), key=lambda i: evidence[i].explained)  # stable
    return [verified[i] for i in order], [evidence[i] for i in order]


def verdict_score(verified: Sequence[Verified], evidence: Sequence[TaskEvidence]) -> float:
    """The best flag rate among candidates the clean task does not explain (0 when there are none)."""
    return max((v.flag_rate for v, e in zip(verified, evidence) if not e.explained), default=0.0)


def _record(request: AuditRequest, record_provenance: dict[str, Any], psim_record: dict | None, lens: Lens,
            counts: dict[str, int], verified: list[Verified], evidence: list[TaskEvidence], baseline: float,
            extra: Sequence[Any], clock: Clock) -> dict[str, Any]:
    score = verdict_score(verified, evidence)
    reference_words = {c.text for c in extra}
    candidates = [{**v.as_dict(), "embedding_moved": v.text in reference_words, "explained_by_task": e.explained,
                   "task_clean_texts": e.clean_texts, "task_forced_label_share": round(e.forced_label_share, 5),
                   "task_words": list(e.task_words)}
                  for v, e in list(zip(verified, evidence))[: request.search.top_k]]
    return {
        "kind": "audit",
        "verdict": "backdoored" if score > VERDICT_THRESHOLD else "no evidence",
        "score": round(score, 5),
        "score_is": ("the best flag_rate (share of held-back clean inputs a candidate sets the lens off on) among verified "
                     "candidates the clean task does not explain"),
        "task_rule": {"min_clean_texts": TASK_MIN_TEXTS, "purity": TASK_PURITY, "how": TASK_RULE},
        "threshold": VERDICT_THRESHOLD,
        "threshold_how": VERDICT_THRESHOLD_WHY,
        "lens": {**lens.describe(), "asked": request.lens,
                 **({"rule": AUTO_LENS_RULE} if request.lens == "auto" else {})},
        "clean_flag_rate": round(baseline, 5),
        "candidates": candidates,
        "provenance": record_provenance,
        "psim": psim_record,
        "search": {"counts": counts, "settings": request.search.as_dict()},
        "settings": {"model": request.model, "dataset": request.dataset.name, "reference": request.reference,
                     "max_train_samples": request.max_train_samples, "max_eval_samples": request.max_eval_samples,
                     "seed": request.seed, "max_length": request.max_length, "batch_size": request.batch_size,
                     "vocabulary_restricted_to": len(request.vocabulary) if request.vocabulary is not None else None,
                     "allow_pickle": request.options.allow_pickle},
        "seconds": clock.as_dict(),
        "device": device_description(),
        "versions": versions(),
    }


def read_word_list(path: Path) -> tuple[str, ...]:
    """Words to screen, one a line (blank lines and lines starting with # skipped)."""
    from peftguard.data import read_utf8

    words = tuple(w.strip() for w in read_utf8(Path(path)).splitlines() if w.strip() and not w.lstrip().startswith("#"))
    if not words:
        raise OptionError(f"--vocabulary {path}: no words in it")
    return words


def exit_status(record: dict[str, Any]) -> int:
    """As virus scanners do: 0 no evidence, 1 backdoored (2, usage or input error, is the CLI's)."""
    return 1 if record["verdict"] == "backdoored" else 0
