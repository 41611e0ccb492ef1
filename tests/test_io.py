"""Atomic writes: all-or-nothing, and files readable like ones made by open()."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmtag.io import atomic_write_text, atomic_write_with


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    atomic_write_text(target, "old\n")

    def broken(p: Path) -> None:
        p.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_with(target, broken)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]  # no temp file left behind


def test_atomic_write_uses_the_umask_not_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        import importlib

        import mmtag.io as mio

        importlib.reload(mio)
        mio.atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
        importlib.reload(mio)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
