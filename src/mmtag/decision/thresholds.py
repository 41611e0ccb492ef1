"""Turning scores into label sets: thresholds tuned on validation, and the top-1 fallback.

Every rule costs time and memory linear in rows × labels (issue 29: thousands of labels). A
curve over the threshold grid is read off each score's grid bin (how many thresholds it
reaches) and cumulative counts, never off one decision matrix per candidate threshold; the
work is done in blocks of rows, so memory stays bounded whatever the number of labels.

Each rule tunes for the run's metric (`--metric`, registries.METRICS): sample-F1 by default,
or micro- or macro-F1, whose curves come from each class's counts per threshold (top-1
fallback included) in the same linear time.
"""
from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np

from .. import registries
from ..config import AT_LEAST_1
from ..errors import MmtagError
from ..progress import duration, line
from .expected_f1 import decide_expected_f1, expected_f1_work
from .metrics import class_f1, macro_of_counts, metric_title, samples_f1

GRID = np.round(np.arange(0.05, 0.951, 0.01), 2)
log = logging.getLogger(__name__)

# Scores (rows × labels) binned at once: bounds the binned computations' memory (about 20 bytes
# per score) whatever the number of labels.
BLOCK = 1 << 21

SAMPLES = "samples"  # the default metric (`--metric`): sample-F1, Kaggle's "Mean F1"


@dataclass
class Scores:
    """A head's label probabilities and, for late fusion, each branch's own probabilities.

    `union` says the decision is the union of each branch's thresholded label set (the `union`
    fusion head) rather than a threshold on `probs`.
    """

    probs: np.ndarray  # (N, C)
    branches: dict[str, np.ndarray] = field(default_factory=dict)
    union: bool = False

    def subset(self, index: np.ndarray) -> "Scores":
        """The scores of rows `index` (a fold's, say)."""
        return Scores(self.probs[index], {k: v[index] for k, v in self.branches.items()}, self.union)


@dataclass
class Thresholds:
    """One threshold per class (a global threshold is the same value repeated); union decisions
    carry one such vector per branch in `branches`."""

    mode: str
    values: np.ndarray  # (C,)
    branches: dict[str, np.ndarray] = field(default_factory=dict)
    # `auto` only: each candidate rule's sample-F1 on validation rows it was not tuned on, the
    # evidence `mode` was chosen on (kept in thresholds.json for the record)
    chosen_from: dict[str, float] = field(default_factory=dict)
    # `auto` only: the candidates it could not afford on these scores, and why (AUTO_BUDGET)
    skipped: dict[str, str] = field(default_factory=dict)
    # the metric the rule was tuned (and `auto` chose it) for (`--metric`); thresholds.json
    # names it when it is not the default sample-F1, so a record written before it was kept
    # reads as what it was
    metric: str = SAMPLES

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"mode": self.mode, "values": [float(v) for v in self.values]}
        if self.branches:
            out["branches"] = {k: [float(x) for x in v] for k, v in self.branches.items()}
        if self.chosen_from:
            out["chosen_from"] = {k: round(float(v), 6) for k, v in self.chosen_from.items()}
        if self.skipped:
            out["skipped"] = dict(self.skipped)
        if self.metric != SAMPLES:
            out["metric"] = self.metric
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> "Thresholds":
        branches = raw.get("branches") or {}
        chosen = raw.get("chosen_from") or {}
        skipped = raw.get("skipped") or {}
        return cls(mode=str(raw["mode"]), values=np.asarray(raw["values"], dtype=np.float32),
                   branches={str(k): np.asarray(v, dtype=np.float32)
                             for k, v in branches.items()},  # type: ignore[union-attr]
                   chosen_from={str(k): float(v) for k, v in chosen.items()},  # type: ignore[union-attr]
                   skipped={str(k): str(v) for k, v in skipped.items()},  # type: ignore[union-attr]
                   metric=str(raw.get("metric") or SAMPLES))

    @classmethod
    def constant(cls, value: float, num_classes: int) -> "Thresholds":
        return cls(mode="global", values=np.full(num_classes, value, dtype=np.float32))


def decide(probs: np.ndarray | Scores, thresholds: Thresholds | np.ndarray | float, *,
           top_k: int | None = None) -> np.ndarray:
    """Scores (N, C) → boolean label matrix; a row with no label above threshold gets its top-1.

    Every item carries at least one label, so an empty prediction is always wrong; the top-1
    label is the best single guess. For union decisions (`Scores.union` with per-branch
    thresholds) each branch's label set is thresholded on its own and the sets are united.
    `top_k` caps each row's labels: the k best-scoring of those chosen (see `keep_top_k`).
    """
    fused = probs.probs if isinstance(probs, Scores) else probs
    return keep_top_k(_decide(probs, thresholds), fused, top_k)


def _decide(probs: np.ndarray | Scores, thresholds: Thresholds | np.ndarray | float) -> np.ndarray:
    if isinstance(thresholds, Thresholds) and thresholds.mode == EXPECTED_F1:
        # no threshold: each item's expected-F1-maximising label set (`expected_f1`)
        return decide_expected_f1(probs.probs if isinstance(probs, Scores) else probs, _tick)
    if isinstance(probs, Scores):
        if probs.union and isinstance(thresholds, Thresholds) and thresholds.branches:
            pred = np.zeros(probs.probs.shape, dtype=bool)
            for name, t in thresholds.branches.items():
                pred |= probs.branches[name] >= t.astype(probs.branches[name].dtype)
            return _top1_fallback(pred, probs.probs)
        probs = probs.probs
    t = thresholds.values if isinstance(thresholds, Thresholds) else thresholds
    return _top1_fallback(probs >= np.asarray(t, dtype=probs.dtype), probs)


def _top1_fallback(pred: np.ndarray, probs: np.ndarray) -> np.ndarray:
    empty = ~pred.any(axis=1)
    if empty.any():
        rows = np.flatnonzero(empty)
        pred[rows, probs[rows].argmax(axis=1)] = True
    return pred


