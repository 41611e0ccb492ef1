"""mmtag's own error type: every user-facing failure is one of these, printed as one line."""
from __future__ import annotations

from pathlib import Path


class MmtagError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


class DataError(MmtagError):
    """Bad input data; names the file and, where known, the row (1-based data row) and line."""

    def __init__(self, path: str | Path, message: str, *, row: int | None = None,
                 line: int | None = None) -> None:
        self.path = str(path)
        self.row = row
        self.line = line
        self.reason = message
        where = self.path
        if row is not None:
            where += f", row {row}"
        if line is not None:
            where += f" (line {line})"
        super().__init__(f"{where}: {message}")
