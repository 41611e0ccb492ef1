"""Checks on the real data in ../shared/data; skipped on a machine without it (e.g. a fresh clone)."""
import csv

import pytest

from mmtag.data import read_csv

from conftest import SHARED  # noqa: E402  (tests/ is on sys.path under pytest's rootdir)

COMP = SHARED / "comp5329"
pytestmark = pytest.mark.skipif(not COMP.is_dir(), reason="../shared/data is absent")


def test_competition_train_parses_every_row_exactly():
    ds = read_csv(COMP / "train.csv", require_labels=True).dataset
    with open(COMP / "train.csv", newline="", encoding="utf-8") as fh:
        ref = list(csv.DictReader(fh))
    assert len(ds) == len(ref) == 25_000
    assert ds.image_ids == [r["ImageID"] for r in ref]
    assert ds.captions == [r["Caption"].strip() for r in ref]
    assert sorted({label for row in ds.labels for label in row}) == [i for i in range(1, 20) if i != 12]
    assert any("\r" in c or "\n" in c for c in ds.captions)  # the embedded CRs survived


def test_competition_test_parses_every_row():
    ds = read_csv(COMP / "test.csv").dataset
    assert len(ds) == 10_000 and ds.labels is None
    assert ds.image_ids[0] == "30000.jpg" and ds.image_ids[-1] == "39999.jpg"
