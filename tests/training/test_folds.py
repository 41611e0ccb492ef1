"""The cross-fitting folds: iterative stratification exactly as the `iterative-stratification`
package draws it (the same folds for the same seed), at any number of labels (issue 29)."""
import numpy as np
import pytest
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

from mmtag.training.folds import stratified_folds
from mmtag.training.trainer import fold_indices


@pytest.mark.parametrize("seed", range(24))
def test_the_folds_are_the_packages(seed):
    rng = np.random.default_rng(seed)
    n, c, k = int(rng.integers(5, 300)), int(rng.integers(2, 40)), int(rng.integers(2, 6))
    y = (rng.random((n, c)) < rng.uniform(0.01, 0.5)).astype(int)
    if seed % 3 == 0:
        y[rng.random(n) < 0.3] = 0  # rows without labels: spread at the end
    if seed % 4 == 0:
        y[:, : c // 2] = y[:, :1]  # equal label counts: ties drawn at random
    want = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(
        np.zeros((n, 1)), y)
    got = stratified_folds(y, k, seed)
    for (train_a, val_a), (train_b, val_b) in zip(want, got, strict=True):
        assert np.array_equal(train_a, train_b) and np.array_equal(val_a, val_b)


def test_thousands_of_labels_are_stratified_quickly():
    import time

    rng = np.random.default_rng(0)
    n, c = 2000, 10_000
    y = np.zeros((n, c), dtype=int)
    y[rng.integers(0, n, c), np.arange(c)] = 1  # every label at least once, most just once
    y[np.arange(n), rng.integers(0, 20, n)] = 1
    t0 = time.perf_counter()
    folds = fold_indices(y, 5, 0)
    assert time.perf_counter() - t0 < 60  # the package took minutes
    assert np.array_equal(np.sort(np.concatenate([va for _, va in folds])), np.arange(n))
    sizes = [len(va) for _, va in folds]
    assert max(sizes) - min(sizes) <= 0.05 * n
    for train, val in folds:
        assert not np.intersect1d(train, val).size and len(train) + len(val) == n