def keep_top_k(pred: np.ndarray, probs: np.ndarray, k: int | None) -> np.ndarray:
    """At most `k` labels per row: of the labels `pred` chose, those with the k highest scores
    (ties: the lower column). A cap, never an addition: a row keeps every label it had when it
    had k or fewer, so the top-1 fallback is untouched. None: no cap."""
    if k is None:
        return pred
    check_top_k(k, "top_k")
    if pred.shape[1] <= k:
        return pred
    chosen = np.where(pred, probs, -np.inf)
    best = np.argsort(-chosen, axis=1, kind="stable")[:, :k]
    out = np.zeros_like(pred)
    np.put_along_axis(out, best, True, axis=1)
    return out & pred


def check_top_k(k: object, name: str) -> None:
    """`k` is a valid cap on labels per row (the config's AT_LEAST_1, declared once), else a
    one-line error naming the option as the caller knows it (`--top-k`, `top_k`)."""
    problem = AT_LEAST_1.problem(int(k) if isinstance(k, np.integer) else k)
    if problem:
        raise MmtagError(f"{name} {problem}")


def tune_global(probs: np.ndarray, y_true: np.ndarray, grid: np.ndarray = GRID, *,
                metric: str = SAMPLES) -> Thresholds:
    """The single threshold (on `grid`) maximising validation `metric` (sample-F1 unless told),
    top-1 fallback included.

    Ties go to the threshold closest to 0.5, so a flat curve does not drift to an extreme.
    """
    thresholds = Thresholds.constant(
        _best_near_half(grid, f1_by_threshold(probs, y_true, grid, metric=metric)), probs.shape[1])
    thresholds.metric = metric
    return thresholds


def f1_by_threshold(probs: np.ndarray, y_true: np.ndarray, grid: np.ndarray = GRID, *,
                    metric: str = SAMPLES) -> np.ndarray:
    """(G,) validation `metric` (sample-F1 unless told) with one global threshold at each grid
    value (top-1 fallback included): the curve `tune_global` maximises, for plotting.

    Each value equals METRICS[metric](y, decide(probs, t)) to the last bit. Sample-F1: the same
    per-row F1s averaged the same way, from each row's label and hit counts per threshold;
    micro- and macro-F1: from each class's counts per threshold (`class_counts_by_threshold`);
    any other registered metric is scored on each threshold's decisions."""
    if metric != SAMPLES:
        return _metric_curve(probs, y_true, np.asarray(grid), metric)
    grid = np.asarray(grid)
    order = np.argsort(grid, kind="stable")
    cut = grid[order].astype(probs.dtype)  # as `decide` compares
    truth = y_true.astype(bool)
    n_pred, tp = _counts_by_threshold(probs, truth, cut)
    empty = n_pred == 0  # the top-1 fallback's rows: one label, right or wrong
    tp = np.where(empty, _top1_hits(probs, y_true)[:, None], tp)
    n_pred = np.where(empty, 1, n_pred)
    f1 = np.ascontiguousarray((2.0 * tp / (truth.sum(axis=1)[:, None] + n_pred)).T)  # (G, N)
    curve = np.array([row.mean() if len(row) else 0.0 for row in f1])  # as samples_f1 averages
    out = np.empty_like(curve)
    out[order] = curve
    return out


