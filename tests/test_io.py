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


# ------------------------------------------------------------------ bounded reads (issue 29)
import json  # noqa: E402
import time  # noqa: E402

from mmtag.errors import MmtagError, quoted  # noqa: E402
from mmtag.io import CONFIG_MAX_BYTES, csv_cell, load_json, load_yaml, read_bounded  # noqa: E402


def alias_bomb(path: Path, levels: int = 9) -> Path:
    """The "billion laughs" YAML: each level lists the one before nine times, so a 1 kB file
    stands for 9**9 (387 million) strings once its aliases are expanded."""
    lines = ["a0: &a0 [" + ", ".join(['"lol"'] * 9) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_yaml_aliases_are_refused_at_once_naming_file_and_line(tmp_path: Path) -> None:
    path = alias_bomb(tmp_path / "bomb.yaml")
    start = time.perf_counter()
    with pytest.raises(MmtagError) as err:
        load_yaml(path, "config file")
    assert time.perf_counter() - start < 1.0
    assert str(err.value) == (f"{path}, line 1: YAML anchors and aliases (&name, *name) are not "
                              "accepted in a config file; write the values out")
    # one anchor, never referred to, is refused too: configs never need them
    (tmp_path / "anchor.yaml").write_text("train:\n  lr: 0.001\nmodel: &m\n  hidden: 8\n")
    with pytest.raises(MmtagError, match=r"anchor\.yaml, line 3: YAML anchors and aliases"):
        load_yaml(tmp_path / "anchor.yaml", "config file")


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with open(big, "wb") as fh:  # 1 GiB, sparse: its size is known without a byte read
        fh.truncate(1 << 30)
    start = time.perf_counter()
    with pytest.raises(MmtagError) as err:
        load_yaml(big, "config file")
    assert time.perf_counter() - start < 1.0
    assert str(err.value) == f"{big}: a config file may hold 1 MiB; this one is 1,073,741,824 bytes"
    assert CONFIG_MAX_BYTES == 1 << 20
    # at the bound it is read; one byte over it is not
    (tmp_path / "at.json").write_text("[" + " " * 98 + "]")
    assert load_json(tmp_path / "at.json", max_bytes=100) == []
    (tmp_path / "over.json").write_text("[" + " " * 99 + "]")
    with pytest.raises(MmtagError, match="a run file may hold 100 bytes; this one is 101 bytes"):
        load_json(tmp_path / "over.json", max_bytes=100)


def test_a_stream_without_a_size_is_read_only_up_to_the_bound() -> None:
    if not Path("/dev/zero").exists():
        pytest.skip("needs /dev/zero")
    with pytest.raises(MmtagError, match="/dev/zero: a grid file may hold 1 MiB; this one runs past it"):
        read_bounded("/dev/zero", "grid file", CONFIG_MAX_BYTES)


@pytest.mark.parametrize("text, needle", [
    ("[" * 5000, "nested too deeply"),
    ("epochs: " + "9" * 5000, "Exceeds the limit (4300 digits)"),
    ("lr: [1", "ParserError at line 1"),
    ("x: !!python/object/apply:os.system [ls]", "ConstructorError at line 1"),
])
def test_yaml_that_cannot_be_built_is_one_line(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(MmtagError) as err:
        load_yaml(path, "config file")
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"{path}: not valid YAML (")


def test_json_nested_too_deeply_is_a_value_error(tmp_path: Path) -> None:
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        load_json(tmp_path / "deep.json")
    (tmp_path / "ok.json").write_text(json.dumps({"ids": [1, 2]}))
    assert load_json(tmp_path / "ok.json") == {"ids": [1, 2]}


def test_quoted_values_are_bounded_and_never_expanded() -> None:
    laughs: list = ["lol"] * 9
    for _ in range(8):
        laughs = [laughs] * 9  # 9**9 strings, held as 9 lists of references
    start = time.perf_counter()
    text = quoted(laughs)
    assert time.perf_counter() - start < 0.1
    assert len(text) <= 200 and text.endswith("…")
    long = quoted("x" * 1_000_000)
    assert len(long) <= 200 and "..." in long
    assert quoted(10 ** 5000) == "<an integer of 16610 bits>"  # repr() of it would raise
    assert quoted("cat") == "'cat'" and quoted([1, "a"]) == "[1, 'a']"


@pytest.mark.parametrize("text, cell", [
    ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"), ("+1", "'+1"), ("-dash", "'-dash"),
    ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"), ("\rx", "'\rx"),
    ("cat", "cat"), ("10", "10"), ("a=b", "a=b"), ("'quoted", "'quoted"), ("", ""),
])
def test_csv_cell_escapes_what_a_spreadsheet_reads_as_a_formula(text: str, cell: str) -> None:
    assert csv_cell(text) == cell
