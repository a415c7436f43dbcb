"""Perplexities of a sentence and of each of its single-word deletions, sharing the sentence's prefix.

ONION needs, for a sentence of n words, the perplexity of the sentence and of the n texts with one
word removed. The reference computes n + 1 full LM passes. A deletion keeps the tokens before the
removed word, and a causal LM's states and per-token losses over that common prefix are those of
the full sentence. So this module runs the full sentences once (keeping their key/value states and
per-token losses) and, for each deletion, only the tokens from the end of the common prefix on,
attending to the cached prefix; the deletion's loss is the cached prefix loss plus the new suffix
loss. The common prefix is measured on token ids (not assumed from word boundaries), so it is exact
whatever the tokenizer does. Deletions of many sentences go through the LM together: the sentences
holding about ``GROUP_DELETIONS`` deletions share one full pass, and their deletions' suffixes, sorted
by length across all of them, run ``rows`` at a time (little padding), each on the cached prefix
trimmed to the longest prefix its batch uses.

Precision ``bf16`` runs the full sentences in float32 (about a tenth of the tokens), so every cached
prefix and every sentence loss is exact, and the deletions' suffixes under bfloat16 autocast, on a
twin of the model whose linear weights are cast to bfloat16 once (``bf16_twin``: the same values
autocast would make at every call, so the same results). Every deletion whose keep/remove decision,
at any of the given bars, lies within ``CHECK_MARGIN_NATS`` of flipping is then re-run in float32 on
the same float32 prefixes, so decisions are float32's wherever bf16's error is below the margin.

Measured (``bench/onion_profile.py``, SST-2 test sentences, 1 thread on a loaded 2-core machine).
Before issue 19's profiling pass (groups of ~64 deletions, everything in bf16 with each weight cast at
every call, then the sentence and its near deletions re-run in float32 one sentence at a time) the bf16
path spent 80% of its time in the bf16 forwards and 20% in the re-check, 71% of all in matrix
products. Of the bf16 forwards, groups of ~64 deletions took 1.57x as long as groups of 512 (padding:
the suffix lengths of one or two sentences span 1 to ~40 tokens), autocast on float32 weights 1.02x,
the untrimmed prefix 1.09x (a probe). Now: 1.49x (16 sentences) and 1.56x (the next 24) faster than
before, 2.27x the reference; cleaned texts identical to the reference's on 16/16 and to before's on
24/24. The margin is an observed bound, not a proven one: bf16 moves single early-position token losses by up to ~1.3 nats. The bf16 error of
(deletion loss - sentence loss), which decides at bar 0, reached 0.095 and 0.082 nats when the
sentences too ran in bf16 (3 of 871 deletions over 0.05, all far from the bar); with float32
sentences it reached 0.036 and 0.035 (none over 0.05; p99 0.018 and 0.024).

Supported for decoders whose logits are ``lm_head(final hidden state)`` and which take a key/value
cache with explicit positions and a padding mask (``FAST_MODEL_TYPES``); others use the reference.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

FAST_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
CHECK_MARGIN_NATS = 0.05  # |mean loss of a deletion - decision boundary| below this is re-scored in float32
GROUP_DELETIONS = 512  # deletions whose sentences share one full pass; their suffixes are sorted by length across it
LOGIT_ROWS = 1024  # positions whose vocabulary logits are materialized at once (memory bound)
PRECISIONS = ("fp32", "bf16")


@dataclass
class Sentence:
    """Token ids of a sentence and of its deletions; NaN results where a text has no target token."""

    full: list[int]
    deletions: list[list[int]]


def near_bar(full: float, each: float, bars: Sequence[float], margin: float) -> bool:
    """Whether a deletion's keep/remove decision (perplexity drop ``exp(full) - exp(each)`` above a bar) lies
    within ``margin`` nats of flipping at one of ``bars`` (mean losses in nats; never for NaN)."""
    for bar in bars:
        boundary = math.log(math.exp(full) - bar) if math.exp(full) > bar else -math.inf
        if abs(each - boundary) < margin:
            return True
    return False


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def supports_prefix_sharing(model: torch.nn.Module) -> bool:
    return getattr(model.config, "model_type", None) in FAST_MODEL_TYPES


class DeletionScorer:
    """Mean token loss (log-perplexity) of sentences and of their deletions, prefix-shared and batched."""

    def __init__(self, model: torch.nn.Module, pad_id: int, *, rows: int = 64, group: int = GROUP_DELETIONS,
                 bf16_model: torch.nn.Module | None = None) -> None:
        self.model, self.pad_id, self.rows, self.group = model, pad_id, rows, group
        self.bf16_model = bf16_model if bf16_model is not None else model
        self.device = next(model.parameters()).device

    def mean_losses(self, sentences: Sequence[Sentence], bf16: bool, *, bars: Sequence[float] = (),
                    margin: float = CHECK_MARGIN_NATS) -> list[tuple[float, np.ndarray]]:
        """(mean loss of the sentence, mean loss of each deletion) per sentence; NaN where undefined.

        ``bf16``: the sentences (so every cached prefix) in float32, the deletions' suffixes in bf16, and
        those whose decision at one of ``bars`` lies within ``margin`` nats of flipping again in float32."""
        out: list[tuple[float, np.ndarray]] = []
        self.rechecked = 0
        for group in self._groups(sentences):
            out.extend(self._score_group(group, bf16, bars, margin))
        return out

    def _groups(self, sentences: Sequence[Sentence]) -> list[list[Sentence]]:
        """Consecutive sentences holding about ``group`` deletions together (at least one sentence each)."""
        groups, current, count = [], [], 0
        for sentence in sentences:
            if current and count + len(sentence.deletions) > self.group:
                groups.append(current)
                current, count = [], 0
            current.append(sentence)
            count += len(sentence.deletions)
        return groups + ([current] if current else [])

    @torch.inference_mode()
    def _score_group(self, group: list[Sentence], bf16: bool, bars: Sequence[float],
                     margin: float) -> list[tuple[float, np.ndarray]]:
        self._use(self.model)
        losses, past = self._full_pass([s.full for s in group])  # float32 at every precision: cheap, and exact prefixes
        fulls = [float(x.mean()) if len(x) else math.nan for x in losses]
        jobs = [(g, i, d) for g, s in enumerate(group) for i, d in enumerate(s.deletions)]
        if not bf16:
            suffix = self._suffix_pass(group, jobs, losses, past)
        else:
            self._use(self.bf16_model)
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                suffix = self._suffix_pass(group, jobs, losses, [(k.bfloat16(), v.bfloat16()) for k, v in past])
            near = [(g, i, d) for g, i, d in jobs if near_bar(fulls[g], suffix[(g, i)], bars, margin)]
            self.rechecked += len(near)
            self._use(self.model)
            suffix |= self._suffix_pass(group, near, losses, past)  # float32, on the same float32 prefixes
        return [(fulls[g], np.array([suffix[(g, i)] for i in range(len(s.deletions))], dtype=float))
                for g, s in enumerate(group)]

    def _use(self, model: torch.nn.Module) -> None:
        self.decoder, self.head = model.get_decoder(), model.get_output_embeddings()

    def _full_pass(self, ids: list[list[int]]) -> tuple[list[torch.Tensor], tuple]:
        """Per-token losses (float32, one tensor per sentence) and the key/value states of the batch."""
        batch, mask = self._padded(ids)
        output = self.decoder(input_ids=batch, attention_mask=mask, use_cache=True)
        lengths = [len(x) for x in ids]
        rows = [(r, t) for r, n in enumerate(lengths) for t in range(n - 1)]
        flat = self._token_losses(output.last_hidden_state, batch, rows, [(r, t + 1) for r, t in rows])
        losses, start = [], 0
        for n in lengths:
            losses.append(flat[start:start + max(n - 1, 0)])
            start += max(n - 1, 0)
        return losses, output.past_key_values.to_legacy_cache()

    def _suffix_pass(self, group: list[Sentence], jobs: list[tuple[int, int, list[int]]],
                     losses: list[torch.Tensor], past: tuple) -> dict[tuple[int, int], float]:
        """Mean loss of each deletion: the shared prefix's losses plus its own suffix run on the cached prefix."""
        result, pending = {}, []
        for g, i, ids in jobs:
            if len(ids) < 2:
                result[(g, i)] = math.nan
                continue
            start = max(common_prefix(group[g].full, ids) - 1, 0)  # the last shared token is re-run: it predicts the first new one
            if start >= len(ids) - 1:  # every target of the deletion lies in the shared prefix
                result[(g, i)] = float(losses[g][: len(ids) - 1].mean())
            else:
                pending.append((g, i, ids, start))
        pending.sort(key=lambda job: len(job[2]) - job[3])  # similar suffix lengths (across the group) share a forward
        for first in range(0, len(pending), self.rows):
            result |= self._run_suffixes(pending[first:first + self.rows], losses, past)
        return result

    def _run_suffixes(self, chunk: list, losses: list[torch.Tensor], past: tuple) -> dict[tuple[int, int], float]:
        sentence_of = torch.tensor([g for g, *_ in chunk], device=self.device)
        starts = [start for *_, start in chunk]
        inputs = [ids[start:-1] for _, _, ids, start in chunk]
        batch, new_mask = self._padded(inputs)
        width = max(starts)  # cached positions at or past every start are masked out anyway: not copied
        past_mask = (torch.arange(width, device=self.device)[None] < torch.tensor(starts, device=self.device)[:, None]).long()
        cache = _cache([(k[:, :, :width].index_select(0, sentence_of), v[:, :, :width].index_select(0, sentence_of))
                        for k, v in past])
        positions = torch.tensor(starts, device=self.device)[:, None] + torch.arange(batch.shape[1], device=self.device)[None]
        hidden = self.decoder(input_ids=batch, attention_mask=torch.cat([past_mask, new_mask], 1), position_ids=positions,
                              past_key_values=cache, use_cache=True).last_hidden_state
        rows = [(r, t) for r, x in enumerate(inputs) for t in range(len(x))]
        targets = torch.tensor([ids[start + 1 + t] for (_, _, ids, start), x in zip(chunk, inputs) for t in range(len(x))],
                               device=self.device)
        flat = self._token_losses(hidden, None, rows, targets)
        out, at = {}, 0
        for (g, i, ids, start), x in zip(chunk, inputs):
            total = losses[g][:start].sum() + flat[at:at + len(x)].sum()
            out[(g, i)] = float(total) / (len(ids) - 1)
            at += len(x)
        return out

    def _token_losses(self, hidden: torch.Tensor, batch: torch.Tensor | None, rows: list[tuple[int, int]],
                      targets) -> torch.Tensor:
        """Cross-entropy (float32) of the next token at each (row, position), logits made LOGIT_ROWS at a time."""
        if not rows:
            return torch.zeros(0)
        index = torch.tensor(rows, device=self.device)
        states = hidden[index[:, 0], index[:, 1]]
        if batch is not None:  # targets given as (row, position) in ``batch``
            target_index = torch.tensor(targets, device=self.device)
            targets = batch[target_index[:, 0], target_index[:, 1]]
        parts = []
        for first in range(0, len(states), LOGIT_ROWS):
            logits = self.head(states[first:first + LOGIT_ROWS]).float()
            parts.append(torch.nn.functional.cross_entropy(logits, targets[first:first + LOGIT_ROWS], reduction="none"))
        return torch.cat(parts).cpu()

    def _padded(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, max(len(x) for x in ids))
        batch = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            batch[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, : len(x)] = 1
        return batch.to(self.device), mask.to(self.device)


def _cache(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    return DynamicCache.from_legacy_cache(tuple(layers))


def bf16_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose linear layers hold bfloat16 weights, for use under bf16 autocast.

    Autocast casts a float32 weight to bfloat16 at every call (a copy of every weight per forward);
    casting once gives the same bfloat16 values, so the same results. Everything else (embeddings,
    norms) stays float32, as autocast leaves it; a tied output layer is untied from the embedding.
    """
    import copy

    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(module.weight.detach().to(torch.bfloat16), requires_grad=False)
            if module.bias is not None:
                module.bias = torch.nn.Parameter(module.bias.detach().to(torch.bfloat16), requires_grad=False)
    return twin