def metric_score(metric: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """The function (y_true, y_pred) -> float of a metric of registries.METRICS (`--metric`)."""
    try:
        return registries.METRICS[metric]
    except KeyError:
        raise MmtagError(f"unknown metric '{metric}'; available: "
                         f"{', '.join(registries.METRICS)}") from None


COUNTED = ("micro", "macro")  # the metrics whose curves are read off per-class counts


def _metric_curve(probs: np.ndarray, y_true: np.ndarray, grid: np.ndarray,
                  metric: str) -> np.ndarray:
    """`f1_by_threshold` of a metric other than sample-F1, in `grid`'s order."""
    score = metric_score(metric)
    if metric not in COUNTED:  # a plugin's: each threshold's decisions, scored
        return np.array([score(y_true, decide(probs, float(t))) for t in grid])
    order = np.argsort(grid, kind="stable")
    cut = grid[order].astype(probs.dtype)  # as `decide` compares
    tp, n_pred = class_counts_by_threshold(probs, y_true.astype(bool), cut)
    curve = metric_of_counts(metric, tp, n_pred, y_true.astype(bool).sum(axis=0))
    out = np.empty_like(curve)
    out[order] = curve
    return out


def metric_of_counts(metric: str, tp: np.ndarray, n_pred: np.ndarray,
                     n_true: np.ndarray) -> np.ndarray:
    """Micro- or macro-F1 at every point of a grid, from per-class counts: `tp` and `n_pred`
    (C, *points), `n_true` (C,). Each value is what micro_f1 / macro_f1 (scikit-learn's) give
    for the decisions with those counts, to the last bit: the same integers, divided and
    averaged the same way."""
    if metric == "micro":
        denom = n_true.sum() + n_pred.sum(axis=0)
        return np.divide(2.0 * tp.sum(axis=0), denom, out=np.zeros(denom.shape), where=denom > 0)
    points = tp.shape[1:]
    flat_tp, flat_pred = tp.reshape(len(tp), -1), n_pred.reshape(len(n_pred), -1)
    out = np.array([macro_of_counts(flat_tp[:, i], n_true, flat_pred[:, i])
                    for i in range(flat_tp.shape[1])])
    return out.reshape(points)


def _class_histograms(probs: np.ndarray, truth: np.ndarray, cut: np.ndarray, *,
                      fallback: bool = False) -> tuple[np.ndarray, ...]:
    """(C, G+1) how many of each class's scores fall in each bin of the ascending `cut` (bin b:
    reaching b thresholds), and how many of them are true. With `fallback`, also (C, G+1) the
    rows whose top-1 label is that class by their highest bin, and how many of those top-1
    labels are true: at threshold index j the fallback gives its top-1 label to each row whose
    highest bin is at most j (no score reaches the threshold)."""
    n, c = probs.shape
    g = len(cut)
    size = c * (g + 1)
    counts = np.zeros(size, dtype=np.int64)
    positives = np.zeros(size, dtype=np.int64)
    tops = np.zeros(size, dtype=np.int64)
    top_hits = np.zeros(size, dtype=np.int64)
    for rows in _row_blocks(n, c):
        p, t = probs[rows], truth[rows]
        r, k = np.nonzero(p >= cut[0])
        key = k * (g + 1) + _bins(p[r, k], cut)
        counts += np.bincount(key, minlength=size)
        positives += np.bincount(key[t[r, k]], minlength=size)
        if fallback:
            top = p.argmax(axis=1)  # as `decide` falls back
            at = np.arange(len(p))
            top_key = top * (g + 1) + _bins(p[at, top], cut)
            tops += np.bincount(top_key, minlength=size)
            top_hits += np.bincount(top_key[t[at, top]], minlength=size)
    counts, positives = counts.reshape(c, g + 1), positives.reshape(c, g + 1)
    counts[:, 0] = n - counts[:, 1:].sum(axis=1)  # below every threshold
    positives[:, 0] = truth.sum(axis=0) - positives[:, 1:].sum(axis=1)
    if not fallback:
        return counts, positives
    return counts, positives, tops.reshape(c, g + 1), top_hits.reshape(c, g + 1)


def class_counts_by_threshold(probs: np.ndarray, truth: np.ndarray,
                              cut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, G) each class's true positives and predicted labels at each threshold of the
    ascending `cut`, the top-1 fallback included: the decisions of `decide(probs, t)` counted,
    in time linear in rows × labels (one histogram of each class's bins and one of each row's
    top-1 label by its highest bin)."""
    g = len(cut)
    counts, positives, tops, top_hits = _class_histograms(probs, truth, cut, fallback=True)
    n_pred = np.cumsum(counts[:, :0:-1], axis=1)[:, ::-1] + np.cumsum(tops, axis=1)[:, :g]
    tp = np.cumsum(positives[:, :0:-1], axis=1)[:, ::-1] + np.cumsum(top_hits, axis=1)[:, :g]
    return tp, n_pred


def _row_blocks(n: int, c: int) -> Iterator[slice]:
    """Slices of rows holding about BLOCK scores each."""
    step = max(1, BLOCK // max(1, c))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _bins(p: np.ndarray, cut: np.ndarray) -> np.ndarray:
    """How many of the ascending thresholds `cut` each score reaches (p >= t): a score is
    predicted at threshold index j exactly when its bin is above j."""
    return np.searchsorted(cut, p, side="right")


def _counts_by_threshold(probs: np.ndarray, truth: np.ndarray,
                         cut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, G) labels predicted and true labels predicted in each row at each threshold of the
    ascending `cut` (before the fallback): a histogram of each row's bins, summed from the top."""
    n, g = len(probs), len(cut)
    n_pred = np.empty((n, g), dtype=np.int64)
    tp = np.empty((n, g), dtype=np.int64)
    for rows in _row_blocks(n, probs.shape[1]):
        p = probs[rows]
        r, c = np.nonzero(p >= cut[0])  # the rest reach no threshold
        key = r * (g + 1) + _bins(p[r, c], cut)
        size = len(p) * (g + 1)
        counts = np.bincount(key, minlength=size).reshape(len(p), g + 1)
        hits = np.bincount(key[truth[rows][r, c]], minlength=size).reshape(len(p), g + 1)
        n_pred[rows] = np.cumsum(counts[:, :0:-1], axis=1)[:, ::-1]  # bins j+1..G
        tp[rows] = np.cumsum(hits[:, :0:-1], axis=1)[:, ::-1]
    return n_pred, tp


def _best_near_half(grid: np.ndarray, scores: np.ndarray, *, maximise: bool = True) -> float:
    """The grid value with the best score; ties go to the value closest to 0.5, so a flat
    stretch of the curve does not drift the threshold to an extreme."""
    best = scores.max() if maximise else scores.min()
    candidates = grid[np.isclose(scores, best, rtol=0, atol=1e-12)]
    return float(candidates[np.argmin(np.abs(candidates - 0.5))])


def _best_near_half_rows(grid: np.ndarray, scores: np.ndarray, *,
                         maximise: bool = True) -> np.ndarray:
    """`_best_near_half` for each row of `scores` (R, G) at once: the chosen grid indices (R,)."""
    best = scores.max(axis=1, keepdims=True) if maximise else scores.min(axis=1, keepdims=True)
    near = np.abs(scores - best) <= 1e-12
    return np.where(near, np.abs(grid - 0.5)[None, :], np.inf).argmin(axis=1)


def _top1_hits(probs: np.ndarray, y_true: np.ndarray) -> np.ndarray:
    """(N,) whether each row's top-1 label is correct: what the fallback scores on empty rows."""
    top1 = probs.argmax(axis=1)
    return y_true[np.arange(len(y_true)), top1].astype(bool)


def tune_per_class(probs: np.ndarray, y_true: np.ndarray, grid: np.ndarray = GRID,
                   max_sweeps: int = 10, *, metric: str = SAMPLES) -> Thresholds:
    """Per-class thresholds tuned for validation `metric` (sample-F1 unless told).

    Classes are scored on different scales (a rare label's positives may never reach the global
    threshold), so one shared value can be far from each class's best. More thresholds fit the
    validation set more closely, so this wants a reasonably large validation split.

    samples, micro: coordinate ascent on the metric, fallback included. Starting from the tuned
    global threshold and only accepting strict improvements guarantees a validation score no
    worse than global; sweeps stop once a full pass changes nothing. Linear in rows × labels per
    sweep (`_CoordinateAscent`, `_MicroAscent`), however many labels.

    macro: each class's own F1-maximising threshold (`_per_class_macro`): macro-F1 averages
    the classes' F1s, which are independent but for the fallback, ignored while choosing.
    Should the fallback make the result score below the tuned global threshold on these rows,
    the global threshold is kept for every class, so it is never worse than global either.
    Another registered metric has no per-class rule: a one-line error says so.
    """
    # Candidates as they will be stored (float32), so the stored thresholds reproduce the score.
    grid = np.sort(np.asarray(grid).astype(np.float32))
    start = tune_global(probs, y_true, grid, metric=metric).values
    if metric == SAMPLES:
        values = _CoordinateAscent(probs, y_true, grid, start).run(max_sweeps)
    elif metric == "micro":
        values = _MicroAscent(probs, y_true, grid, start).run(max_sweeps)
    elif metric == "macro":
        values = _per_class_macro(probs, y_true, grid, start)
    else:
        metric_score(metric)  # an unknown name: the error that lists the metrics
        raise MmtagError(f"the per-class decision rule tunes for {', '.join((SAMPLES,) + COUNTED)}, "
                         f"not '{metric}'")
    return Thresholds(mode="per-class", values=values, metric=metric)


def _per_class_macro(probs: np.ndarray, y_true: np.ndarray, grid: np.ndarray,
                     start: np.ndarray) -> np.ndarray:
    """Each class's threshold maximising its own F1 (ties nearest 0.5), fallback ignored; a
    class with no positive row, whose F1 is 0 wherever it is predicted and which macro-F1
    leaves out where it is not, gets the threshold predicting it least. Kept only if its
    macro-F1 with the fallback is at least that of `start` (the tuned global threshold)."""
    truth = y_true.astype(bool)
    counts, positives = _class_histograms(probs, truth, grid.astype(probs.dtype))
    n_pred = np.cumsum(counts[:, :0:-1], axis=1)[:, ::-1]  # scores in bins above j
    tp = np.cumsum(positives[:, :0:-1], axis=1)[:, ::-1]
    n_true = truth.sum(axis=0)
    score = np.where(n_true[:, None] > 0, class_f1(tp, n_true[:, None], n_pred), -n_pred)
    values = grid[_best_near_half_rows(grid, score.astype(float))].astype(np.float32)
    score_of = metric_score("macro")
    if score_of(truth, decide(probs, start)) > score_of(truth, decide(probs, values)):
        return start.astype(np.float32)
    return values


class _CoordinateAscent:
    """Coordinate ascent over per-class thresholds, done on the scores that matter.

    Moving class c's threshold along the grid only changes the decisions of its *active* scores
    (those between the grid's ends), and each such row's F1 takes one of two values, with c on
    or off, given the row's other labels. So c's whole curve is two sums per grid bin of its
    active rows (`_gains`): a class costs its active scores, not rows × grid. Classes whose
    active rows do not overlap cannot change each other's curves, so consecutive such classes
    form a *block*, evaluated at once with the result the one-class-at-a-time order gives; a
    block none of whose rows changed since it was last evaluated cannot improve and is passed
    over. The choices are those of the textbook loop (each class in turn: its best grid value
    if it beats the current sample-F1 by more than 1e-12, ties to the value nearest 0.5).
    """

    def __init__(self, probs: np.ndarray, y_true: np.ndarray, grid: np.ndarray,
                 start: np.ndarray) -> None:
        n, c = probs.shape
        self.n, self.grid = n, grid
        cut = grid.astype(probs.dtype)  # as `decide` compares
        truth = y_true.astype(bool)
        self.j = np.searchsorted(grid, start.astype(np.float32))  # each class's threshold index
        self.n_true = truth.sum(axis=1)
        self.hits = _top1_hits(probs, y_true)
        self.tp = np.zeros(n, dtype=np.int64)  # each row's counts at the current thresholds
        self.n_pred = np.zeros(n, dtype=np.int64)
        rows_, cls_, bins_, true_ = [], [], [], []
        for rows in _row_blocks(n, c):
            p, t = probs[rows], truth[rows]
            on = p >= cut[self.j][None, :]
            self.tp[rows] = (on & t).sum(axis=1)
            self.n_pred[rows] = on.sum(axis=1)
            r, k = np.nonzero((p >= cut[0]) & (p < cut[-1]))
            rows_.append((r + rows.start).astype(np.int32))
            cls_.append(k.astype(np.int32))
            bins_.append(_bins(p[r, k], cut).astype(np.int16))
            true_.append(t[r, k])
        by_class = np.argsort(np.concatenate(cls_), kind="stable")  # rows ascending within a class
        self.cls = np.concatenate(cls_)[by_class]
        self.row = np.concatenate(rows_)[by_class]
        self.bin = np.concatenate(bins_)[by_class]
        self.true = np.concatenate(true_)[by_class]
        self.blocks = self._blocks(np.searchsorted(self.cls, np.arange(c + 1)))

    def _blocks(self, ptr: np.ndarray) -> list[tuple[int, int]]:
        """Entry ranges of consecutive classes with pairwise disjoint active rows."""
        owner = np.full(self.n, -1)
        starts: list[int] = []
        for k in np.flatnonzero(np.diff(ptr) > 0):
            rows = self.row[ptr[k]:ptr[k + 1]]
            if not starts or (owner[rows] == len(starts) - 1).any():
                starts.append(int(ptr[k]))
            owner[rows] = len(starts) - 1
        return list(zip(starts, starts[1:] + [len(self.row)]))

    def run(self, max_sweeps: int) -> np.ndarray:
        changed_at = np.zeros(self.n, dtype=np.int64)  # the step that last changed each row
        seen = np.full(len(self.blocks), -1)  # the step each block was last evaluated at
        step = 0
        for sweep in range(max_sweeps):
            moved = 0
            for b, (s, e) in enumerate(self.blocks):
                if seen[b] >= 0 and changed_at[self.row[s:e]].max() <= seen[b]:
                    continue  # nothing it reads changed: it cannot improve
                step += 1
                seen[b] = step
                moved += self._improve(s, e, changed_at, step)
            _tick(f"per-class: sweep {sweep + 1}, {moved} threshold(s) moved")
            if not moved:
                break
        return self.grid[self.j].astype(np.float32)

    def _improve(self, s: int, e: int, changed_at: np.ndarray, step: int) -> int:
        """Each class of the block moved to its best grid value where that gains; how many moved."""
        cls, rows, bins, true = self.cls[s:e], self.row[s:e], self.bin[s:e], self.true[s:e]
        classes, local = np.unique(cls, return_inverse=True)
        on = bins > self.j[cls]
        gains = self._gains(rows, bins, true, on, local, len(classes))
        better = gains.max(axis=1) > 1e-12
        if not better.any():
            return 0
        chosen = _best_near_half_rows(self.grid, gains[better])
        new_j = self.j[classes].copy()
        new_j[better] = chosen
        now = bins > new_j[local]
        delta = now.astype(np.int64) - on
        self.tp[rows] += delta * true
        self.n_pred[rows] += delta
        changed_at[rows[delta != 0]] = step
        self.j[classes] = new_j
        return int(better.sum())

    def _gains(self, rows: np.ndarray, bins: np.ndarray, true: np.ndarray, on: np.ndarray,
               local: np.ndarray, n_classes: int) -> np.ndarray:
        """(classes, G) change of sample-F1 when each class alone moves to each grid value."""
        g = len(self.grid)
        tp_other = self.tp[rows] - (on & true)
        n_other = self.n_pred[rows] - on
        n_true = self.n_true[rows]
        f_on = 2.0 * (tp_other + true) / (n_true + n_other + 1)
        empty = n_other == 0  # off, the row falls back on its top-1 label
        f_off = 2.0 * np.where(empty, self.hits[rows], tp_other) / (n_true + np.where(empty, 1, n_other))
        f_now = np.where(on, f_on, f_off)
        key = local * (g + 1) + bins
        size = n_classes * (g + 1)
        d_on = np.bincount(key, f_on - f_now, minlength=size).reshape(n_classes, g + 1)
        d_off = np.bincount(key, f_off - f_now, minlength=size).reshape(n_classes, g + 1)
        # at grid index j the rows of bins above j are on, the others off
        gained = np.cumsum(d_on[:, :0:-1], axis=1)[:, ::-1] + np.cumsum(d_off, axis=1)[:, :g]
        return gained / self.n


class _MicroAscent(_CoordinateAscent):
    """Coordinate ascent over per-class thresholds on validation micro-F1, fallback included.

    Micro-F1 is 2·TP / (true + predicted labels) over all decisions. Moving class c's threshold
    changes the counts of its active rows only, each row by one of two amounts (c on or off,
    the row falling back on its top-1 label when c was its only label), so c's whole curve is
    two count sums per grid bin of its active rows, and the ratio at each grid value. The
    totals couple every class, so classes are visited one at a time (each class costs its
    active scores and the grid); a class moves to its best grid value if that beats the current
    micro-F1 by more than 1e-12 (ties to the value nearest 0.5)."""

    def run(self, max_sweeps: int) -> np.ndarray:
        g = len(self.grid)
        empty = self.n_pred == 0
        tp_total = int(np.where(empty, self.hits, self.tp).sum())
        pred_total = int(np.where(empty, 1, self.n_pred).sum())
        true_total = int(self.n_true.sum())
        if true_total + pred_total == 0:
            return self.grid[self.j].astype(np.float32)
        current = 2.0 * tp_total / (true_total + pred_total)
        ptr = np.searchsorted(self.cls, np.arange(len(self.j) + 1))
        classes = np.flatnonzero(np.diff(ptr) > 0)
        for sweep in range(max_sweeps):
            moved = 0
            for k in classes:
                s, e = ptr[k], ptr[k + 1]
                rows, bins, true = self.row[s:e], self.bin[s:e], self.true[s:e]
                on = bins > self.j[k]
                tp_other = self.tp[rows] - (on & true)
                n_other = self.n_pred[rows] - on
                alone = n_other == 0  # off, the row falls back on its top-1 label
                tp_off = np.where(alone, self.hits[rows], tp_other)
                pred_off = np.where(alone, 1, n_other)
                tp_on, pred_on = tp_other + true, n_other + 1
                tp_now, pred_now = np.where(on, tp_on, tp_off), np.where(on, pred_on, pred_off)
                d_tp = _on_off_sums(bins, tp_on - tp_now, tp_off - tp_now, g)
                d_pred = _on_off_sums(bins, pred_on - pred_now, pred_off - pred_now, g)
                curve = 2.0 * (tp_total + d_tp) / (true_total + pred_total + d_pred)
                if curve.max() <= current + 1e-12:
                    continue
                best = int(_best_near_half_rows(self.grid, curve[None, :])[0])
                delta = (bins > best).astype(np.int64) - on
                self.tp[rows] += delta * true
                self.n_pred[rows] += delta
                self.j[k] = best
                tp_total += int(d_tp[best])
                pred_total += int(d_pred[best])
                current = 2.0 * tp_total / (true_total + pred_total)
                moved += 1
            _tick(f"per-class (micro): sweep {sweep + 1}, {moved} threshold(s) moved")
            if not moved:
                break
        return self.grid[self.j].astype(np.float32)


def _on_off_sums(bins: np.ndarray, on: np.ndarray, off: np.ndarray, g: int) -> np.ndarray:
    """(G,) integer sums at each grid index j of `on` over the entries of bins above j and of
    `off` over the others (the entries of one class: on at j exactly when their bin is above j)."""
    d_on = np.bincount(bins, on, minlength=g + 1)
    d_off = np.bincount(bins, off, minlength=g + 1)
    total = np.cumsum(d_on[:0:-1])[::-1] + np.cumsum(d_off)[:g]
    return np.rint(total).astype(np.int64)


def tune_balanced(probs: np.ndarray, y_true: np.ndarray, grid: np.ndarray = GRID, *,
                  metric: str = SAMPLES) -> Thresholds:
    """Per-class thresholds where validation false positives ≈ false negatives (min |FP - FN|);
    no metric is optimised (`metric` is recorded only).

    Equal error counts make the predicted label count match the true one per class, which
    keeps label frequencies calibrated without optimising the score on the validation set
    directly. Each class is chosen on its own (fallback ignored: it couples classes and only
    touches rows with nothing above threshold); `decide` still applies the fallback. The
    counts at every grid value come from one histogram of each class's bins.
    """
    truth = y_true.astype(bool)
    grid = np.sort(np.asarray(grid).astype(np.float32))  # as stored, so decide() reproduces the counts
    g = len(grid)
    counts, positives = _class_histograms(probs, truth, grid.astype(probs.dtype))
    fp = np.cumsum((counts - positives)[:, :0:-1], axis=1)[:, ::-1]  # negatives in bins above j
    fn = np.cumsum(positives, axis=1)[:, :g]  # positives in bins up to j
    values = grid[_best_near_half_rows(grid, np.abs(fp - fn).astype(float), maximise=False)]
    return Thresholds(mode="balanced", values=values.astype(np.float32), metric=metric)


EXPECTED_F1 = "gfm"  # the decision rule that tunes nothing (see `expected_f1`)


def expected_f1_rule(probs: np.ndarray, y_true: np.ndarray, *, metric: str = SAMPLES) -> Thresholds:
    """The expected-F1 decision per item: nothing is fitted to the validation rows (whatever the
    `metric`, recorded only: it maximises each item's expected F1). Its record keeps 0.5 per
    class only so every decision record has the same shape; `decide` ignores it."""
    return Thresholds(mode=EXPECTED_F1, values=np.full(probs.shape[1], 0.5, dtype=np.float32),
                      metric=metric)


# Below this many validation rows, the epoch and threshold chosen on them are noise: on coco-real,
# a 195-row split overstated held-out sample-F1 by 1-3 points and ranked the heads wrongly.
FEW_VALIDATION_ROWS = 1000

AUTO = "auto"
AUTO_CANDIDATES = ("global", "per-class", EXPECTED_F1)  # global first: the one kept on doubt
AUTO_FOLDS = 5

# The most work `auto` spends on one candidate rule (its held parts and its final fit), in the
# units of `auto_work` (score-steps, about a nanosecond of one core each, so about half a minute):
# a candidate estimated above it is not tried, which a line says and the record keeps
# (`Thresholds.skipped`); `global` is linear and always tried. Every rule is linear in rows ×
# labels, so this only bounds the constant: the 18-label data sets stay far below it at 30,000
# rows, and 10,000 labels × 2,000 rows tries every candidate (docs/results.md).
AUTO_BUDGET = 3e10


def auto_work(rule: str, probs: np.ndarray) -> float:
    """What `auto` would spend on `rule` for these scores, estimated from them before any of it
    is done, in score-steps.

    per-class: its fits (one per held part and the final one) visit each active score (between
    the grid's ends) for several sweeps, and each class with one at a fixed cost. gfm: tunes
    nothing; its decisions of the held parts and of every row (`expected_f1_work`) twice."""
    n, c = probs.shape
    if rule == "per-class":
        cut = GRID.astype(np.float32).astype(probs.dtype)
        active, classes = 0, np.zeros(c, dtype=bool)
        for rows in _row_blocks(n, c):
            inside = (probs[rows] >= cut[0]) & (probs[rows] < cut[-1])
            active += int(np.count_nonzero(inside))
            classes |= inside.any(axis=0)
        return (AUTO_FOLDS + 1) * (100.0 * active + 5e4 * int(classes.sum()))
    if rule == EXPECTED_F1:
        return 2 * expected_f1_work(probs)
    return 20.0 * n * c


def tune_auto(probs: np.ndarray, y_true: np.ndarray,
              skip: dict[str, str] | None = None, *, metric: str = SAMPLES) -> Thresholds:
    """The decision rule chosen on validation rows it is not tuned on, then tuned on them all.

    Each candidate of AUTO_CANDIDATES is tuned (for `metric`) on four fifths of the rows
    (seeded folds) and scored on the fifth with `metric` (sample-F1 unless told). `global` is
    kept unless another rule beats it by more than one standard
    error of their paired per-fold difference (the one-standard-error rule, Hastie et al., ESL
    §7.10): no rule wins everywhere (gfm needs calibrated probabilities, which a large training
    set gives and a small one may not), and a small validation set cannot tell close rules
    apart; below FEW_VALIDATION_ROWS rows it is not asked to, and `global` is used. The chosen
    rule's record names it (`mode`), so prediction and export apply it as if
    it had been asked for; `chosen_from` keeps each candidate's held-part figure (of the
    record's `metric`). A candidate whose estimated work (`auto_work`) exceeds AUTO_BUDGET is
    not tried: `skipped` says so.
    `skip` (rule: why), when given, is the set not tried instead of that estimate: a cross-fitted
    run's folds replay the model's choice among the candidates the model's rule tried, though
    four fifths of the rows would fit a budget all of them did not.
    """
    n = len(y_true)
    if n < FEW_VALIDATION_ROWS:
        # a fifth of so few rows cannot tell close rules apart (one process and two, differing
        # only in float order, chose global and per-class on 90 rows): the plain rule
        return tune_global(probs, y_true, metric=metric)
    score = samples_f1 if metric == SAMPLES else metric_score(metric)
    parts = np.array_split(np.random.default_rng(0).permutation(n), AUTO_FOLDS)
    splits = [(np.concatenate(parts[:i] + parts[i + 1:]), held) for i, held in enumerate(parts)]

    def held_part_f1(rule: str) -> np.ndarray:
        """The rule tuned on each split's other parts, scored on its held part."""
        scores = []
        for i, (rest, held) in enumerate(splits, 1):
            tuned = _run_tuner(TUNERS[rule], probs[rest], y_true[rest], metric)
            scores.append(score(y_true[held], decide(probs[held], tuned)))
            _tick(f"auto: {rule} {i}/{len(splits)} held parts")
        return np.array(scores)

    skipped = dict(skip) if skip is not None else {}
    for rule in AUTO_CANDIDATES[1:] if skip is None else ():
        work = auto_work(rule, probs)
        if rule == "per-class" and metric not in (SAMPLES,) + COUNTED:
            skipped[rule] = f"it tunes for {', '.join((SAMPLES,) + COUNTED)}, not {metric}"
        elif work > AUTO_BUDGET:
            skipped[rule] = (f"estimated work {work:.2g} > budget {AUTO_BUDGET:.2g} "
                             f"({probs.shape[1]} labels, {n} rows)")
    for rule, why in skipped.items():
        _say_once(f"skip {rule}", f"auto skips {rule}: {why}")
    held_f1 = {rule: held_part_f1(rule) for rule in AUTO_CANDIDATES if rule not in skipped}
    base = AUTO_CANDIDATES[0]
    chosen, best_gain = base, 0.0
    for rule in held_f1:
        if rule == base:
            continue
        diff = held_f1[rule] - held_f1[base]
        gain, stderr = float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))
        if gain > stderr and gain > best_gain:
            chosen, best_gain = rule, gain
    means = {rule: float(f.mean()) for rule, f in held_f1.items()}
    log.info("decision auto: %s (%s on held parts of %d validation rows: %s%s)", chosen,
             metric_title(metric), n, ", ".join(f"{r} {v:.4f}" for r, v in means.items()),
             "".join(f"; {r} skipped" for r in skipped))
    thresholds = _run_tuner(TUNERS[chosen], probs, y_true, metric)
    thresholds.chosen_from = means
    thresholds.skipped = skipped
    thresholds.metric = metric
    return thresholds


