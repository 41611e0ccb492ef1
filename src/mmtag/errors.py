"""mmtag's own error type: every user-facing failure is one of these, printed as one line."""
from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

QUOTE_LIMIT = 200  # characters of a user's value that a message quotes


class _Bounded(reprlib.Repr):
    """reprlib's repr with a cap on integers too: repr() of an int of more than 4,300 digits
    raises, and a message must never fail (or take long) to say what was wrong."""

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 1000:
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_QUOTE = _Bounded()
_QUOTE.maxlevel = 3
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = _QUOTE.maxfrozenset = 8
_QUOTE.maxstring = _QUOTE.maxother = _QUOTE.maxlong = QUOTE_LIMIT


def quoted(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """repr(value) for a one-line message, at most `limit` characters (long strings cut in the
    middle, long lists after a few items, then "…"). Built by reprlib, which looks at no more of
    `value` than it shows: a config of nested aliases expands to billions of items, and repr()
    of it would run until memory is gone."""
    text = _QUOTE.repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


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
