"""The README and docs/ as a user meets them: the three commands the README opens with, links that
resolve after sections move between pages, a data example the reader accepts, and `make setup`
installing what running mmtag needs while `make test` adds the test tools."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mmtag.api import read_dataset

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(text: str) -> list[str]:
    """The fenced code blocks of a Markdown text, in order."""
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -N for repeats."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not re.match(r"#+ ", line):
            continue
        title = re.sub(r"^#+ ", "", line).strip().lower().replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def test_readme_opens_with_setup_demo_and_test():
    first = _blocks((ROOT / "README.md").read_text())[0]
    commands = [line.split("#")[0].strip() for line in first.splitlines() if line.strip()]
    assert commands == ["make setup", ".venv/bin/mmtag demo", "make test"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page: Path):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path) if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not broken, f"{page.name}: {broken}"


def test_readme_data_example_reads(tmp_path: Path):
    example = next(b for b in _blocks((ROOT / "README.md").read_text())
                   if b.startswith("ImageID,Labels,Caption"))
    csv = tmp_path / "train.csv"
    csv.write_text(example)
    dataset, skipped = read_dataset(csv, None, labelled=True)
    assert skipped == []
    assert len(dataset) == len(example.splitlines()) - 1


def _recipes(target: str) -> str:
    """What `make TARGET` would run from scratch (-B: every target out of date; -n: print only)."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make on this machine")
    # Under `make test` this runs inside make: a nested make would add "Entering directory" lines
    # and inherit the outer one's flags, so it gets neither.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run([make, "--no-print-directory", "-n", "-B", target], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True).stdout


def test_setup_installs_no_test_tools():
    setup = _recipes("setup")
    assert "pip install --quiet -e ." in setup
    assert "[dev]" not in setup and "chromium" not in setup


def test_test_target_installs_the_test_tools():
    test = _recipes("test")
    assert '-e ".[dev]"' in test and "chromium" in test
    assert test.rstrip().endswith("-m pytest -q -n auto --dist loadfile")  # one worker per core
