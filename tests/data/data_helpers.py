"""CSV-writing and DataError-checking helpers shared by the tests of mmtag.data (reader, dataset,
images): they all build their inputs under pytest's tmp_path.

CSVs are written as bytes so line endings (CRLF, bare CR, LF) are exactly what each test says
they are. Imported by module name: pytest puts this directory on sys.path for its tests.
"""
from __future__ import annotations

from pathlib import Path

from mmtag.errors import DataError

HEADER = b"ImageID,Labels,Caption\r\n"


def write(tmp_path: Path, data: bytes, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def crlf(*records: bytes) -> bytes:
    """Join records with CRLF (each record may itself contain quoted line breaks)."""
    return b"".join(r + b"\r\n" for r in records)


def assert_data_error(err: DataError, path: Path, row: int | None, line: int | None,
                      *fragments: str) -> None:
    msg = str(err)
    assert err.path == str(path)
    assert str(path) in msg
    assert err.row == row
    assert err.line == line
    if row is not None:
        assert f"row {row}" in msg
    if line is not None:
        assert f"line {line}" in msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
