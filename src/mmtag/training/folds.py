"""K folds stratified on every label at once: iterative stratification (Sechidis et al., ECML
PKDD 2011) exactly as the `iterative-stratification` package's MultilabelStratifiedKFold draws
them (the same folds for the same seed), in time linear in rows × labels.

The package recounts every label over every unassigned row each time it picks the next label:
rows × labels² in all, which is minutes at 10,000 labels (issue 29). Here the counts are kept
up to date as rows are assigned, and each label's rows are listed once. Every other step, and
every draw of the random stream, is the package's, in its order; tests/training/test_folds.py
checks the folds against it.

Grouped (`groups`): the same algorithm over groups of rows that must stay together (rows sharing
an image or a caption, `data.groups`): a group carries its rows' label counts and its size, as
a multi-row item of iterative stratification; groups of one row each give the ungrouped folds.
"""
from __future__ import annotations

import numpy as np


def stratified_folds(y: np.ndarray, k: int, seed: int,
                     groups: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, validation rows) of each of `k` folds of the label matrix `y` (N, C), as
    MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split does; with
    `groups` (each row's group id, 0..G-1), no group on both sides of a fold."""
    labels = np.asarray(y, dtype=bool)
    if groups is None:
        counts, sizes, of = labels.astype(np.int64), np.ones(len(labels), dtype=np.int64), None
    else:
        of = np.asarray(groups, dtype=np.int64)
        n_groups = int(of.max()) + 1 if len(of) else 0
        counts = np.zeros((n_groups, labels.shape[1]), dtype=np.int64)
        np.add.at(counts, of, labels.astype(np.int64))
        sizes = np.bincount(of, minlength=n_groups).astype(np.int64)
    n = len(counts)
    if k > n:
        items = "samples" if groups is None else "groups of rows"
        raise ValueError(f"cannot have number of splits n_splits={k} greater than the number "
                         f"of {items}: n_{items.split()[0]}={n}")
    rng = np.random.RandomState(seed)
    order = np.arange(n)
    rng.shuffle(order)
    fold_of = _assign(counts[order], sizes[order], k, rng)[np.argsort(order)]
    if of is not None:
        fold_of = fold_of[of]
    return [(np.flatnonzero(fold_of != i), np.flatnonzero(fold_of == i)) for i in range(k)]


def _assign(counts: np.ndarray, sizes: np.ndarray, k: int, rng: np.random.RandomState) -> np.ndarray:
    """The fold of each (shuffled) item: the package's IterativeStratification, where an item
    (a row, or a group of rows) carries `counts` of each label and `sizes` rows."""
    labels = counts > 0
    n = len(labels)
    share = np.asarray([1 / k] * k)
    fold_of = np.zeros(n, dtype=int)
    wanted = share * sizes.sum()  # rows each fold still wants
    wanted_of_label = np.outer(share, counts.sum(axis=0))  # (k, C): of each label
    left = labels.sum(axis=0)  # each label's unassigned items
    unassigned = np.ones(n, dtype=bool)
    n_unassigned = n
    rows_by_label, labels_by_row = _incidence(labels)
    while n_unassigned:
        if not left.any():  # only items without labels remain: spread them evenly
            for row in np.flatnonzero(unassigned):
                fold = _pick(np.flatnonzero(wanted == wanted.max()), rng)
                fold_of[row] = fold
                wanted[fold] -= sizes[row]
            break
        # the label with the fewest (but at least one) unassigned rows, ties drawn at random
        fewest = np.flatnonzero(left == left[left > 0].min())
        label = _pick(fewest, rng)
        rows = rows_by_label[label]
        for row in rows[unassigned[rows]]:
            # the fold wanting most of this label, then most rows, then drawn at random
            for_label = wanted_of_label[:, label]
            folds = np.flatnonzero(for_label == for_label.max())
            if len(folds) > 1:
                most = np.flatnonzero(wanted[folds] == wanted[folds].max())
                fold = folds[most[0]] if len(most) == 1 else folds[most][rng.choice(len(most))]
            else:
                fold = folds[0]
            fold_of[row] = fold
            unassigned[row] = False
            n_unassigned -= 1
            wanted_of_label[fold, labels_by_row[row]] -= counts[row, labels_by_row[row]]
            wanted[fold] -= sizes[row]
            left[labels_by_row[row]] -= 1
    return fold_of


def _pick(candidates: np.ndarray, rng: np.random.RandomState) -> int:
    """The one candidate, or one drawn at random (a draw only when there is a choice)."""
    return int(candidates[0] if len(candidates) == 1 else candidates[rng.choice(len(candidates))])


def _incidence(labels: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each label's rows and each row's labels, ascending."""
    rows, cols = np.nonzero(labels)  # row-major: columns ascending within a row
    by_col = np.argsort(cols, kind="stable")  # rows ascending within a column
    col_starts = np.searchsorted(cols[by_col], np.arange(labels.shape[1] + 1))
    row_starts = np.searchsorted(rows, np.arange(len(labels) + 1))
    rows_by_col = rows[by_col]
    rows_by_label = [rows_by_col[a:b] for a, b in zip(col_starts[:-1], col_starts[1:])]
    labels_by_row = [cols[a:b] for a, b in zip(row_starts[:-1], row_starts[1:])]
    return rows_by_label, labels_by_row
