"""`mmtag audit`: planted label errors, copies, conflicts and leaks are found from a cross-fitted
run's out-of-fold scores; `--fix` writes a corrected copy in the input's layout and never
touches the input; bad input is one line."""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest

from mmtag import api
from mmtag.data import TEXT_LABELS, Dataset
from mmtag.errors import MmtagError
from mmtag.jobs.audit import audit
from mmtag.jobs.audit_findings import (NEAR_BITS, duplicate_issues, image_hashes, image_keys_of,
                                       near_duplicate_issues)


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def _write(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)
    return path


@pytest.fixture(scope="module")
def planted(tiny, tmp_path_factory, make_config):
    """The tiny training CSV with planted problems, and a text-only run cross-fitted on it."""
    root = tmp_path_factory.mktemp("audit")
    rows = _rows(tiny.train_csv)
    header, body = rows[0], rows[1:]
    # a label dropped from rows whose caption names it (the synthetic TEXT_LABELS are named in
    # the caption): labels the captions say are missing
    dropped = []
    for n, r in enumerate(body, 1):
        labels = r[1].split()
        named = [t for t in labels if int(t) in TEXT_LABELS]
        if len(labels) >= 2 and named and len(dropped) < 6:
            r[1] = " ".join(t for t in labels if t != named[0])
            dropped.append((n, named[0]))
    body.append(list(body[0]))  # an exact copy of row 1
    body.append(["copy-" + body[1][0], "13" if body[1][1] != "13" else "15", body[1][2]])  # a conflict
    train = _write(root / "train.csv", [header, *body])
    test = _write(root / "test.csv", [["ImageID", "Caption"], ["t1.jpg", body[4][2]],
                                      ["t2.jpg", "nothing like any training caption at all"]])
    run = root / "run"
    cfg = make_config(**{"model.modalities": ["text"], "train.folds": 5, "train.epochs": 30,
                         "model.fusion": "mean"})
    api.train(train, None, run, cfg, progress=False, audit=True)
    return root, train, test, run, dropped, len(body)


def test_train_audit_writes_the_run_s_audit_and_the_report_links_it(planted):
    _, _, _, run, _, n = planted
    issues = _rows(run / "audit" / "issues.csv")
    assert any(r[2] == "exact duplicate" and r[0] == str(n - 1) for r in issues[1:])
    assert 'href="audit/audit.html"' in (run / "report.html").read_text()
    from mmtag import Tagger

    Tagger.load(run)  # the audit beside the bundle leaves it loadable


def test_audit_finds_copies_conflicts_leaks_and_dropped_labels(planted):
    root, train, test, run, dropped, n = planted
    before = hashlib.sha256(train.read_bytes()).hexdigest()
    result = audit(train, run=run, tests=[test], out=root / "out", fix=root / "clean.csv",
                   fix_min_score=0.5, progress=False)
    kinds = {}
    for i in result.issues:
        kinds.setdefault(i.kind, []).append(i)
    assert [(i.row, i.other) for i in kinds["exact duplicate"]] == [(n - 1, 1)]
    # without images, rows describing two pictures alike are conflicts of a lower score (the
    # synthetic captions repeat); the planted copy with other labels is one
    conflicts = {(i.row, i.other): i.score for i in kinds["conflicting duplicate"]}
    assert conflicts[(n, 2)] == 0.5
    leaks = kinds["leak"]
    assert [(i.row, i.other_file) for i in leaks] == [(1, str(test))]
    first = next(k for k, r in enumerate(_rows(train)[1:], 1) if r[2] == _rows(test)[1][1])
    assert leaks[0].other == first  # the first training row with the test row's caption
    # most dropped labels come back as missing labels of their rows
    missing = {(i.row, i.label) for i in kinds.get("missing label", [])}
    assert len(missing & set(dropped)) >= len(dropped) // 2
    issues = _rows(root / "out" / "issues.csv")
    assert issues[0] == ["row", "ImageID", "kind", "label", "evidence", "score", "other_row", "other_file"]
    assert len(issues) == len(result.issues) + 1
    page = (root / "out" / "audit.html").read_text()
    assert "Per label" in page and "exact duplicate (1)" in page
    # the fix: the input untouched, a copy in its layout, every change listed
    assert hashlib.sha256(train.read_bytes()).hexdigest() == before
    changes = _rows(root / "out" / "changes.csv")
    assert changes[0] == ["row", "ImageID", "before", "after", "why"] and len(changes) > 1
    original, fixed = _rows(train), _rows(root / "clean.csv")
    assert len(fixed) == len(original) and fixed[0] == original[0]
    changed = {int(c[0]) for c in changes[1:]}
    for k in range(1, len(original)):
        if k in changed:
            c = next(c for c in changes[1:] if int(c[0]) == k)
            assert sorted(fixed[k][1].split()) == sorted(c[3].split()) and fixed[k][2] == original[k][2]
        else:
            assert fixed[k] == original[k]
    assert any(int(r) == row and label in after.split() for r, _, _, after, _ in changes[1:]
               for row, label in dropped)


def test_audit_refuses_what_it_cannot_audit_in_one_line(planted, tiny, fused_run):
    root, train, test, run, *_ = planted
    with pytest.raises(MmtagError, match="is not the CSV .* was cross-fitted on"):
        audit(tiny.train_csv, run=run, out=root / "x", progress=False)
    with pytest.raises(MmtagError, match="not cross-fitted"):
        audit(tiny.train_csv, tiny.images, run=fused_run, out=root / "y", progress=False)
    with pytest.raises(MmtagError, match="must be another file than the input"):
        audit(train, run=run, fix=train, out=root / "z", progress=False)
    bad = _write(root / "bad.csv", [["file", "text"], ["a", "b"]])
    with pytest.raises(MmtagError, match=r"--test .*bad.csv.*no column"):
        audit(train, run=run, tests=[bad], out=root / "w", progress=False)


def test_same_image_bytes_are_copies_or_conflicts_and_near_copies_are_found(tmp_path):
    for name, content in (("a.jpg", b"one"), ("b.jpg", b"one"), ("c.jpg", b"one"), ("d.jpg", b"two")):
        (tmp_path / name).write_bytes(content)
    data = Dataset(path=Path("t.csv"), image_ids=["a.jpg", "b.jpg", "c.jpg", "d.jpg"],
                   captions=["x", "x", "another caption", "y"], labels=[[1], [1], [2], [1]],
                   images_dir=tmp_path, rows=[1, 2, 3, 4])
    y = np.array([[1, 0], [1, 0], [0, 1], [1, 0]])
    keys = image_keys_of(data)
    found = [(i.row, i.kind, i.other) for i in duplicate_issues(data, y, keys)]
    assert found == [(2, "exact duplicate", 1), (3, "conflicting duplicate", 1)]
    # d.jpg: other bytes, the same picture (resized, re-encoded); e.jpg: another picture
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).resize((48, 48)).save(tmp_path / "d.jpg", quality=60)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "e.png")
    pics = Dataset(path=Path("t.csv"), image_ids=["a.png", "d.jpg", "e.png"], captions=["p", "q", "r"],
                   labels=[[1]] * 3, images_dir=tmp_path, rows=[1, 2, 3])
    near = near_duplicate_issues(pics, image_hashes(pics), image_keys_of(pics))
    assert [(i.row, i.other, i.kind) for i in near] == [(2, 1, "near duplicate")]
    assert near[0].score >= 1 - NEAR_BITS / 64