# ------------------------------------------------------------------------------- progress
# A decision step's lines come at most this often, so one that takes less says nothing.
PROGRESS_SECONDS = 5.0


@dataclass
class DecisionProgress:
    """What `reporting` reports under: a label, and `part`, the part of the step under way
    (the caller sets it, e.g. "fold 2/5's rule")."""

    label: str
    show: bool = True
    part: str = ""
    start: float = field(default_factory=time.perf_counter)
    last: float = field(default_factory=time.perf_counter)
    said: set[str] = field(default_factory=set)

    def say(self, message: str) -> None:
        self.last = time.perf_counter()
        self.said.add(message)
        where = f" ({self.part})" if self.part else ""
        line(f"deciding: {self.label}{where}: {message}, elapsed "
             f"{duration(self.last - self.start)}", show=self.show)


_PROGRESS: ContextVar[DecisionProgress | None] = ContextVar("decision_progress", default=None)


@contextmanager
def reporting(label: str, *, show: bool = True) -> Iterator[DecisionProgress]:
    """While open, the decision rules run inside say how they progress, as `mmtag.progress`
    lines "deciding: LABEL (PART): ...": at most one per PROGRESS_SECONDS (none for a quicker
    step) and a closing one with the elapsed time when any was said; a candidate `auto` cannot
    afford, at once (once per candidate). Outside, they run silent (as the training loop's
    per-epoch threshold does)."""
    progress = DecisionProgress(label, show)
    token = _PROGRESS.set(progress)
    try:
        yield progress
    finally:
        _PROGRESS.reset(token)
        if progress.said:
            progress.part = ""
            progress.say("done")


