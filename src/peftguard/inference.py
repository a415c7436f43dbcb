"""Inference shared by every model this tool runs: tokenization (cached), dynamic padding, sorted batches.

Kept apart from training so that scanning and serving import no optimizer, scheduler or accelerate.
Speed choices: texts are tokenized once (cached per tokenizer, max length and texts); batches are
padded to their longest member; inference sorts by length so that each batch holds similar lengths,
then restores the input order.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from peftguard import caches
from peftguard.errors import OptionError, PeftguardError

log = logging.getLogger(__name__)


ENCODING_CACHE_ENTRIES = 64  # text sets kept (oldest dropped first)
_ENCODING_CACHE: dict[tuple[str, int, str], tuple[list[list[int]], int]] = {}
caches.register("inference.encodings", _ENCODING_CACHE.clear)


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of each text (truncated to ``max_length``) and how many were truncated.

    Cached, so a dataset is tokenized once per process however many stages use it.
    """
    digest = hashlib.sha1("\x1e".join(texts).encode("utf-8", "surrogatepass")).hexdigest()
    key = (f"{tokenizer.name_or_path}|{len(tokenizer)}", max_length, digest)
    if key not in _ENCODING_CACHE:
        full = tokenizer(list(texts), truncation=False, add_special_tokens=True)["input_ids"]
        truncated = sum(len(ids) > max_length for ids in full)
        ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
        if len(_ENCODING_CACHE) >= ENCODING_CACHE_ENTRIES:  # bounded: a server tokenizes a new batch every call
            del _ENCODING_CACHE[next(iter(_ENCODING_CACHE))]
        _ENCODING_CACHE[key] = (ids, truncated)
        if truncated:  # a note on stderr, once per text set; the count also goes into manifests and metrics
            log.warning("note: %d of %d texts are longer than %d tokens and were truncated", truncated, len(texts), max_length)
    return _ENCODING_CACHE[key]


def count_truncated(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> int:
    """How many of ``texts`` are cut to ``max_length`` tokens (cached with the encoding)."""
    return encode(tokenizer, texts, max_length)[1] if texts else 0


def collate(tokenizer: PreTrainedTokenizerBase, ids: Sequence[list[int]]) -> dict[str, torch.Tensor]:
    return tokenizer.pad({"input_ids": list(ids)}, padding="longest", return_tensors="pt")


def flush_denormals() -> None:
    """Treat subnormal floats (below 1.2e-38) as zero on CPU.

    Arithmetic on subnormals is about 100x slower on x86. Prompt methods trained at their high
    learning rates push softmax/activation values into that range: measured, SmolLM2 prompt
    tuning (lr 0.1) went from about 8 to 50-62 CPU seconds per epoch after its first epoch, and
    stayed at about 8.5 with flushing (bench/denormals.py). Results change only below 1e-38.
    """
    torch.set_flush_denormal(True)


@torch.inference_mode()
def predict_proba(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: int = 128,
    *,
    desc: str | None = None,
    bf16: bool | None = None,
) -> np.ndarray:
    """Softmax probabilities, shape (len(texts), num_labels), in input order.

    ``bf16``: run under bfloat16 autocast; ``None`` (default) does so on a GPU only.
    """
    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1, got {batch_size}")
    if not texts:
        return np.zeros((0, model.config.num_labels), dtype=np.float32)
    flush_denormals()
    model.eval()
    device = next(model.parameters()).device
    ids, _ = encode(tokenizer, texts, max_length)
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = np.zeros((len(ids), model.config.num_labels), dtype=np.float32)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, unit="batch", disable=desc is None):
        chunk = order[start : start + batch_size]
        batch = collate(tokenizer, [ids[i] for i in chunk]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" if bf16 is None else bf16):
            logits = model(**batch).logits
        out[chunk] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    if not np.isfinite(out).all():  # NaN weights would read as label 0 with confidence NaN: never a result
        raise PeftguardError(f"the model gives non-finite outputs (NaN or inf) for {int((~np.isfinite(out).all(1)).sum())} "
                             "of the inputs: its weights are broken (e.g. trained with too high a learning rate)")
    return out


