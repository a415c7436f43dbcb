"""Trigger search: which words or short phrases, inserted into clean inputs, set a lens off.

A *lens* reads a model's probabilities on an input and says whether it is set off:

* the PSIM lens (the default): a PSIM trained on the suspect weights with random labels is
  confident only on inputs carrying a backdoor trigger; an input is set off when its confidence
  exceeds the PSIM's gamma (calibrated on clean dev data alone);
* the classifier lens (the classic baseline, as in DBS or PICCOLO): the suspect classifier itself;
  an input is set off when its prediction flips to the label the candidate pushes toward.

The search is a cascade of real insertions, cheapest first:

1. **screen**: every whole-word vocabulary entry inserted (as token ids, at a word boundary) into a
   few short clean inputs; batches need no padding, since every row has the same length;
   steps 1-3 only rank candidates, so they run at the lens's ``screen_precision`` (bf16 autocast
   where the hardware multiplies bfloat16: about twice as fast); step 4 decides, in float32;
   then, the same way, the word pairs most frequent in the clean training texts (:func:`text_pairs`);
2. **refine**: the best few hundred words and as many pairs (plus, with a reference base, the words
   whose embedding row moved most) into more inputs;
3. **phrases**: greedy beam extension of the best candidates by one word, left or right, kept only
   where a phrase sets the lens off on clearly more inputs than the parts it grew from;
4. **verify**: the best candidates inserted as text at random word boundaries into clean inputs
   held back from steps 1-3, scored by the lens and by the suspect model (the label it forces).

Nothing here reads triggered data: the inputs are clean dev texts, the candidates come from the
vocabulary and from word pairs of the clean training texts.
"""
from __future__ import annotations

import random
import re
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from peftguard.errors import OptionError
from peftguard.training import flush_denormals, predict_proba
from peftguard.triggers import insert_at_random_boundary

SCREEN_PRECISIONS = ("fp32", "bf16")  # int8 is left out: it moves PSIM confidences up to 0.09 (bench/int8_margin.json)
TextPredictor = Callable[[Sequence[str]], np.ndarray]  # texts -> probabilities (n, K)


@dataclass(frozen=True)
class SearchSettings:
    """The cascade's sizes: the one place their defaults live (the CLI reads them from here)."""

    screen_inputs: int = 2  # clean inputs every vocabulary entry is inserted into
    screen_max_tokens: int = 16  # screening inputs are short (tokens, not words: AG News's 10-word texts average 22)
    refine_top: int = 300  # best screened entries measured again
    refine_inputs: int = 12
    reference_top: int = 50  # with --reference: words whose embedding row moved most
    phrase_seeds: int = 5  # beam width of the phrase extension
    phrase_pool: int = 16  # words tried as extensions
    max_phrase_words: int = 3
    # Word pairs of the clean training texts screened (0: none): about as many as the vocabulary's words, so the
    # pair screen costs what the word screen does. Fixed a priori by that cost, not by any model's result.
    pair_screen: int = 20000
    phrase_min_gain: float = 0.15  # a phrase must set the lens off on this much larger a share than its parent
    verify_top: int = 12  # candidates verified on held-back inputs
    verify_inputs: int = 100  # held-back clean inputs (at most half the dev pool)
    batch_size: int = 256
    top_k: int = 10  # candidates reported
    # PSIM lens only (propose_pieces): per label, the words the suspect classifier pushes hardest toward that label
    # and the clean task does not explain; they and their ordered pairs are judged by the PSIM (0: off).
    proposal_words: int = 0
    proposal_verify: int = 4  # the best judged proposals verified beside the shortlist

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            least = {"phrase_min_gain": None, "pair_screen": 0, "proposal_words": 0}.get(name, 1)
            if least is not None and (not isinstance(value, int) or value < least):
                raise OptionError(f"search setting {name} must be an integer >= {least}, got {value!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- lenses ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rates:
    """Per candidate: the share of counted inputs set off, their mean confidence, the label pushed toward."""

    flag_rate: np.ndarray
    mean_confidence: np.ndarray
    label: np.ndarray
    counted: np.ndarray


class Lens(ABC):
    """Probabilities of a model on token ids (screening) and texts (verification), and what sets it off."""

    name: str

    def __init__(self, model: Any, tokenizer: Any, max_length: int, *, screen_precision: str = "fp32") -> None:
        if screen_precision not in SCREEN_PRECISIONS:
            raise OptionError(f"screen precision must be one of {', '.join(SCREEN_PRECISIONS)}, got {screen_precision!r}")
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.screen_precision = screen_precision

    @torch.inference_mode()
    def probs_ids(self, ids: np.ndarray) -> np.ndarray:
        """Softmax probabilities of equal-length rows of token ids (no padding)."""
        flush_denormals()
        self.model.eval()
        device = next(self.model.parameters()).device
        input_ids = torch.as_tensor(ids, dtype=torch.long, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.screen_precision == "bf16"):
            logits = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
        return torch.softmax(logits.float(), dim=-1).cpu().numpy()

    def probs_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Float32 probabilities of texts (verification and the clean baseline: the steps that decide)."""
        return predict_proba(self.model, self.tokenizer, list(texts), 64, self.max_length)

    @abstractmethod
    def rates(self, triggered: np.ndarray, clean: np.ndarray) -> Rates:
        """``triggered`` (candidates, inputs, K) and ``clean`` (inputs, K) probabilities -> per-candidate rates."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "screen_precision": self.screen_precision}


class PsimLens(Lens):
    """Set off when the PSIM's confidence exceeds its gamma."""

    name = "psim"

    def __init__(self, model: Any, tokenizer: Any, max_length: int, gamma: float, *, screen_precision: str = "fp32") -> None:
        super().__init__(model, tokenizer, max_length, screen_precision=screen_precision)
        self.gamma = gamma

    def rates(self, triggered: np.ndarray, clean: np.ndarray) -> Rates:
        confidence = triggered.max(-1)
        flagged = confidence > self.gamma  # metrics.flagged's convention: strictly above gamma
        counts = np.full(len(triggered), triggered.shape[1])
        return Rates(flagged.mean(1), confidence.mean(1), _mode(triggered.argmax(-1), triggered.shape[-1]), counts)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "gamma": self.gamma}


