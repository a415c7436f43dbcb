"""Paraphrase sources for the syntactic trigger: precomputed files, or a seq2seq model.

A precomputed file is aligned with a clean split of the dataset: row *i* paraphrases clean row *i*
(every row counted, empty texts included), unless a ``<split>_meta.csv`` beside it has a
``clean_row`` column that maps each paraphrase row to its clean row (0-based). A ``poisoned``
column there (0/1) marks rows that are the clean text copied through, not paraphrases: they are
skipped. Labels in the paraphrase file are ignored: poisoning and ASR use the clean labels.

A paraphrase that is empty or identical to its clean text (the paraphraser failed) is not a
trigger: such rows are excluded from poisoning and from the ASR set, and counted.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from peftguard.data import SUFFIXES, TextDataset, read_rows, read_utf8
from peftguard.errors import DataError, OptionError, PeftguardError
from peftguard.models import LoadOptions, check_weight_files, resolve_model


@dataclass
class ParaphraseTable:
    """Clean text → paraphrase, with the count of rows that gave no usable paraphrase."""

    mapping: dict[str, str] = field(default_factory=dict)
    failed: int = 0  # paraphrase identical to the clean text
    empty: int = 0
    sources: list[str] = field(default_factory=list)

    def add(self, clean: str, paraphrase: str) -> None:
        clean, paraphrase = clean.strip(), paraphrase.strip()
        if not clean:
            return  # the dataset loader skips empty clean texts too
        if not paraphrase:
            self.empty += 1
        elif paraphrase == clean:
            self.failed += 1
        else:
            self.mapping.setdefault(clean, paraphrase)  # duplicate clean texts: the first row wins

    def describe(self) -> dict[str, object]:
        return {"paraphrases": len(self.mapping), "failed": self.failed, "empty": self.empty, "sources": self.sources}


# Subset folders whose SCPN paraphrases the shared data keeps elsewhere (SOURCES.md): the paper's
# IMDB subset, the full-task proxy of SST-2, has the PSIM authors' paraphrases of its negative rows.
SUBSET_PARAPHRASE_DIRS = {"imdb/psim": "../syntactic/psim_authors"}


def default_paraphrase_dir(dataset: TextDataset) -> Path:
    """``<dataset folder>/syntactic``, where the shared data keeps its SCPN paraphrases (for a
    subset named in ``SUBSET_PARAPHRASE_DIRS``, the folder given there)."""
    source = Path(dataset.train.source)
    if not source.is_file():
        raise OptionError(f"dataset '{dataset.name}' is not a folder of files; give --paraphrases PATH")
    return Path(os.path.normpath(source.parent / SUBSET_PARAPHRASE_DIRS.get(dataset.name, "syntactic")))


# Poisoning triggers training texts and ASR triggers test texts; dev stays clean (it calibrates
# and selects models), so dev paraphrase files are not read.
TRIGGERED_SPLITS = ("train", "test")


def load_precomputed(folder: Path, dataset: TextDataset, text_column: str = "text") -> ParaphraseTable:
    """Read ``train``/``test`` ``.{csv,tsv,jsonl}`` in ``folder``, aligned with the dataset's splits."""
    if not folder.is_dir():
        raise OptionError(f"paraphrase folder {folder} does not exist; give --paraphrases PATH")
    table = ParaphraseTable()
    for split in TRIGGERED_SPLITS:
        path = _split_file(folder, split)
        if path is not None:
            _add_split(table, path, Path(dataset.split(split).source), text_column)
    if not table.sources:
        raise DataError(folder / "train.csv", f"no paraphrase files ({'/'.join(TRIGGERED_SPLITS)}) in {folder}")
    return table


def _split_file(folder: Path, split: str) -> Path | None:
    return next((folder / f"{split}{s}" for s in SUFFIXES if (folder / f"{split}{s}").is_file()), None)


def _add_split(table: ParaphraseTable, path: Path, clean_path: Path, text_column: str) -> None:
    paraphrases = [str(record[text_column]) for _, record in read_rows(path, (text_column,))]
    clean = [str(record[text_column]) for _, record in read_rows(clean_path, (text_column,))]
    rows = _row_map(path, len(paraphrases), len(clean), clean_path)
    for paraphrase, row in zip(paraphrases, rows):
        if row is not None:
            table.add(clean[row], paraphrase)
    table.sources.append(str(path))


def _row_map(path: Path, count: int, clean_count: int, clean_path: Path) -> list[int | None]:
    """The clean row each paraphrase row belongs to; None for a row its meta file marks unpoisoned."""
    meta = path.with_name(f"{path.stem}_meta.csv")
    if meta.is_file() and "clean_row" in (header := _header(meta)):
        marked = "poisoned" in header
        records = read_rows(meta, ("clean_row", "poisoned") if marked else ("clean_row",))
        if len(records) != count:
            raise DataError(meta, f"has {len(records)} rows but {path.name} has {count}")
        return [None if marked and not _flag(record["poisoned"], meta, line)
                else _clean_row(record["clean_row"], meta, line, clean_count, clean_path) for line, record in records]
    if count != clean_count:
        raise DataError(
            path, f"has {count} rows but the clean split {clean_path} has {clean_count}; a paraphrase file "
            f"must be aligned row by row, or come with {meta.name} (column clean_row)"
        )
    return list(range(count))


def _header(path: Path) -> list[str]:
    lines = read_utf8(path).splitlines()
    return [name.strip() for name in lines[0].split(",")] if lines else []


def _clean_row(value: object, meta: Path, line: int, clean_count: int, clean_path: Path) -> int:
    try:
        row = int(str(value).strip())
    except ValueError:
        raise DataError(meta, f"clean_row {value!r} is not a row number", line=line, column="clean_row") from None
    if not 0 <= row < clean_count:
        raise DataError(meta, f"clean_row {row} is outside the {clean_count} rows of {clean_path}", line=line, column="clean_row")
    return row


def _flag(value: object, meta: Path, line: int) -> bool:
    text = str(value).strip()
    if text not in ("0", "1"):
        raise DataError(meta, f"poisoned {value!r} is not 0 or 1", line=line, column="poisoned")
    return text == "1"


class Seq2SeqParaphraser:
    """Paraphrases texts with a user's seq2seq model (an SCPN-like model fine-tuned to emit the
    syntactic template). None ships offline with this tool; this is the path for users who have one.
    """

    def __init__(self, model_ref: str, *, batch_size: int = 16, max_length: int = 128,
                 prefix: str = "", options: LoadOptions = LoadOptions()) -> None:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        location = resolve_model(model_ref)
        if Path(location).is_dir():
            check_weight_files(Path(location), options)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=options.trust_remote_code)
            self.model = AutoModelForSeq2SeqLM.from_pretrained(
                location, use_safetensors=not options.allow_pickle, trust_remote_code=options.trust_remote_code
            ).eval()
        except (OSError, ValueError) as exc:
            raise PeftguardError(f"cannot load paraphrase model '{model_ref}': {str(exc).splitlines()[0]}") from None
        self.model_ref, self.batch_size, self.max_length, self.prefix = model_ref, batch_size, max_length, prefix

    def paraphrase(self, texts: Sequence[str]) -> list[str]:
        import torch

        out: list[str] = []
        for start in range(0, len(texts), self.batch_size):
            batch = [self.prefix + t for t in texts[start:start + self.batch_size]]
            encoded = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            with torch.inference_mode():
                generated = self.model.generate(**encoded, max_new_tokens=self.max_length, num_beams=1, do_sample=False)
            out.extend(self.tokenizer.batch_decode(generated, skip_special_tokens=True))
        return out