def report_part(part: str) -> None:
    """Names the part of the step under way in `reporting`'s lines (outside it: nothing)."""
    progress = _PROGRESS.get()
    if progress is not None:
        progress.part = part


def _tick(message: str) -> None:
    progress = _PROGRESS.get()
    if progress is not None and time.perf_counter() - progress.last >= PROGRESS_SECONDS:
        progress.say(message)


def _say_once(key: str, message: str) -> None:
    progress = _PROGRESS.get()
    if progress is None:
        log.info("%s", message)
    elif key not in progress.said:
        progress.say(message)
        progress.said.add(key)


# The decision rules by name (`--decision`, also spelled `--thresholds`).
# name → rule(probs, y_true) -> Thresholds: declared in mmtag.registries
TUNERS = registries.TUNERS


def tune(mode: str, probs: np.ndarray, y_true: np.ndarray,
         skip: dict[str, str] | None = None, *, metric: str = SAMPLES) -> Thresholds:
    """The decision rule `mode` fitted on validation scores (global, per-class, balanced, gfm)
    for `metric` (sample-F1 unless told); `skip`: the candidates `auto` does not try (see
    `tune_auto`)."""
    try:
        tuner = TUNERS[mode]
    except KeyError:
        raise MmtagError(f"unknown threshold mode '{mode}'; "
                         f"available: {', '.join(TUNERS)}") from None
    if mode == AUTO:
        thresholds = (tuner(probs, y_true, skip) if metric == SAMPLES
                      else tuner(probs, y_true, skip, metric=metric))
    else:
        thresholds = _run_tuner(tuner, probs, y_true, metric)
    thresholds.metric = metric
    return thresholds