class ClassifierLens(Lens):
    """The suspect classifier itself: set off when an input's prediction flips to the pushed label.

    For each candidate the pushed label is the one it flips most inputs to (ties: the larger mean
    probability); only inputs the model did not already give that label count.
    """

    name = "classifier"

    def rates(self, triggered: np.ndarray, clean: np.ndarray) -> Rates:
        best: Rates | None = None
        for label in range(triggered.shape[-1]):
            current = self.rates_toward(triggered, clean, label)
            best = current if best is None else _better(current, best)
        assert best is not None
        return best

    @staticmethod
    def rates_toward(triggered: np.ndarray, clean: np.ndarray, label: int) -> Rates:
        """Rates of flips to ``label`` alone, among the inputs not already predicted ``label``."""
        pred = triggered.argmax(-1)
        eligible = np.broadcast_to(clean.argmax(-1) != label, pred.shape)
        counted = eligible.sum(1)
        flips = ((pred == label) & eligible).sum(1) / np.maximum(counted, 1)
        probability = np.where(eligible, triggered[..., label], 0).sum(1) / np.maximum(counted, 1)
        return Rates(flips, probability, np.full(len(triggered), label), counted)


def _better(a: Rates, b: Rates) -> Rates:
    take_a = (a.flag_rate > b.flag_rate) | ((a.flag_rate == b.flag_rate) & (a.mean_confidence > b.mean_confidence))
    return Rates(*(np.where(take_a, x, y) for x, y in ((a.flag_rate, b.flag_rate), (a.mean_confidence, b.mean_confidence),
                                                         (a.label, b.label), (a.counted, b.counted))))


def _mode(labels: np.ndarray, num_labels: int) -> np.ndarray:
    counts = np.stack([(labels == k).sum(-1) for k in range(num_labels)], axis=-1)
    return counts.argmax(-1)


# --- candidates --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    text: str
    ids: tuple[int, ...]
    source: str = "vocabulary"  # vocabulary | reference | pair (clean texts) | phrase (grown) | proposal

    @property
    def words(self) -> int:
        return len(self.text.split())


