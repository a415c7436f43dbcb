"""``peftguard psim scan``: score user inputs with a PSIM, one output row per input."""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import logging
from typing import Any

from peftguard import metrics
from peftguard.artifacts import write_text
from peftguard.bounds import BOUNDS
from peftguard.data import check_nul, decode_utf8, read_rows, read_utf8, split_lines
from peftguard.defenses.psim_onnx import OnnxPSIM, is_exported_psim
from peftguard.errors import DataError
from peftguard.precision import DEFAULT_PRECISION

log = logging.getLogger(__name__)
SCAN_HEADER = ("text", "confidence", "flagged")


def read_inputs(source: str, text_column: str = "text") -> list[str]:
    """Texts from a CSV/TSV/JSONL file (``text_column``), a plain-text file (one per line), or '-' (stdin).

    Blank texts are skipped in every format, and counted on stderr: an empty input has nothing to flag.
    """
    name = "<stdin>" if source == "-" else source
    if source == "-":
        texts = _plain_lines(decode_utf8(sys.stdin.buffer.read(), name), name)
    else:
        path = Path(source)
        if path.suffix.lower() in (".csv", ".tsv", ".jsonl"):
            texts = []
            for line, record in read_rows(path, (text_column,)):
                value = record[text_column]
                if not isinstance(value, str):
                    raise DataError(path, f"text is {type(value).__name__}, expected a string", line=line, column=text_column)
                texts.append(value)
        else:
            texts = _plain_lines(read_utf8(path), name)
    kept = [text for text in texts if text.strip()]
    if len(kept) < len(texts):
        log.warning("%s: skipped %d empty input(s)", name, len(texts) - len(kept))
    if not kept:
        raise DataError(name, "no inputs to scan (the file is empty or every text is blank)")
    return kept


def _plain_lines(content: str, name: str) -> list[str]:
    """Every line, blank ones included; only \\n, \\r\\n and \\r end a line (U+2028 or \\x85 stay inside the text).

    A final line break does not start another (blank) line.
    """
    check_nul(content, name)
    lines = split_lines(content)
    return lines[:-1] if lines and lines[-1] == "" else lines


def is_scan_output(path: Path) -> bool:
    """Whether ``path`` is a result file ``psim scan`` wrote (CSV header or first JSONL record)."""
    with path.open(encoding="utf-8") as handle:
        first = handle.readline(100_000).rstrip("\n")
    if first == ",".join(SCAN_HEADER):
        return True
    record = json.loads(first) if first.startswith("{") else None
    return isinstance(record, dict) and set(record) == set(SCAN_HEADER)


def open_psim(psim_dir: Path, *, batch_size: int, precision: str, allow_pickle: bool = False) -> Any:
    """A PSIM folder for scanning: an ONNX export (``psim export``; no torch is imported) or a torch PSIM."""
    if is_exported_psim(psim_dir):
        return OnnxPSIM(psim_dir, batch_size=batch_size, precision=precision)
    from peftguard.defenses.psim import PSIM
    from peftguard.models import LoadOptions

    return PSIM(psim_dir, options=LoadOptions(allow_pickle=allow_pickle), batch_size=batch_size, precision=precision)


def scan_command(
    psim_dir: Path, source: str, out: Path | None, *, text_column: str, gamma: float | None, batch_size: int,
    allow_pickle: bool = False, precision: str = DEFAULT_PRECISION,
) -> None:
    if gamma is not None:
        BOUNDS["gamma"].check(gamma, "--gamma")
    texts = read_inputs(source, text_column)
    psim = open_psim(psim_dir, batch_size=batch_size, precision=precision, allow_pickle=allow_pickle)
    gamma = float(psim.manifest["gamma"]) if gamma is None else gamma
    scores = psim.confidences(texts, desc="scan" if source != "-" else None, gamma=gamma)
    flags = metrics.flagged(scores, gamma)
    as_jsonl = out is not None and out.suffix == ".jsonl"
    rendered = _render(texts, scores, flags, as_jsonl)
    if out is None:
        sys.stdout.write(rendered)
    else:
        write_text(out, rendered)
        print(f"scanned {len(texts)} inputs, {int(flags.sum())} flagged (gamma {gamma:.4f}, {psim.precision}); wrote {out}",
              file=sys.stderr)


def _render(texts: list[str], scores, flags, as_jsonl: bool) -> str:
    if as_jsonl:
        return "".join(
            json.dumps({"text": t, "confidence": round(float(s), 6), "flagged": bool(f)}, ensure_ascii=False) + "\n"
            for t, s, f in zip(texts, scores, flags)
        )
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SCAN_HEADER)
    for t, s, f in zip(texts, scores, flags):
        writer.writerow([t, f"{float(s):.6f}", int(bool(f))])
    return buffer.getvalue()