def _run_tuner(tuner: Callable[..., Thresholds], probs: np.ndarray, y_true: np.ndarray,
               metric: str) -> Thresholds:
    """A registered rule called as `tuner(probs, y_true)`, given `metric=` when the metric is not
    the default and the rule takes one (a plugin's rule written before `--metric` does not: it
    tunes what it tunes)."""
    if metric == SAMPLES or not _takes_metric(tuner):
        return tuner(probs, y_true)
    return tuner(probs, y_true, metric=metric)


def _takes_metric(tuner: Callable[..., Thresholds]) -> bool:
    try:
        params = inspect.signature(tuner).parameters
    except (TypeError, ValueError):
        return False
    return "metric" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def tune_decisions(mode: str, scores: Scores, y_true: np.ndarray,
                   ranges: dict[str, tuple[float, float]] | None = None,
                   skip: dict[str, str] | None = None, *, metric: str = SAMPLES) -> Thresholds:
    """Thresholds for a head's scores: `tune(mode)` on the final probabilities, or for union
    heads one threshold vector per branch, tuned for `metric` (sample-F1 unless told).

    For union with `global` mode the two branch thresholds are searched jointly (a coarse pair
    grid) for the metric of the united label sets (`union_f1`, `union_metric`), since tuning
    each branch alone for its own F1 ignores what the other branch already covers; other modes
    tune each branch on its own.
    `ranges` confines a branch's threshold to [lo, hi] (reference design A fixes the image
    threshold at 0.8 and searches the text one in 0.3-0.6). `skip`: see `tune_auto`.
    """
    ranges = ranges or {}
    if mode == AUTO and scores.union:
        # a union's label sets come from per-branch thresholds, searched jointly by `global`;
        # the other rules would each read one branch alone
        mode = "global"

    def grid_for(name: str, grid: np.ndarray) -> np.ndarray:
        if name not in ranges:
            return grid
        lo, hi = ranges[name]
        inside = grid[(grid >= lo - 1e-9) & (grid <= hi + 1e-9)]
        return inside if len(inside) else np.array([lo], dtype=grid.dtype)

    if not scores.union or mode == EXPECTED_F1:  # the expected-F1 rule reads the fused probs
        return tune(mode, scores.probs, y_true, skip, metric=metric)
    names = sorted(scores.branches)
    if mode == "global" and len(names) == 2:
        coarse = np.round(np.arange(0.1, 0.951, 0.05), 2)
        grid_a, grid_b = grid_for(names[0], coarse), grid_for(names[1], coarse)
        pair_f1 = union_f1 if metric == SAMPLES else union_metric
        f1 = pair_f1(scores.branches[names[0]], scores.branches[names[1]], grid_a, grid_b,
                     y_true, scores.probs, **({} if metric == SAMPLES else {"metric": metric}))
        best, best_pair = -1.0, (0.5, 0.5)
        for i, ta in enumerate(grid_a):
            for j, tb in enumerate(grid_b):
                closer = abs(ta - 0.5) + abs(tb - 0.5) < abs(best_pair[0] - 0.5) + abs(best_pair[1] - 0.5)
                if f1[i, j] > best + 1e-12 or (abs(f1[i, j] - best) <= 1e-12 and closer):
                    best, best_pair = float(f1[i, j]), (float(ta), float(tb))
        c = scores.probs.shape[1]
        branches = {names[0]: np.full(c, best_pair[0], np.float32),
                    names[1]: np.full(c, best_pair[1], np.float32)}
    else:
        branches = {n: np.clip(tune(mode, scores.branches[n], y_true, metric=metric).values,
                               *ranges.get(n, (0.0, 1.0)))
                    for n in names}
    return Thresholds(mode=f"union/{mode}", values=branches[names[0]], branches=branches,
                      metric=metric)