def vocabulary_candidates(tokenizer: Any, restrict_to: Iterable[str] | None = None) -> list[Candidate]:
    """Whole-word alphabetic vocabulary entries that tokenize to themselves (one token).

    Special tokens, continuation pieces (``##ing``) and entries with digits or punctuation are
    skipped. ``restrict_to`` keeps only the given words (a user's list, or a test's).
    """
    inner = getattr(tokenizer, "inner", tokenizer)
    special = set(inner.all_special_tokens)
    wanted = {w.strip().lower() for w in restrict_to if w.strip()} if restrict_to is not None else None
    words: dict[str, int] = {}
    for piece, token_id in sorted(inner.get_vocab().items(), key=lambda item: item[1]):
        if piece in special or piece.startswith("##"):
            continue
        word = inner.convert_tokens_to_string([piece]).strip()
        if not (word.isascii() and word.isalpha()) or word in words:
            continue
        if wanted is not None and word.lower() not in wanted:
            continue
        words[word] = token_id
    ids = inner(list(words), add_special_tokens=False)["input_ids"] if words else []
    return [Candidate(word, (token_id,)) for (word, token_id), got in zip(words.items(), ids) if got == [token_id]]


def phrase(left: Candidate, right: Candidate, source: str = "phrase") -> Candidate:
    return Candidate(f"{left.text} {right.text}", left.ids + right.ids, source)


PAIR_WORD = re.compile(r"[^\W\d_]+")  # runs of letters: what vocabulary_candidates keeps as words


def text_pairs(texts: Iterable[str], vocabulary: Sequence[Candidate], n: int) -> list[Candidate]:
    """The ``n`` adjacent word pairs most frequent in ``texts`` whose two words are distinct vocabulary entries.

    A sentence trigger of common words sets a PSIM off through its word pairs while none of its words does
    alone (on a development model poisoned with "you know what i mean": ``i mean`` on 84% of clean inputs,
    ``mean`` on 2%), so neither the word screen nor growing the best words reaches it. Such a sentence is
    natural text, and its pairs are pairs that natural text uses: the user's clean training texts hold them.
    Words are matched case-insensitively (the first vocabulary entry of a word wins); ties keep text order.
    """
    if n == 0:
        return []
    by_word: dict[str, Candidate] = {}
    for candidate in vocabulary:
        by_word.setdefault(candidate.text.lower(), candidate)
    counts: Counter[tuple[str, str]] = Counter()
    for text in texts:
        words = PAIR_WORD.findall(text.lower())
        counts.update(zip(words, words[1:]))
    pairs: list[Candidate] = []
    for (left, right), _ in counts.most_common():
        if left != right and left in by_word and right in by_word:
            pairs.append(phrase(by_word[left], by_word[right], "pair"))
            if len(pairs) == n:
                break
    return pairs


# --- screening by insertion of token ids -----------------------------------------------------------


@dataclass(frozen=True)
class EncodedInput:
    """A clean input as token ids (with special tokens) and the positions where a word may go."""

    ids: tuple[int, ...]
    boundaries: tuple[int, ...]


