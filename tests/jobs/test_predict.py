"""`mmtag evaluate` / `mmtag predict` on users' own data (issue 17): other column names, label
names instead of ids, another label separator, ImageIDs without their extension, and the
scores out (`proba=`, `top_k=`). Text-only models on one split keep these fast."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from mmtag import api
from mmtag.errors import DataError, MmtagError

# The synthetic labels (mmtag.data.synthetic) under names a user might give them.
NAMES = {10: "light", 13: "stop", 15: "bench", 17: "cat", 18: "dog", 19: "horse"}


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def _write(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    return path


def _relabel(src: Path, dst: Path, spell, sep: str = " ") -> Path:
    """`src` with each Labels cell's ids spelled by `spell` and joined by `sep`."""
    rows = _rows(src)
    j = rows[0].index("Labels")
    for row in rows[1:]:
        row[j] = sep.join(spell(int(t)) for t in row[j].split())
    return _write(dst, rows)


def _text_config(make_config, **overrides):
    return make_config(**{"model.modalities": ["text"], "train.epochs": 15, "model.hidden": 64,
                          **overrides})


@pytest.fixture(scope="module")
def int_run(tiny, make_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "ints"
    api.train(tiny.train_csv, None, out, _text_config(make_config), progress=False)
    return out


@pytest.fixture(scope="module")
def named(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("named")
    return {"train": _relabel(tiny.train_csv, root / "train.csv", NAMES.get),
            "holdout": _relabel(tiny.holdout_csv, root / "holdout.csv", NAMES.get)}


@pytest.fixture(scope="module")
def named_run(named, make_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "named"
    api.train(named["train"], None, out, _text_config(make_config), progress=False)
    return out


# ------------------------------------------------------------------ labels: ids and names
def test_integer_labels_write_ids_as_before(tiny, int_run, tmp_path) -> None:
    labels = json.loads((int_run / "labels.json").read_text())
    assert "vocab" not in labels and labels["ids"] == [10, 13, 15, 17, 18, 19]
    preds = api.predict(int_run, tiny.test_csv, None, tmp_path / "s.csv", progress=False)
    rows = _rows(tmp_path / "s.csv")
    assert rows[0] == ["ImageID", "Labels"]
    assert [r[1] for r in rows[1:]] == [" ".join(map(str, row)) for row in preds.labels]
    assert all(t.isdigit() and int(t) in NAMES for r in rows[1:] for t in r[1].split())


def test_a_model_trained_on_names_predicts_names(tiny, named, named_run, int_run,
                                                 tmp_path) -> None:
    labels = json.loads((named_run / "labels.json").read_text())
    assert labels["vocab"] == sorted(NAMES.values()) and labels["names"] == sorted(NAMES.values())
    preds = api.predict(named_run, tiny.test_csv, None, tmp_path / "s.csv", progress=False)
    rows = _rows(tmp_path / "s.csv")
    assert [r[0] for r in rows[1:]] == [r[0] for r in _rows(tiny.test_csv)[1:]]  # input order
    vocab = sorted(NAMES.values())
    assert [r[1].split() for r in rows[1:]] == [[vocab[i] for i in row] for row in preds.labels]
    # The captions name the animals: a text model trained on names finds them, by name.
    said = {"cat": ("cat", "kitten"), "dog": ("dog", "puppy"), "horse": ("horse", "pony")}
    captions = [r[1] for r in _rows(tiny.test_csv)[1:]]
    hits = [name in row[1].split() for caption, row in zip(captions, rows[1:])
            for name, words in said.items() if any(w in caption.split() for w in words)]
    assert hits and np.mean(hits) > 0.8
    # Scored on the named holdout, it does as well as the integer model on the integer one:
    # the same captions and labels, spelled differently.
    m_named = api.evaluate(named_run, named["holdout"], None, progress=False)
    m_ints = api.evaluate(int_run, tiny.holdout_csv, None, progress=False)
    assert [c.name for c in m_named.per_class] == vocab
    assert abs(m_named.samples_f1 - m_ints.samples_f1) < 0.1


def test_unknown_names_are_reported_by_name(named, named_run, tmp_path, caplog) -> None:
    rows = _rows(named["holdout"])
    rows[1][1] += " zebra"
    rows[2][1] += " zebra ant"
    path = _write(tmp_path / "h.csv", rows)
    with caplog.at_level(logging.WARNING, logger="mmtag"):
        m = api.evaluate(named_run, path, None, progress=False)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "'ant' (1 row), 'zebra' (2 rows)" in warning
    assert [c.name for c in m.per_class[-2:]] == ["ant (unknown)", "zebra (unknown)"]


def test_a_names_model_refuses_an_integer_file_and_the_reverse(tiny, named, named_run,
                                                               int_run) -> None:
    with pytest.raises(DataError, match="row 1 .*' is an integer, but the model's labels are names"):
        api.evaluate(named_run, tiny.holdout_csv, None, progress=False)
    with pytest.raises(DataError, match="is not an integer, but the model's labels are integer ids"):
        api.evaluate(int_run, named["holdout"], None, progress=False)


def test_label_sep_comma_trains_and_writes_comma_separated_labels(tiny, make_config,
                                                                  tmp_path) -> None:
    train = _relabel(tiny.train_csv, tmp_path / "train.csv", str, sep=",")
    with pytest.raises(DataError, match=r"holds a comma, .*pass --label-sep ,"):
        api.train(train, None, tmp_path / "refused", _text_config(make_config), progress=False)
    run = tmp_path / "run"
    api.train(train, None, run, _text_config(make_config, **{"data.label_sep": ","}),
              progress=False)
    preds = api.predict(run, tiny.test_csv, None, tmp_path / "s.csv", progress=False)
    rows = _rows(tmp_path / "s.csv")
    assert [r[1] for r in rows[1:]] == [",".join(map(str, row)) for row in preds.labels]
    assert any("," in r[1] for r in rows[1:]) or all(len(r) == 1 for r in preds.labels)
    holdout = _relabel(tiny.holdout_csv, tmp_path / "holdout.csv", str, sep=",")
    assert api.evaluate(run, holdout, None, progress=False).n == 40  # the run's sep, saved
    spaced = api.evaluate(run, tiny.holdout_csv, None, progress=False, label_sep=" ")
    assert spaced.n == 40


# ------------------------------------------------------------------ column names
def test_custom_column_names_round_trip_train_to_predict(tiny, make_config, tmp_path) -> None:
    def renamed(src: Path, dst: Path) -> Path:
        rows = _rows(src)
        names = {"ImageID": "file", "Labels": "tags", "Caption": "text"}
        order = [rows[0].index(c) for c in ("Caption", "Labels", "ImageID") if c in rows[0]]
        return _write(dst, [[names[row[i]] if k == 0 else row[i] for i in order]
                            for k, row in enumerate(rows)])

    train = renamed(tiny.train_csv, tmp_path / "train.csv")
    test = renamed(tiny.test_csv, tmp_path / "test.csv")
    assert _rows(train)[0] == ["text", "tags", "file"] and _rows(test)[0] == ["text", "file"]
    with pytest.raises(DataError, match=r"no columns 'ImageID', 'Labels', 'Caption' \(found: "
                                        r"text, tags, file\); pass --image-col NAME --labels-col "
                                        r"NAME --caption-col NAME"):
        api.train(train, None, tmp_path / "refused", _text_config(make_config), progress=False)
    run = tmp_path / "run"
    columns = {"data.image_col": "file", "data.caption_col": "text", "data.labels_col": "tags"}
    api.train(train, None, run, _text_config(make_config, **columns), progress=False)
    # the saved config reads the same layout; the submission keeps the competition header
    preds = api.predict(run, test, None, tmp_path / "s.csv", progress=False)
    rows = _rows(tmp_path / "s.csv")
    assert rows[0] == ["ImageID", "Labels"]
    assert [r[0] for r in rows[1:]] == [r[1] for r in _rows(test)[1:]]
    # a file in the competition layout is read by naming its columns
    again = api.predict(run, tiny.test_csv, None, tmp_path / "t.csv", progress=False,
                        image_col="ImageID", caption_col="Caption")
    assert again.labels == preds.labels and np.allclose(again.probs, preds.probs)
    with pytest.raises(DataError, match=r"no columns 'file', 'text' \(found: ImageID, Caption\); "
                                        "pass --image-col ImageID --caption-col Caption"):
        api.predict(run, tiny.test_csv, None, tmp_path / "u.csv", progress=False)
    with pytest.raises(MmtagError, match=r"--label-sep \(data.label_sep\) must be one character"):
        api.predict(run, test, None, tmp_path / "u.csv", progress=False, label_sep="ab")


# ------------------------------------------------------------------ scores out
def test_proba_writes_every_label_per_row_in_input_order(tiny, named_run, tmp_path) -> None:
    out, proba = tmp_path / "s.csv", tmp_path / "p.csv"
    preds = api.predict(named_run, tiny.test_csv, None, out, proba=proba, progress=False)
    rows = _rows(proba)
    assert rows[0] == ["ImageID", *sorted(NAMES.values())]
    assert [r[0] for r in rows[1:]] == [r[0] for r in _rows(tiny.test_csv)[1:]]
    values = np.array([[float(x) for x in r[1:]] for r in rows[1:]])
    assert values.shape == (12, 6) and ((values >= 0) & (values <= 1)).all()
    assert np.allclose(values, preds.probs, rtol=1e-5, atol=1e-7)
    with pytest.raises(MmtagError, match="another file than the submission"):
        api.predict(named_run, tiny.test_csv, None, out, proba=out, progress=False)


def test_integer_proba_headers_are_the_ids(tiny, int_run, tmp_path) -> None:
    api.predict(int_run, tiny.test_csv, None, tmp_path / "s.csv", proba=tmp_path / "p.csv",
                progress=False)
    assert _rows(tmp_path / "p.csv")[0] == ["ImageID", "10", "13", "15", "17", "18", "19"]


def test_top_k_caps_the_labels_of_each_row(tiny, int_run, tmp_path) -> None:
    full = api.predict(int_run, tiny.test_csv, None, tmp_path / "a.csv", progress=False)
    assert max(len(r) for r in full.labels) > 1  # something to cap
    one = api.predict(int_run, tiny.test_csv, None, tmp_path / "b.csv", progress=False, top_k=1)
    assert [len(r) for r in one.labels] == [1] * 12
    assert [int(r[1]) for r in _rows(tmp_path / "b.csv")[1:]] == [r[0] for r in one.labels]
    for kept, row, p in zip(one.labels, full.labels, full.probs):
        ids = [10, 13, 15, 17, 18, 19]
        assert kept[0] == max(row, key=lambda label: p[ids.index(label)])  # the best of the chosen
    two = api.predict(int_run, tiny.test_csv, None, tmp_path / "c.csv", progress=False, top_k=2)
    assert all(len(t) <= 2 and set(t) <= set(f) for t, f in zip(two.labels, full.labels))
    # the Python API caps the same way
    captions = [r[1] for r in _rows(tiny.test_csv)[1:]]
    tagger = api.Tagger.load(int_run)
    assert [p.labels for p in tagger.predict(captions=captions, top_k=1)] == one.labels
    with pytest.raises(MmtagError, match="--top-k must be an integer >= 1"):
        api.predict(int_run, tiny.test_csv, None, tmp_path / "d.csv", progress=False, top_k=0)


# ------------------------------------------------------------------ images without extension
def test_image_ext_reads_ids_written_without_their_extension(tiny, fused_run, tmp_path) -> None:
    rows = _rows(tiny.test_csv)
    for row in rows[1:]:
        row[0] = row[0].removesuffix(".jpg")
    bare = _write(tmp_path / "bare.csv", rows)
    with pytest.raises(DataError) as info:
        api.predict(fused_run, bare, tiny.images, tmp_path / "s.csv", progress=False)
    message = str(info.value)
    assert "pass --image-ext .jpg" in message and f"{rows[1][0]}.jpg" in message
    assert "\n" not in message and "and so for all 12 rows" in message
    with_ext = api.predict(fused_run, bare, tiny.images, tmp_path / "s.csv", progress=False,
                           image_ext=".jpg")
    plain = api.predict(fused_run, tiny.test_csv, tiny.images, tmp_path / "t.csv", progress=False)
    assert np.allclose(with_ext.probs, plain.probs, atol=1e-6)
    assert [r[0] for r in _rows(tmp_path / "s.csv")[1:]] == [r[0] for r in rows[1:]]  # ids as given


# ------------------------------------------------------------------ CSV cells that are safe to open (issue 29)
# Label names a spreadsheet would run as formulas (OWASP "CSV Injection"): every one of = + - @.
FORMULAS = {10: "light", 13: "+stop", 15: "-bench", 17: "=cmd", 18: "@dog", 19: "horse"}


def test_formula_like_names_are_escaped_in_csv_cells_and_nowhere_else(tiny, make_config,
                                                                      tmp_path) -> None:
    run = tmp_path / "run"
    train = _relabel(tiny.train_csv, tmp_path / "train.csv", FORMULAS.get)
    api.train(train, None, run, _text_config(make_config), progress=False)
    names = sorted(FORMULAS.values())
    assert json.loads((run / "labels.json").read_text())["vocab"] == names  # as the user wrote them
    rows = _rows(tiny.test_csv)
    rows[1][0] = "=HYPERLINK(x).jpg"  # an image id is the user's text too (a text model reads no image)
    test = _write(tmp_path / "test.csv", rows)
    out, proba = tmp_path / "s.csv", tmp_path / "p.csv"
    preds = api.predict(run, test, None, out, proba=proba, progress=False)
    assert _rows(proba)[0] == ["ImageID", "'+stop", "'-bench", "'=cmd", "'@dog", "horse", "light"]
    written = _rows(out)
    cells = [" ".join(names[i] for i in row) for row in preds.labels]
    assert [r[1] for r in written[1:]] == [("'" + c) if c[0] in "=+-@" else c for c in cells]
    assert any(r[1].startswith("'=cmd") for r in written[1:])  # the captions name cats: =cmd
    assert written[1][0] == _rows(proba)[1][0] == "'=HYPERLINK(x).jpg"
    assert [r[0] for r in written[2:]] == [r[0] for r in rows[2:]]  # plain ids unchanged
    # the Python API keeps the names as they are
    captions = [r[1] for r in rows[1:]]
    said = api.Tagger.load(run).predict(captions=captions)
    assert [p.names for p in said] == [[names[i] for i in row] for row in preds.labels]


def test_a_label_that_would_be_a_second_proba_column_is_refused(tmp_path) -> None:
    from mmtag.jobs.predict import write_probabilities

    probs = np.zeros((1, 2), dtype=np.float32)
    # a bundle made before the reader refused such names, or a Tagger fitted in Python
    with pytest.raises(MmtagError) as info:
        write_probabilities(tmp_path / "p.csv", ["a.jpg"], probs, ["cat", "imageID"])
    assert str(info.value) == ("label 'imageID' would be a second column 'imageID' in the --proba "
                               "CSV (beside 'ImageID'); rename the label")
    with pytest.raises(MmtagError, match="label \"'=x\" would be a second column \"'=x\" .*beside '=x'"):
        write_probabilities(tmp_path / "p.csv", ["a.jpg"], probs, ["=x", "'=x"])
    assert not (tmp_path / "p.csv").exists()
    write_probabilities(tmp_path / "p.csv", ["a.jpg"], probs, ["Cat", "cat"])  # distinct columns
    assert _rows(tmp_path / "p.csv")[0] == ["ImageID", "Cat", "cat"]


def test_group_by_image_id_answers_once_per_image_from_its_averaged_scores(tiny, make_config, tmp_path):
    from mmtag import Tagger

    run = tmp_path / "run"
    api.train(tiny.train_csv, None, run, make_config(**{"model.modalities": ["text"]}), progress=False)
    # each test image listed with two captions (its own, and another row's), one image once
    rows = _rows(tiny.holdout_csv)
    header, body = rows[0], rows[1:7]
    listed = [body[0], [body[0][0], body[0][1], body[3][2]], body[1],
              [body[1][0], body[1][1], body[4][2]], body[2]]
    csv_path = _write(tmp_path / "several.csv", [header, *listed])
    per_row = api.predict(run, csv_path, None, tmp_path / "rows.csv", progress=False)
    grouped = api.predict(run, csv_path, None, tmp_path / "sub.csv", progress=False,
                          group_by="ImageID", proba=tmp_path / "p.csv")
    ids = [body[0][0], body[1][0], body[2][0]]
    assert grouped.dataset.image_ids == ids and [r[0] for r in _rows(tmp_path / "sub.csv")[1:]] == ids
    want = np.stack([per_row.probs[[0, 1]].mean(0), per_row.probs[[2, 3]].mean(0), per_row.probs[4]])
    assert np.allclose(grouped.probs, want, atol=1e-6)
    tagger = Tagger.load(run)
    from mmtag.decision import decide

    assert np.array_equal(grouped.mask, decide(want.astype(np.float32), tagger.thresholds))
    assert len(_rows(tmp_path / "p.csv")) == 4
    with pytest.raises(MmtagError, match="grouped by ImageID"):
        api.predict(run, csv_path, None, tmp_path / "x.csv", progress=False, group_by="Caption")