def union_f1(a: np.ndarray, b: np.ndarray, grid_a: np.ndarray, grid_b: np.ndarray,
             y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(A, B) sample-F1 of the union decision `(a >= ta) | (b >= tb)` with the top-1 fallback
    on `probs`, for every pair of the ascending grids: each equal to samples_f1 of that decision.

    A score is left out at (i, j) exactly when neither branch reaches its threshold (bins ≤ i
    and ≤ j), so each row's counts at every pair are a 2-D cumulative histogram of its bins."""
    n, c = a.shape
    ga, gb = len(grid_a), len(grid_b)
    truth = y_true.astype(bool)
    n_true = truth.sum(axis=1)
    size = (ga + 1) * (gb + 1)
    below = np.empty((ga, gb, n), dtype=np.int32)  # per pair, each row's scores left out
    true_below = np.empty((ga, gb, n), dtype=np.int32)
    for rows in _row_blocks(n, c):
        r, k = np.nonzero((a[rows] >= grid_a[0]) | (b[rows] >= grid_b[0]))
        key = r * size + _bins(a[rows][r, k], grid_a) * (gb + 1) + _bins(b[rows][r, k], grid_b)
        m = rows.stop - rows.start
        for out, keys, total in ((below, key, c), (true_below, key[truth[rows][r, k]], n_true[rows])):
            hist = np.bincount(keys, minlength=m * size).reshape(m, ga + 1, gb + 1)
            hist[:, 0, 0] = total - hist.sum(axis=(1, 2))  # reaching neither first threshold
            out[:, :, rows] = np.moveaxis(hist.cumsum(axis=1).cumsum(axis=2)[:, :ga, :gb], 0, -1)
    hits = _top1_hits(probs, y_true)
    f1 = np.zeros((ga, gb))
    for i in range(ga):
        for j in range(gb):
            n_pred = c - below[i, j].astype(np.int64)
            tp = n_true - true_below[i, j]
            empty = n_pred == 0
            f1_rows = 2.0 * np.where(empty, hits, tp) / (n_true + np.where(empty, 1, n_pred))
            f1[i, j] = f1_rows.mean() if n else 0.0  # as samples_f1 averages
    return f1


def union_metric(a: np.ndarray, b: np.ndarray, grid_a: np.ndarray, grid_b: np.ndarray,
                 y_true: np.ndarray, probs: np.ndarray, *, metric: str) -> np.ndarray:
    """(A, B) `metric` of the union decision `(a >= ta) | (b >= tb)` with the top-1 fallback on
    `probs`, for every pair of the ascending grids: each equal to METRICS[metric] of that
    decision, the thresholds compared as `decide` compares the stored (float32) ones.

    Micro- and macro-F1 from each class's counts: a score is left out at (i, j) exactly when
    neither branch reaches its threshold (bins ≤ i and ≤ j), and a row falls back on its top-1
    label exactly when its highest bins are ≤ i and ≤ j, so the counts at every pair are 2-D
    cumulative histograms, linear in rows × labels. Another registered metric is scored on each
    pair's decisions."""
    n, c = a.shape
    ga, gb = len(grid_a), len(grid_b)
    cut_a = np.asarray(grid_a).astype(np.float32).astype(a.dtype)
    cut_b = np.asarray(grid_b).astype(np.float32).astype(b.dtype)
    if metric not in COUNTED:
        score, pair = metric_score(metric), Scores(probs, {"a": a, "b": b}, union=True)
        return np.array([[score(y_true, decide(pair, Thresholds(
            "union/global", np.full(c, ta, np.float32), {"a": np.full(c, ta, np.float32),
                                                          "b": np.full(c, tb, np.float32)})))
            for tb in grid_b] for ta in grid_a])
    truth = y_true.astype(bool)
    size = (ga + 1) * (gb + 1)
    left = np.zeros(c * size, dtype=np.int64)  # each class's scores by (bin a, bin b)
    left_true = np.zeros(c * size, dtype=np.int64)
    tops = np.zeros(c * size, dtype=np.int64)  # each row's top-1 label by its highest bins
    top_hits = np.zeros(c * size, dtype=np.int64)
    for rows in _row_blocks(n, c):
        ba, bb, t = _bins(a[rows], cut_a), _bins(b[rows], cut_b), truth[rows]
        key = np.arange(c) * size + ba * (gb + 1) + bb
        left += np.bincount(key.ravel(), minlength=c * size)
        left_true += np.bincount(key[t], minlength=c * size)
        at = np.arange(len(t))
        top = probs[rows].argmax(axis=1)  # as `decide` falls back
        top_key = top * size + ba.max(axis=1) * (gb + 1) + bb.max(axis=1)
        tops += np.bincount(top_key, minlength=c * size)
        top_hits += np.bincount(top_key[t[at, top]], minlength=c * size)

    def at_most(hist: np.ndarray) -> np.ndarray:  # (C, A, B): entries with bins ≤ i and ≤ j
        return hist.reshape(c, ga + 1, gb + 1).cumsum(axis=1).cumsum(axis=2)[:, :ga, :gb]

    n_true = truth.sum(axis=0)
    n_pred = n - at_most(left) + at_most(tops)
    tp = n_true[:, None, None] - at_most(left_true) + at_most(top_hits)
    return metric_of_counts(metric, tp, n_pred, n_true)
