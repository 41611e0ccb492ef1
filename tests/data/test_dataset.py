"""Tests for mmtag.data.dataset: label spaces, dataset subsets and the train/validation split."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_helpers import HEADER, crlf, write
from mmtag.data import (COCO_NAMES, Dataset, LabelSpace, LabelVocab, read_csv, shared_vocab,
                        train_val_split)
from mmtag.errors import MmtagError


# ----------------------------------------------------------------------------------------------
# 1. LabelSpace
# ----------------------------------------------------------------------------------------------

def test_label_space_from_labels_sorted_shown_as_themselves_unless_names_are_asked_for() -> None:
    from mmtag.data import label_names_of

    space = LabelSpace.from_labels([[19, 3], [1], [3, 1]])
    assert space.ids == (1, 3, 19)
    assert space.names == ("1", "3", "19")  # a user's label 3 is not COCO's "car"
    assert len(space) == 3
    coco = LabelSpace.from_labels([[19, 3], [1], [3, 1]], names=label_names_of("coco"))
    assert coco.names == ("person", "car", "horse")
    assert COCO_NAMES[1] == "person"


def test_label_names_come_from_an_id_name_file_with_errors_naming_file_and_line(tmp_path) -> None:
    from mmtag.data import label_names_of
    from mmtag.errors import DataError

    assert label_names_of("") == {}
    assert label_names_of("COCO")[3] == "car"
    names = tmp_path / "names.csv"
    names.write_text('id,name\n1,cat\n\n3,"tabby, striped"\n', encoding="utf-8")
    assert label_names_of(str(names)) == {1: "cat", 3: "tabby, striped"}
    for body, problem in (("1,cat\nx,dog\n", r"names\.csv \(line 2\): label id 'x' is not an integer"),
                          ("1,cat\n1,dog\n", r"\(line 2\): label 1 is named twice"),
                          ("1,\n", r"\(line 1\): label 1 has no name")):
        names.write_text(body, encoding="utf-8")
        with pytest.raises(DataError, match=problem):
            label_names_of(str(names))
    with pytest.raises(DataError, match="missing.csv: cannot read the label names file"):
        label_names_of(str(tmp_path / "missing.csv"))
    names.write_bytes(b"1,\xff\n")
    with pytest.raises(DataError, match="not UTF-8"):
        label_names_of(str(names))


def test_display_name_cuts_long_names_and_keeps_them_on_one_line() -> None:
    from mmtag.data import DISPLAY_CHARS, display_name

    assert display_name("horse") == "horse"
    assert display_name("x" * DISPLAY_CHARS) == "x" * DISPLAY_CHARS  # at the limit: whole
    long = "ab" * 50_000
    assert display_name(long) == long[:DISPLAY_CHARS] + "…(100,000 chars)"
    assert display_name(long, 5) == "ababa…(100,000 chars)"
    assert display_name("a\nb\tc") == "a\ufffdb\ufffdc"  # a newline never splits a line


def test_label_space_unknown_and_custom_names() -> None:
    from mmtag.data import label_names_of

    assert LabelSpace.from_labels([[12, 1]], names=label_names_of("coco")).names == ("person", "12")
    custom = LabelSpace.from_labels([[2, 1]], names={1: "one", 2: "two"})
    assert custom.ids == (1, 2)
    assert custom.names == ("one", "two")


def test_label_space_encode_decode_round_trip() -> None:
    space = LabelSpace.from_labels([[1, 3], [19], [7]])  # ids (1, 3, 7, 19)
    labels = [[3, 1], [19], [], [7, 1, 19]]
    y = space.encode(labels)
    assert y.dtype == np.float32
    assert y.shape == (4, 4)
    np.testing.assert_array_equal(y, np.array([[1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0],
                                               [1, 0, 1, 1]], dtype=np.float32))
    assert space.decode(y.astype(bool)) == [[1, 3], [19], [], [1, 7, 19]]


def test_label_space_encode_ignores_unknown_ids() -> None:
    space = LabelSpace.from_labels([[1, 2]])
    y = space.encode([[1, 99], [42], [2, 2]])
    np.testing.assert_array_equal(y, np.array([[1, 0], [0, 0], [0, 1]], dtype=np.float32))
    assert space.decode(y > 0.5) == [[1], [], [2]]


def test_label_space_dict_round_trip() -> None:
    space = LabelSpace.from_labels([[5, 1], [18]], names={1: "person", 5: "airplane", 18: "dog"})
    raw = space.to_dict()
    assert raw == {"ids": [1, 5, 18], "names": ["person", "airplane", "dog"]}
    assert LabelSpace.from_dict(raw) == space
    assert LabelSpace.from_dict(json.loads(json.dumps(raw))) == space
    assert LabelSpace.from_dict({"ids": ["1", "5"], "names": ["a", "b"]}).ids == (1, 5)


def test_named_label_space_spells_its_labels_and_round_trips() -> None:
    vocab = LabelVocab(("cat", "dog", "yak"))
    space = LabelSpace.from_labels([[2, 0], [0]], vocab=vocab)
    assert space.ids == (0, 2) and space.names == ("cat", "yak") and space.tokens == ("cat", "yak")
    raw = space.to_dict()
    assert raw == {"ids": [0, 2], "names": ["cat", "yak"], "vocab": ["cat", "dog", "yak"]}
    assert LabelSpace.from_dict(json.loads(json.dumps(raw))) == space
    # integer labels are written as before, and a dict without vocab reads as integer labels
    ints = LabelSpace.from_labels([[3, 1]])
    assert "vocab" not in ints.to_dict() and ints.tokens == ("1", "3")
    assert not LabelSpace.from_dict(ints.to_dict()).vocab.named


def test_label_vocab_extends_without_renumbering() -> None:
    vocab = LabelVocab(("cat", "dog"))
    more = vocab.extended(["zebra", "dog", "ant", "zebra"])
    assert more.names == ("cat", "dog", "ant", "zebra") and more.index()["ant"] == 2
    assert more.extends(vocab) and not vocab.extends(more)
    assert not LabelVocab().extends(vocab) and LabelVocab().token(7) == "7"


def test_label_space_of_datasets_read_in_one_chain(tmp_path: Path) -> None:
    train = read_csv(write(tmp_path, HEADER + crlf(b"a.jpg,dog cat,x")), require_labels=True).dataset
    extra = read_csv(write(tmp_path, HEADER + crlf(b"b.jpg,ant,y"), "extra.csv"),
                     require_labels=True, vocab=train.vocab).dataset
    space = LabelSpace.of(train, None, extra)
    assert space.tokens == ("cat", "dog", "ant") and space.ids == (0, 1, 2)
    assert shared_vocab(train, extra) == extra.vocab
    # read on its own, the extra file numbers its names apart: refused, not silently mixed up
    alone = read_csv(write(tmp_path, HEADER + crlf(b"b.jpg,ant,y"), "alone.csv"),
                     require_labels=True).dataset
    with pytest.raises(MmtagError, match="another label vocabulary"):
        LabelSpace.of(train, alone)
    with pytest.raises(MmtagError, match="alone.csv"):
        shared_vocab(train, alone)


def test_label_space_reports_unknown_ids() -> None:
    space = LabelSpace.from_labels([[1, 2]])
    assert space.unknown([[1, 99], [42, 99], [2]]) == {42: 1, 99: 2}
    assert space.unknown([[1], [2]]) == {}

# ----------------------------------------------------------------------------------------------
# 2. Dataset
# ----------------------------------------------------------------------------------------------

def test_read_csv_subset_keeps_rows_and_lines(tmp_path: Path) -> None:
    data = HEADER + crlf(b"a.jpg,1,x", b'b.jpg,2,"y\r\ny"', b"c.jpg,3,z")
    ds = read_csv(write(tmp_path, data)).dataset
    sub = ds.subset(np.array([2, 0]))
    assert sub.image_ids == ["c.jpg", "a.jpg"]
    assert sub.captions == ["z", "x"]
    assert sub.labels == [[3], [1]]
    assert sub.rows == [3, 1]
    assert sub.lines == [5, 2]

# ----------------------------------------------------------------------------------------------
# 3. train_val_split
# ----------------------------------------------------------------------------------------------

def test_train_val_split_deterministic_per_seed() -> None:
    tr1, va1 = train_val_split(100, 0.2, seed=0)
    tr2, va2 = train_val_split(100, 0.2, seed=0)
    np.testing.assert_array_equal(tr1, tr2)
    np.testing.assert_array_equal(va1, va2)
    _, va3 = train_val_split(100, 0.2, seed=1)
    assert not np.array_equal(va1, va3)


@pytest.mark.parametrize("n,val_frac,n_val", [(100, 0.2, 20), (10, 0.25, 3), (7, 0.5, 4),
                                              (2, 0.01, 1), (2, 0.99, 1), (5, 0.99, 4)])
def test_train_val_split_disjoint_covering_sizes(n: int, val_frac: float, n_val: int) -> None:
    train, val = train_val_split(n, val_frac, seed=3)
    assert len(val) == n_val
    assert len(train) == n - n_val
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(n))
    assert list(train) == sorted(train)
    assert list(val) == sorted(val)


@pytest.mark.parametrize("n,val_frac", [(10, 0.0), (10, 1.0), (10, -0.1), (10, 1.5),
                                        (1, 0.5), (0, 0.5)])
def test_train_val_split_errors(n: int, val_frac: float) -> None:
    with pytest.raises(ValueError):
        train_val_split(n, val_frac, seed=0)


def test_label_rows_name_the_file_when_there_are_no_labels():
    from mmtag.errors import DataError

    d = Dataset(path=Path("test.csv"), image_ids=["a.jpg"], captions=["x"], labels=None)
    with pytest.raises(DataError, match="test.csv: needs a Labels column"):
        d.label_rows()
    assert Dataset(path=Path("t.csv"), image_ids=["a"], captions=["x"], labels=[[3]]).label_rows() == [[3]]
