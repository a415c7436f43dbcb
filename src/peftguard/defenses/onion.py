"""ONION (Qi et al., EMNLP 2021, "ONION: A Simple and Effective Defense Against Textual Backdoor Attacks").

For a text of words w_1..w_n, a causal language model gives the perplexity p_0 of the text and p_i
of the text without w_i. The suspicion of w_i is f_i = p_0 - p_i (how much perplexity drops when it
goes); every word with f_i > bar is removed and the victim classifies what is left.

Departures from the paper and its code:

* The language model is any causal LM (``--lm``), by default the packaged SmolLM2-135M-Instruct
  (dequantized from a 4-bit GGUF), not GPT-2 large; perplexities, and so useful bars, differ in
  scale between models.
* The original code drops the last word of every text unscored (``split(' ')[:-1]``, meant for a
  trailing space); here every word is scored and kept or removed on its own merits. A start token
  is put before each text so that its first word is scored too.
* All deletions of a batch of texts go through the LM together (one forward per batch of candidate
  texts) instead of one forward per candidate. By default each deletion also reuses the sentence's
  own pass for the tokens before the removed word (``deletion_scoring``: same perplexities, about
  half the LM work), and on a CPU with bfloat16 arithmetic the deletions run in bf16 (linear weights
  cast once, on a copy of the LM) on float32 sentence prefixes, with a float32 re-run of every word
  near the bar, so that decisions are those of float32 wherever bf16's error stays within the re-check
  margin (an observed bound, not a proven one: see ``deletion_scoring``). ``share_prefix=False`` and
  ``precision="fp32"`` give the reference computation (one full pass per candidate text).
* The bar defaults to 0 (remove any word whose removal lowers perplexity). The original code
  evaluates every bar of ``range(-100, 0)`` in its own sign convention (it removes a word when
  p_i - p_0 <= bar, i.e. our f_i >= -bar: our bars 1..100); ``--onion-bar`` repeated evaluates
  each value given, so that sweep (or a coarser one) is available.
* Scores depend on the texts only, not on the victim: within one process (a grid run) every victim
  after the first reuses what ONION scored (``pipeline._SCORED``), and across runs perplexities can be
  cached in a file (``--onion-cache``).
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from peftguard.artifacts import read_json, write_json
from peftguard.defenses.base import DefenseContext, InputDefense, Screened
from peftguard.defenses.registry import register_defense
from peftguard.errors import OptionError, PeftguardError
from peftguard.models import LoadOptions, check_weight_files, load_tokenizer, model_reference, resolve_model
from peftguard.runtime import compute_device

DEFAULT_LM = "smollm2"


@dataclass(frozen=True)
class OnionConfig:
    lm: str = field(default=DEFAULT_LM, metadata={"help": "causal LM: 'smollm2' (packaged), a folder or a hub id"})
    bar: float = field(default=0.0, metadata={"help": "remove words whose suspicion (perplexity drop) exceeds this"})
    batch_size: int = field(default=32, metadata={"help": "candidate texts per LM forward"})
    max_length: int = field(default=128, metadata={"help": "LM tokens per candidate (longer ones are truncated)"})
    cache: Path | None = field(default=None, metadata={"help": "JSON file of perplexities per text, reused across runs"})
    share_prefix: bool = field(default=True, metadata={"help": "reuse each sentence's pass for the words before a deletion"})
    precision: str = field(default="auto", metadata={"help": "LM arithmetic: fp32, bf16 (float32 re-check near the bar) or auto"})


class CausalLMScorer:
    """Perplexity of texts under a causal LM, batched, in input order (optionally cached in a file)."""

    def __init__(self, ref: str, *, options: LoadOptions = LoadOptions(), batch_size: int = 32, max_length: int = 128,
                 cache: Path | None = None, precision: str = "auto") -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from peftguard.defenses.deletion_scoring import supports_prefix_sharing
        from peftguard.precision import resolve_precision

        location = resolve_model(ref)
        if Path(location).is_dir():
            check_weight_files(Path(location), options)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                location, use_safetensors=not options.allow_pickle, trust_remote_code=options.trust_remote_code
            ).eval()
        except (OSError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0]
            raise PeftguardError(f"cannot load the language model '{ref}': {reason}") from None
        self.tokenizer = load_tokenizer(ref, options)
        self.device = compute_device()
        self.model.to(self.device)
        self.ref, self.batch_size, self.max_length = ref, batch_size, max_length
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        self.start = start  # put before every text so that its first word is predicted too
        self.precision = resolve_precision(precision, self.device, allowed=("fp32", "bf16"))
        self.shares_prefix = supports_prefix_sharing(self.model)  # deletions scored on the cached sentence prefix
        dtype = "bfloat16" if self.device.type == "cuda" else "float32"  # perplexities differ by dtype
        if self.device.type != "cuda" and self.precision == "bf16":
            dtype = "float32 sentences, bfloat16 deletions, float32 near the bar"
        key = {"lm": model_reference(ref), "start": start, "max_length": max_length, "dtype": dtype}
        self.cache = PerplexityCache(cache, key) if cache else None

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text, tokenized in one call."""
        if not texts:
            return []
        head = [self.start] if self.start is not None else []
        return [head + ids[: self.max_length - 1] for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ([self.start] if self.start is not None else []) + ids[: self.max_length - 1]

    def perplexities(self, texts: Sequence[str], *, desc: str | None = None) -> np.ndarray:
        """exp(mean negative log-likelihood of each token after the start); NaN for an empty text."""
        if self.cache is None:
            return self._perplexities(texts, desc)
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        step = 16 * self.batch_size  # saved as it goes: an interrupted run keeps what it scored
        for start in range(0, len(missing), step):
            part = missing[start:start + step]
            label = desc and f"{desc} {start // step + 1}/{-(-len(missing) // step)}"
            self.cache.update(part, self._perplexities(part, label))
        return np.array([self.cache[t] for t in texts], dtype=float)

    def _perplexities(self, texts: Sequence[str], desc: str | None = None) -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        ids = [self.encode(t) for t in texts]
        out = np.full(len(ids), np.nan)
        order = np.argsort([len(x) for x in ids], kind="stable")
        pad = self.tokenizer.pad_token_id or 0
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc=desc, leave=False, unit="batch", disable=desc is None):
            chunk = [i for i in order[start:start + self.batch_size] if len(ids[i]) > 1]
            if not chunk:
                continue
            width = max(len(ids[i]) for i in chunk)
            batch = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                batch[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            batch, mask = batch.to(self.device), mask.to(self.device)
            on_gpu = self.device.type == "cuda"  # bf16 there, as training and predict_proba do
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on_gpu):
                logits = self.model(input_ids=batch, attention_mask=mask).logits[:, :-1].float()
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
                target_mask = mask[:, 1:].float()
                mean = (nll * target_mask).sum(1) / target_mask.sum(1)
            out[chunk] = torch.exp(mean).cpu().numpy()
        return out


    def deletion_suspicion(self, texts: Sequence[str], bars: Sequence[float], *, desc: str | None = None) -> list[np.ndarray]:
        """f_i = p_0 - p_i per word of each text, prefix-shared; in bf16, float32 wherever a bar is within reach."""
        from tqdm.auto import tqdm

        texts = list(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a forward
        out: list[np.ndarray] = [np.zeros(0)] * len(texts)
        step = 4 * self.batch_size  # sentences per progress step (and per cache save)
        for first in tqdm(range(0, len(order), step), desc=desc, leave=False, unit="chunk", disable=desc is None):
            part = [texts[i] for i in order[first:first + step]]
            for i, scores in zip(order[first:first + step], self._deletion_suspicion(part, bars)):
                out[i] = scores
        return out

    def _deletion_suspicion(self, texts: list[str], bars: Sequence[float]) -> list[np.ndarray]:
        cached = [self._cached_suspicion(t) for t in texts]
        todo = [t for t, c in zip(texts, cached) if c is None]
        computed = dict(zip(todo, self._mean_losses(todo, bars))) if todo else {}
        if self.cache is not None and todo:
            self._store(todo, [computed[t] for t in todo])
        return [c if c is not None else np.exp(computed[t][0]) - np.exp(computed[t][1]) for t, c in zip(texts, cached)]

    def _mean_losses(self, texts: list[str], bars: Sequence[float]) -> list[tuple[float, np.ndarray]]:
        from peftguard.defenses.deletion_scoring import CHECK_MARGIN_NATS, DeletionScorer, Sentence

        sentences = [Sentence(*self._sentence_ids(t)) for t in texts]
        bf16 = self.precision == "bf16"
        scorer = DeletionScorer(self.model, self.tokenizer.pad_token_id or 0, rows=2 * self.batch_size,
                                bf16_model=self._bf16_model() if bf16 else None)
        return scorer.mean_losses(sentences, bf16=bf16, bars=bars, margin=CHECK_MARGIN_NATS)

    def _bf16_model(self):
        """The LM with bfloat16 linear weights (``deletion_scoring.bf16_twin``), made once; CPU only."""
        from peftguard.defenses.deletion_scoring import bf16_twin

        if self.device.type != "cpu":
            return None
        if getattr(self, "_bf16_twin", None) is None:
            self._bf16_twin = bf16_twin(self.model)
        return self._bf16_twin

    def _sentence_ids(self, text: str) -> tuple[list[int], list[list[int]]]:
        _, removed = deletions(text)
        ids = self.encode_many([" ".join(text.split()), *removed])
        return ids[0], ids[1:]

    def _cached_suspicion(self, text: str) -> np.ndarray | None:
        if self.cache is None:
            return None
        candidates = [" ".join(text.split()), *deletions(text)[1]]
        if not all(c in self.cache for c in candidates):
            return None
        ppl = np.array([self.cache[c] for c in candidates], dtype=float)
        return ppl[0] - ppl[1:]

    def _store(self, texts: list[str], losses: list[tuple[float, np.ndarray]]) -> None:
        candidates, values = [], []
        for text, (full, each) in zip(texts, losses):
            candidates.extend([" ".join(text.split()), *deletions(text)[1]])
            values.extend([math.exp(full), *np.exp(each)])
        self.cache.update(candidates, np.array(values, dtype=float))


class PerplexityCache:
    """Perplexities per text in a JSON file, valid for one LM and scoring setup (``key``)."""

    def __init__(self, path: Path, key: dict[str, Any]) -> None:
        self.path, self.key = Path(path), key
        self.values: dict[str, float] = {}
        if self.path.is_file():
            stored = read_json(self.path)
            if stored.get("key") != key:
                raise OptionError(f"ONION cache {self.path} was made with {stored.get('key')}, not {key}; "
                                  "use another file")
            self.values = {k: float("nan") if v is None else v for k, v in stored["perplexity"].items()}

    def __contains__(self, text: str) -> bool:
        return _digest(text) in self.values

    def __getitem__(self, text: str) -> float:
        return self.values[_digest(text)]

    def update(self, texts: Sequence[str], values: np.ndarray) -> None:
        self.values.update({_digest(t): float(v) for t, v in zip(texts, values)})
        stored = {k: None if math.isnan(v) else v for k, v in self.values.items()}
        write_json(self.path, {"key": self.key, "perplexity": stored})


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def deletions(text: str) -> tuple[list[str], list[str]]:
    """The words of ``text`` and the texts with each word removed in turn (every word, the last too)."""
    words = text.split()
    return words, [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]


class OnionDefense(InputDefense):
    """Removes the words whose deletion lowers the LM perplexity by more than the bar."""

    name = "onion"

    def __init__(self, config: OnionConfig, *, options: LoadOptions = LoadOptions(), sweep_bars: Sequence[float] = (),
                 scorer: CausalLMScorer | None = None, memo: dict[str, np.ndarray] | None = None) -> None:
        if config.batch_size < 1:
            raise OptionError(f"ONION batch size must be at least 1, got {config.batch_size}")
        self.config, self.sweep_bars = config, tuple(sweep_bars)
        self.scorer = scorer or CausalLMScorer(config.lm, options=options, batch_size=config.batch_size,
                                               max_length=config.max_length, cache=config.cache, precision=config.precision)
        self._memo = memo if memo is not None else {}  # text → suspicion per word, shared across bars

    def suspicion(self, texts: Sequence[str], *, desc: str | None = None) -> list[np.ndarray]:
        """f_i = p_0 - p_i per word of each text (NaN where undefined: a one-word text)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing and self.config.share_prefix and self.scorer.shares_prefix:
            bars = (self.config.bar, *self.sweep_bars)
            self._memo.update(zip(missing, self.scorer.deletion_suspicion(missing, bars, desc=desc)))
        elif missing:
            self._memo.update(zip(missing, self.reference_suspicion(missing, desc=desc)))
        return [self._memo[t] for t in texts]

    def reference_suspicion(self, texts: Sequence[str], *, desc: str | None = None) -> list[np.ndarray]:
        """The reference computation: every candidate text (sentence and deletions) a full LM pass, batched."""
        candidates, spans = [], []
        for text in texts:
            _, removed = deletions(text)
            spans.append((len(candidates), len(removed)))
            candidates.extend([" ".join(text.split()), *removed])
        ppl = self.scorer.perplexities(candidates, desc=desc)
        return [ppl[first] - ppl[first + 1: first + 1 + n] for first, n in spans]

    def clean(self, text: str, scores: np.ndarray) -> str:
        words = text.split()
        with np.errstate(invalid="ignore"):
            keep = ~(scores > self.config.bar)  # NaN compares False: kept
        return " ".join(w for w, k in zip(words, keep) if k)

    def screen(self, texts: Sequence[str], *, desc: str | None = None) -> Screened:
        scores = self.suspicion(texts, desc=desc)
        return Screened([self.clean(t, s) for t, s in zip(texts, scores)])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "lm": model_reference(self.config.lm), "bar": self.config.bar,
                "batch_size": self.config.batch_size, "max_length": self.config.max_length,
                "share_prefix": self.config.share_prefix and self.scorer.shares_prefix, "precision": self.scorer.precision,
                "cache": str(self.config.cache) if self.config.cache else None}

    def at_bar(self, bar: float) -> OnionDefense:
        """The same defense (same LM and cached scores) with another bar."""
        return OnionDefense(replace(self.config, bar=bar), scorer=self.scorer, memo=self._memo)

    def sweep(self) -> list[tuple[str, InputDefense]]:
        return [(f"bar={bar:g}", self.at_bar(bar)) for bar in self.sweep_bars]


def build_onion(
    config: OnionConfig, *, bars: Sequence[float] = (), options: LoadOptions = LoadOptions()
) -> OnionDefense:
    """ONION at the first of ``bars`` (default ``config.bar``); with several bars, each is also evaluated (a sweep)."""
    bars = list(bars)
    if any(math.isnan(b) for b in bars):
        raise OptionError("--onion-bar must be a number")
    if bars:
        config = replace(config, bar=bars[0])
    return OnionDefense(config, options=options, sweep_bars=bars if len(bars) > 1 else ())


@dataclass(frozen=True)
class OnionOptions:
    lm: str = field(default=DEFAULT_LM, metadata={"help": "causal LM [smollm2]", "flag": "--lm"})
    bars: tuple[float, ...] = field(default=(), metadata={
        "help": "remove words whose suspicion (perplexity drop) exceeds this [0]; several: a sweep (the original code tries 1..100)",
        "flag": "--onion-bar"})
    cache: Path | None = field(default=None, metadata={
        "help": "JSON file of LM perplexities per text, reused across runs (e.g. several victims, one test set)",
        "flag": "--onion-cache"})

    def label(self) -> str:
        """The LM and bar(s) a report row names."""
        bars = ", ".join(f"{bar:g}" for bar in self.bars) or f"{OnionConfig.bar:g}"
        return f"LM {self.lm}, bar {bars}"


@register_defense("onion", options=OnionOptions, summary="remove words whose removal lowers LM perplexity (Qi et al., 2021a)",
                  order=1)
def build_onion_defense(options: OnionOptions, context: DefenseContext) -> OnionDefense:
    return build_onion(OnionConfig(lm=options.lm, cache=options.cache), bars=options.bars, options=context.options)