def encode_inputs(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[EncodedInput]:
    inner = getattr(tokenizer, "inner", tokenizer)
    encoded = inner(list(texts), truncation=True, max_length=max_length)
    out = []
    for i in range(len(texts)):
        word_ids = encoded.word_ids(i)
        ids = encoded["input_ids"][i]
        starts = [p for p, w in enumerate(word_ids) if w is not None and (p == 0 or word_ids[p - 1] != w)]
        last_real = max((p for p, w in enumerate(word_ids) if w is not None), default=0)
        out.append(EncodedInput(tuple(ids), tuple(starts + [last_real + 1])))
    return out


@dataclass
class Scored:
    candidate: Candidate
    flag_rate: float
    mean_confidence: float
    label: int
    counted: int

    def key(self) -> tuple[float, int, float]:
        """Rank: more inputs set off, then fewer words (the shortest trigger), then higher confidence."""
        return (self.flag_rate, -self.candidate.words, self.mean_confidence)


def screen(
    lens: Lens, candidates: Sequence[Candidate], inputs: Sequence[EncodedInput], settings: SearchSettings, *,
    seed: int, desc: str | None = None,
) -> list[Scored]:
    """Insert every candidate into every input (a seeded random boundary each) and score it with the lens."""
    if not candidates:
        return []
    triggered, clean = insertion_probs(lens, candidates, inputs, settings, seed=seed, desc=desc)
    return _scored(candidates, lens.rates(triggered, clean))


def insertion_probs(
    lens: Lens, candidates: Sequence[Candidate], inputs: Sequence[EncodedInput], settings: SearchSettings, *,
    seed: int, desc: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The lens's probabilities with each candidate inserted into each input, (candidates, inputs, K), and without
    any insertion, (inputs, K)."""
    if not inputs:
        raise OptionError("the trigger search needs clean inputs to insert candidates into")
    clean = np.concatenate([lens.probs_ids(np.asarray(x.ids)[None, :]) for x in inputs])
    triggered = np.zeros((len(candidates), len(inputs), clean.shape[-1]), dtype=np.float32)
    by_length: dict[int, list[int]] = {}
    for index, candidate in enumerate(candidates):
        by_length.setdefault(len(candidate.ids), []).append(index)
    total = sum(-(-len(rows) // settings.batch_size) for rows in by_length.values()) * len(inputs)
    with tqdm(total=total, desc=desc, unit="batch", leave=False, disable=desc is None) as bar:
        for j, clean_input in enumerate(inputs):
            rng = np.random.default_rng([seed, j])
            for rows in by_length.values():
                ids = _insert_ids(clean_input, [candidates[r].ids for r in rows], rng)
                for start in range(0, len(rows), settings.batch_size):
                    chunk = rows[start:start + settings.batch_size]
                    triggered[chunk, j] = lens.probs_ids(ids[start:start + settings.batch_size])
                    bar.update()
    return triggered, clean


def _scored(candidates: Sequence[Candidate], rates: Rates) -> list[Scored]:
    return [Scored(c, float(rates.flag_rate[i]), float(rates.mean_confidence[i]), int(rates.label[i]), int(rates.counted[i]))
            for i, c in enumerate(candidates)]


def _insert_ids(clean_input: EncodedInput, insertions: Sequence[tuple[int, ...]], rng: np.random.Generator) -> np.ndarray:
    """Rows of ``clean_input`` with each insertion (all of one length) at a random word boundary."""
    base = np.asarray(clean_input.ids)
    width = len(insertions[0])
    positions = rng.choice(np.asarray(clean_input.boundaries), size=len(insertions))
    inserted = np.asarray(insertions)
    out = np.empty((len(insertions), len(base) + width), dtype=np.int64)
    for position in np.unique(positions):
        rows = positions == position
        out[rows, :position] = base[:position]
        out[rows, position:position + width] = inserted[rows]
        out[rows, position + width:] = base[position:]
    return out


def best(scored: Iterable[Scored], n: int) -> list[Scored]:
    return sorted(scored, key=lambda s: s.key(), reverse=True)[:n]


# --- the cascade -------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    shortlist: list[Candidate]
    counts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def choose_inputs(lens: Lens, texts: Sequence[str], n: int, max_tokens: int | None, seed: int) -> list[str]:
    """``n`` texts, alternating over the labels the lens predicts on them; with ``max_tokens``, short ones: those of
    at most that many tokens, or the ``8 n`` shortest where fewer are that short.

    Alternating matters for the classifier lens: an input already predicted as a label cannot flip to it.
    """
    pool = list(texts) if max_tokens is None else _shortest(lens.tokenizer, texts, max_tokens, 8 * n)
    pool = random.Random(seed).sample(pool, min(len(pool), max(n * 8, n)))
    labels = lens.probs_texts(pool).argmax(1) if pool else np.zeros(0, dtype=int)
    queues = {label: [t for t, l in zip(pool, labels) if l == label] for label in sorted(set(labels.tolist()))}
    chosen: list[str] = []
    while len(chosen) < min(n, len(pool)):
        for queue in queues.values():
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return chosen


def _shortest(tokenizer: Any, texts: Sequence[str], max_tokens: int, at_least: int) -> list[str]:
    inner = getattr(tokenizer, "inner", tokenizer)
    lengths = [len(ids) for ids in inner(list(texts))["input_ids"]]
    short = [t for t, length in zip(texts, lengths) if length <= max_tokens]
    if len(short) >= at_least:
        return short
    return [texts[i] for i in sorted(range(len(texts)), key=lambda i: lengths[i])[:at_least]]


def search(
    lens: Lens, vocabulary: Sequence[Candidate], search_texts: Sequence[str], settings: SearchSettings, *,
    seed: int, extra: Sequence[Candidate] = (), pairs: Sequence[Candidate] = (), progress: bool = True,
) -> SearchResult:
    """Steps 1-3 of the cascade: the shortlist of candidates to verify, best first.

    ``pairs`` (:func:`text_pairs`) are screened like the vocabulary; the best ``refine_top`` of each screen go on,
    since on a few inputs a single word nearly always outranks a pair (fewer words win ties).
    """
    started = time.perf_counter()
    screen_texts = choose_inputs(lens, search_texts, settings.screen_inputs, settings.screen_max_tokens, seed)
    refine_texts = choose_inputs(lens, search_texts, settings.refine_inputs, None, seed + 1)
    screen_inputs = encode_inputs(lens.tokenizer, screen_texts, lens.max_length)
    screened = screen(lens, vocabulary, screen_inputs, settings, seed=seed,
                      desc=f"screen {len(vocabulary)} words" if progress else None)
    seconds = {"screen": time.perf_counter() - started}
    screened_pairs = screen(lens, pairs, screen_inputs, settings, seed=seed,
                            desc=f"screen {len(pairs)} word pairs" if progress else None)
    seconds["pairs"] = time.perf_counter() - started - seconds["screen"]
    pool = _unique([s.candidate for s in best(screened, settings.refine_top)]
                   + [s.candidate for s in best(screened_pairs, settings.refine_top)] + list(extra))
    refine_inputs = encode_inputs(lens.tokenizer, refine_texts, lens.max_length)
    refined = screen(lens, pool, refine_inputs, settings, seed=seed + 1, desc="refine" if progress else None)
    seconds["refine"] = time.perf_counter() - started - sum(seconds.values())
    phrases, phrases_tried = extend_phrases(lens, refined, refine_inputs, settings, seed=seed + 2, progress=progress)
    seconds["phrases"] = time.perf_counter() - started - sum(seconds.values())
    shortlist = _unique([s.candidate for s in best(refined + phrases, settings.verify_top)])
    counts = {"vocabulary": len(vocabulary), "screened": len(screened), "pairs_screened": len(screened_pairs),
              "screen_inputs": len(screen_texts), "refined": len(refined), "refine_inputs": len(refine_texts),
              "reference_candidates": len(extra), "phrases_tried": phrases_tried,
              "phrases_kept": len(phrases), "shortlist": len(shortlist)}
    return SearchResult(shortlist, counts, {k: round(v, 2) for k, v in seconds.items()})


def extend_phrases(
    lens: Lens, refined: Sequence[Scored], inputs: Sequence[EncodedInput], settings: SearchSettings, *, seed: int,
    progress: bool = True,
) -> tuple[list[Scored], int]:
    """Greedy beam search over phrases: grow the best candidates (words or pairs) by one word on either side per
    round, up to ``max_phrase_words``. Returns the phrases kept and how many were tried.

    A phrase is kept only if it sets the lens off on ``phrase_min_gain`` more of the inputs than
    each of its parts does alone: a word that already sets it off on every input gains nothing
    from company, so a rare-word trigger is not reported padded with another word.
    """
    words = [s.candidate for s in best((s for s in refined if s.candidate.words == 1), settings.phrase_pool)]
    alone = {s.candidate.text: s.flag_rate for s in refined}
    beam = best(refined, settings.phrase_seeds)
    kept: list[Scored] = []
    tried = 0
    for length in range(2, settings.max_phrase_words + 1):
        grown: dict[str, tuple[Candidate, float]] = {}  # phrase -> (candidate, the best share any of its parts sets off)
        for parent in beam:
            if parent.candidate.words >= settings.max_phrase_words:
                continue
            parent_words = set(parent.candidate.text.split())
            for w in words:
                if w.text in parent_words:
                    continue
                bar = max(parent.flag_rate, alone.get(w.text, 0.0))
                for p in (phrase(parent.candidate, w), phrase(w, parent.candidate)):
                    grown[p.text] = (p, max(bar, grown.get(p.text, (p, 0.0))[1]))
        if not grown:
            break
        scored = screen(lens, [p for p, _ in grown.values()], inputs, settings, seed=seed + length,
                        desc=f"phrases of {length} words" if progress else None)
        tried += len(scored)
        better = [s for s in scored if s.flag_rate >= grown[s.candidate.text][1] + settings.phrase_min_gain]
        if not better:
            break
        for s in better:
            alone[s.candidate.text] = s.flag_rate
        kept.extend(better)
        beam = best(better, settings.phrase_seeds)
    return kept, tried


def _unique(candidates: Iterable[Candidate]) -> list[Candidate]:
    seen: dict[str, Candidate] = {}
    for c in candidates:
        seen.setdefault(c.text, c)
    return list(seen.values())


# --- pieces proposed by the suspect classifier, judged by the PSIM -----------------------------------


Explains = Callable[[Sequence[str], int], list[bool]]  # candidate texts, the label they push -> explained by the task?


@dataclass
class Proposals:
    words: dict[int, list[str]]  # per label, the proposed words, best first
    judged: list[Scored]  # the best judged singles and pairs, best first
    seconds: dict[str, float] = field(default_factory=dict)  # screen, refine, judge


def propose_pieces(
    proposer: ClassifierLens, judge: Lens, vocabulary: Sequence[Candidate], search_texts: Sequence[str],
    settings: SearchSettings, *, explains: Explains, seed: int, progress: bool = True,
) -> Proposals:
    """Words the suspect classifier pushes toward a label and the clean task does not explain, and their ordered pairs
    within that label, judged by the (PSIM) lens.

    A sentence trigger of common words may set the PSIM off only whole or through a pair the clean texts never hold
    (development model ``h5-sst2-insent-moon``: ``blue moon`` on 100% of clean inputs, ``blue`` or ``moon`` on 2-4%),
    so the PSIM's own screen does not reach it; the suspect classifier, which learnt the whole backdoor, is pushed
    toward its target by each piece (``blue`` 69%, ``moon`` 68%). Natural words of the label push it too; the task
    rule (:mod:`peftguard.audit.task`) drops those it explains, and the PSIM, which does not answer to them, judges
    the rest. The screen and refine sizes are the search's own.
    """
    started = time.perf_counter()
    screen_inputs = _encoded(proposer, search_texts, settings.screen_inputs, settings.screen_max_tokens, seed)
    refine_inputs = _encoded(proposer, search_texts, settings.refine_inputs, None, seed + 1)
    desc = f"propose: screen {len(vocabulary)} words" if progress else None
    triggered, clean = insertion_probs(proposer, vocabulary, screen_inputs, settings, seed=seed, desc=desc)
    seconds = {"screen": time.perf_counter() - started}
    words: dict[int, list[Candidate]] = {}
    for label in range(clean.shape[-1]):
        screened = _scored(vocabulary, proposer.rates_toward(triggered, clean, label))
        top = [s.candidate for s in best(screened, settings.refine_top)]
        again, clean_again = insertion_probs(proposer, top, refine_inputs, settings, seed=seed + 1)
        ranked = [s.candidate for s in best(_scored(top, proposer.rates_toward(again, clean_again, label)), len(top))]
        explained = explains([c.text for c in ranked], label)
        words[label] = [c for c, e in zip(ranked, explained) if not e][: settings.proposal_words]
    seconds["refine"] = time.perf_counter() - started - seconds["screen"]
    singles = [Candidate(c.text, c.ids, "proposal") for ws in words.values() for c in ws]
    pairs = [phrase(a, b, "proposal") for ws in words.values() for a in ws for b in ws if a.text != b.text]
    judge_inputs = _encoded(judge, search_texts, settings.refine_inputs, None, seed + 1)
    judged = screen(judge, _unique(singles + pairs), judge_inputs, settings, seed=seed + 5,
                    desc="propose: judge" if progress else None)
    seconds["judge"] = time.perf_counter() - started - seconds["screen"] - seconds["refine"]
    return Proposals({label: [c.text for c in ws] for label, ws in words.items()}, best(judged, settings.proposal_verify),
                     {k: round(v, 2) for k, v in seconds.items()})


def _encoded(lens: Lens, texts: Sequence[str], n: int, max_tokens: int | None, seed: int) -> list[EncodedInput]:
    return encode_inputs(lens.tokenizer, choose_inputs(lens, texts, n, max_tokens, seed), lens.max_length)


# --- verification on held-back inputs ----------------------------------------------------------------


@dataclass(frozen=True)
class Verified:
    text: str
    source: str
    flag_rate: float  # share of held-back clean inputs the lens is set off on, with the candidate inserted
    mean_confidence: float  # the lens's mean confidence on them
    forced_label: int  # the label the suspect model predicts most on them
    forced_rate: float  # the share of them it predicts that label for
    flip_rate: float  # among inputs it did not give that label before the insertion, the share it does after
    inputs: int

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 5) if isinstance(v, float) else v for k, v in asdict(self).items()}


def insert_text(texts: Sequence[str], candidate: str, seed: int) -> list[str]:
    """``candidate`` inserted once into each text at a random word boundary (seeded per candidate and text)."""
    return [insert_at_random_boundary(t, candidate, random.Random(f"audit\x00{seed}\x00{candidate}\x00{t}")) for t in texts]


def verify(
    lens: Lens, suspect: TextPredictor, candidates: Sequence[Candidate], held_back: Sequence[str], *, seed: int,
    progress: bool = True,
) -> list[Verified]:
    """Each candidate inserted into every held-back clean input; sorted best first."""
    if not held_back:
        raise OptionError("verification needs held-back clean inputs")
    clean_lens = lens.probs_texts(held_back)
    clean_suspect = suspect(held_back).argmax(1)
    results = []
    for candidate in tqdm(candidates, desc="verify", unit="candidate", leave=False, disable=not progress):
        triggered = insert_text(held_back, candidate.text, seed)
        rates = lens.rates(lens.probs_texts(triggered)[None], clean_lens)
        predicted = suspect(triggered).argmax(1)
        forced = int(np.bincount(predicted, minlength=int(predicted.max()) + 1).argmax())
        eligible = clean_suspect != forced
        flip = float((predicted[eligible] == forced).mean()) if eligible.any() else 0.0
        results.append(Verified(candidate.text, candidate.source, float(rates.flag_rate[0]), float(rates.mean_confidence[0]),
                                forced, float((predicted == forced).mean()), flip, len(held_back)))
    return sorted(results, key=lambda v: (v.flag_rate, -len(v.text.split()), v.mean_confidence), reverse=True)


def clean_flag_rate(lens: Lens, held_back: Sequence[str]) -> float:
    """The share of held-back clean inputs the lens is set off on with nothing inserted (for the classifier
    lens, always 0: nothing flips without an insertion)."""
    clean = lens.probs_texts(held_back)
    return float(lens.rates(clean[None], clean).flag_rate[0])


# --- embedding rows moved between a reference base and the suspect ------------------------------------


def embedding_moves(suspect_model: Any, reference_model: Any, vocabulary: Sequence[Candidate], top: int) -> list[Candidate]:
    """The ``top`` vocabulary words whose input-embedding row moved most (L2) from the reference to the suspect.

    Weight poisoning with a rare-word trigger moves that word's row far more than any other; clean
    fine-tuning moves the rows of frequent words a little. The words join the refine step; only
    verification decides.
    """
    suspect = suspect_model.get_input_embeddings().weight.detach().cpu()  # the two may sit on different devices
    reference = reference_model.get_input_embeddings().weight.detach().cpu()
    if suspect.shape != reference.shape:
        raise OptionError(f"--reference has a word-embedding matrix of shape {list(reference.shape)} but the suspect's is "
                          f"{list(suspect.shape)}: it is not the suspect's base (give the model it was fine-tuned from)")
    ids = torch.tensor([c.ids[0] for c in vocabulary], dtype=torch.long)
    moved = (suspect[ids].float() - reference[ids].float()).norm(dim=1)
    order = torch.argsort(moved, descending=True)[:top].tolist()
    return [Candidate(vocabulary[i].text, vocabulary[i].ids, "reference") for i in order]
