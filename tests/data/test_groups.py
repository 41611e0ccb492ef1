"""Rows that share an image (its bytes) or a caption are one group, and every split keeps a group
on one side: folds, the --val-frac split, and a cross-fitted run's saved record."""
import csv

import numpy as np
import pytest

from mmtag import Tagger, api
from mmtag.data import Dataset, row_groups, train_val_split
from mmtag.training.folds import stratified_folds
from mmtag.training.trainer import fold_indices


def _data(image_ids, captions, images_dir=None):
    n = len(image_ids)
    return Dataset(path="x.csv", image_ids=list(image_ids), captions=list(captions),
                   labels=[[1]] * n, images_dir=images_dir, rows=list(range(1, n + 1)))


def test_rows_sharing_an_image_id_or_a_caption_are_grouped_transitively():
    d = _data(["a.jpg", "a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"],
              ["one", "two", "Two  ", "three", "four", "FOUR"])
    g = row_groups(d)
    # a.jpg joins rows 0,1; caption "two" joins 1,2; "four" joins 4,5 (case and spaces ignored)
    assert g.of.tolist() == [0, 0, 0, 1, 2, 2]
    assert (g.by_image, g.by_caption, g.grouped_rows, g.n_groups) == (2, 4, 5, 3)
    assert not g.trivial
    assert row_groups(_data(["a", "b"], ["x", "y"])).trivial


def test_two_image_ids_of_the_same_bytes_are_one_image(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"same")
    (tmp_path / "b.jpg").write_bytes(b"same")
    (tmp_path / "c.jpg").write_bytes(b"other")
    d = _data(["a.jpg", "b.jpg", "c.jpg", "missing.jpg"], ["p", "q", "r", "s"], images_dir=tmp_path)
    assert row_groups(d).of.tolist() == [0, 0, 1, 2]


def _grouped_labels(seed, n_groups=120, c=6):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, n_groups)
    groups = np.repeat(np.arange(n_groups), sizes)
    y = (rng.random((n_groups, c)) < [0.6, 0.3, 0.15, 0.1, 0.4, 0.05])[groups]
    y = y | (rng.random(y.shape) < 0.05)  # captions of one image name different labels
    perm = rng.permutation(len(groups))  # a group's rows scattered through the file
    return y[perm].astype(int), groups[perm]


@pytest.mark.parametrize("seed", range(6))
def test_grouped_folds_never_put_a_group_on_both_sides_and_stay_stratified(seed):
    y, groups = _grouped_labels(seed)
    folds = fold_indices(y, 5, seed, groups)
    seen = np.sort(np.concatenate([va for _, va in folds]))
    assert np.array_equal(seen, np.arange(len(y)))
    for tr, va in folds:
        assert not set(groups[tr]) & set(groups[va])
        assert abs(len(va) - len(y) / 5) <= 0.1 * len(y)

    def imbalance(fold_of):  # mean |a fold's label rate - the overall rate|
        return np.mean([np.abs(y[fold_of == i].mean(0) - y.mean(0)).mean() for i in range(5)])

    drawn = np.zeros(len(y), dtype=int)
    for i, (_, va) in enumerate(folds):
        drawn[va] = i
    rng = np.random.default_rng(seed)
    at_random = np.mean([imbalance(rng.integers(0, 5, groups.max() + 1)[groups]) for _ in range(20)])
    assert imbalance(drawn) < 0.5 * at_random  # stratified: measured 3x better than chance
    again = fold_indices(y, 5, seed, groups)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))


def test_groups_of_one_row_draw_the_ungrouped_folds():
    y, _ = _grouped_labels(0)
    alone = np.arange(len(y))
    for a, b in zip(stratified_folds(y, 5, 3), stratified_folds(y, 5, 3, alone), strict=True):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_the_val_frac_split_keeps_groups_whole():
    y, groups = _grouped_labels(1)
    tr, va = train_val_split(len(y), 0.2, 0, groups)
    assert not set(groups[tr]) & set(groups[va])
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(len(y)))
    assert abs(len(va) - 0.2 * len(y)) <= 5  # one group's rows at most past the target
    # one row per group: the ungrouped split, unchanged
    for a, b in zip(train_val_split(50, 0.2, 4), train_val_split(50, 0.2, 4, np.arange(50))):
        assert np.array_equal(a, b)


def test_too_few_groups_for_the_folds_is_one_line():
    from mmtag.errors import MmtagError

    with pytest.raises(MmtagError, match="only 2 group.*--no-group-rows"):
        fold_indices(np.eye(6, 3), 5, 0, np.array([0, 0, 0, 1, 1, 1]))


def test_a_cross_fitted_run_keeps_groups_in_one_fold_and_saves_its_folds(tiny, make_config, tmp_path):
    # every training row twice, under another ImageID and with the same caption: a COCO-style
    # CSV's captions of one image, and the competition's repeated captions
    with open(tiny.train_csv, newline="") as fh:
        rows = list(csv.reader(fh))
    doubled = tmp_path / "doubled.csv"
    with open(doubled, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(rows[0])
        for r in rows[1:]:
            w.writerow(r)
            w.writerow(["copy-" + r[0], r[1], r[2]])
    train, _ = api.read_dataset(doubled, None, labelled=True)
    cfg = make_config(**{"model.modalities": ["text"], "train.folds": 3, "train.epochs": 2})
    tagger = Tagger(cfg)
    tagger.fit(train, progress=False)
    fold = tagger.validation.fold
    groups = row_groups(train).of
    assert fold is not None and len(fold) == len(train)
    for g in np.unique(groups):
        assert len(set(fold[groups == g])) == 1
    tagger.save(tmp_path / "run")
    back = Tagger.load(tmp_path / "run")
    assert np.array_equal(back.validation.fold, fold)
    # ungrouped, copies land in other folds (what grouping prevents)
    loose = Tagger(cfg.override({"data.group_rows": False}))
    loose.fit(train, progress=False)
    assert any(len(set(loose.validation.fold[groups == g])) > 1 for g in np.unique(groups))
