"""Errors a user can act on.

Every error the tool raises on purpose derives from :class:`PeftguardError`; the CLI prints its
message on one line and exits non-zero without a traceback.
"""
from __future__ import annotations

from pathlib import Path


class PeftguardError(Exception):
    """Base class: a problem with the user's input, files or options."""


class DataError(PeftguardError):
    """A dataset or input file that cannot be read as asked."""

    def __init__(
        self,
        path: str | Path,
        message: str,
        *,
        line: int | None = None,
        column: str | None = None,
    ) -> None:
        self.path, self.line, self.column = str(path), line, column
        where = self.path
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column '{column}'"
        super().__init__(f"{where}: {message}")


class OptionError(PeftguardError):
    """An option value that is out of range or inconsistent with another."""


class UnsafeCheckpointError(PeftguardError):
    """A checkpoint that would execute code when loaded (pickle), refused by default."""


class OutputError(PeftguardError):
    """An ``--out`` the command must not write to: a user's files, an input, or a folder where a file goes."""
