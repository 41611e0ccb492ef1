"""Turning scores into label sets: thresholds tuned on validation, and the top-1 fallback."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..config import AT_LEAST_1
from ..errors import MmtagError
from .expected_f1 import decide_expected_f1
from .metrics import samples_f1

GRID = np.round(np.arange(0.05, 0.951, 0.01), 2)
log = logging.getLogger(__name__)


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

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"mode": self.mode, "values": [float(v) for v in self.values]}
        if self.branches:
            out["branches"] = {k: [float(x) for x in v] for k, v in self.branches.items()}
        if self.chosen_from:
            out["chosen_from"] = {k: round(float(v), 6) for k, v in self.chosen_from.items()}
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> "Thresholds":
        branches = raw.get("branches") or {}
        chosen = raw.get("chosen_from") or {}
        return cls(mode=str(raw["mode"]), values=np.asarray(raw["values"], dtype=np.float32),
                   branches={str(k): np.asarray(v, dtype=np.float32)
                             for k, v in branches.items()},  # type: ignore[union-attr]
                   chosen_from={str(k): float(v) for k, v in chosen.items()})  # type: ignore[union-attr]

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
        return decide_expected_f1(probs.probs if isinstance(probs, Scores) else probs)
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


def tune_global(probs: np.ndarray, y_true: np.ndarray, grid: np.ndarray = GRID) -> Thresholds:
    """The single threshold (on `grid`) maximising validation sample-F1, top-1 fallback included.

    Ties go to the threshold closest to 0.5, so a flat curve does not drift to an extreme.
    """
    return Thresholds.constant(_best_near_half(grid, f1_by_threshold(probs, y_true, grid)),
                               probs.shape[1])


def f1_by_threshold(probs: np.ndarray, y_true: np.ndarray, grid: np.ndarray = GRID) -> np.ndarray:
    """(G,) validation sample-F1 with one global threshold at each grid value (top-1 fallback
    included): the curve `tune_global` maximises, for plotting."""
    return np.array([samples_f1(y_true, decide(probs, t)) for t in grid])


def _best_near_half(grid: np.ndarray, scores: np.ndarray, *, maximise: bool = True) -> float:
    """The grid value with the best score; ties go to the value closest to 0.5, so a flat
    stretch of the curve does not drift the threshold to an extreme."""
    best = scores.max() if maximise else scores.min()
    candidates = grid[np.isclose(scores, best, rtol=0, atol=1e-12)]
    return float(candidates[np.argmin(np.abs(candidates - 0.5))])


def _top1_hits(probs: np.ndarray, y_true: np.ndarray) -> np.ndarray:
    """(N,) whether each row's top-1 label is correct: what the fallback scores on empty rows."""
    top1 = probs.argmax(axis=1)
    return y_true[np.arange(len(y_true)), top1].astype(bool)


def _class_f1_curve(probs: np.ndarray, y_true: np.ndarray, pred: np.ndarray, c: int,
                    grid: np.ndarray, top1_hits: np.ndarray) -> np.ndarray:
    """(G,) sample-F1 when column c is thresholded at each grid value and the other columns keep
    their decisions in `pred` (before fallback); equals samples_f1(y, decide(...)) per value.

    Done for all grid values at once from per-row counts, since rebuilding the full decision
    matrix per candidate is what makes naive coordinate ascent slow.
    """
    truth = y_true.astype(bool)
    others = np.ones(truth.shape[1], dtype=bool)
    others[c] = False
    tp_other = (truth[:, others] & pred[:, others]).sum(axis=1)
    n_other = pred[:, others].sum(axis=1)
    n_true = truth.sum(axis=1)
    col = probs[:, c][None, :] >= grid.astype(probs.dtype)[:, None]  # (G, N), as decide compares
    n_pred = n_other[None, :] + col
    tp = tp_other[None, :] + (col & truth[None, :, c])
    empty = n_pred == 0
    n_pred = np.where(empty, 1, n_pred)
    tp = np.where(empty, top1_hits[None, :], tp)
    return (2.0 * tp / (n_true[None, :] + n_pred)).mean(axis=1)


def tune_per_class(probs: np.ndarray, y_true: np.ndarray, grid: np.ndarray = GRID,
                   max_sweeps: int = 10) -> Thresholds:
    """Per-class thresholds by coordinate ascent on validation sample-F1, fallback included.

    Classes are scored on different scales (a rare label's positives may never reach the global
    threshold), so one shared value can be far from each class's best. Starting from the tuned
    global threshold and only accepting strict improvements guarantees a validation score no
    worse than global; sweeps stop once a full pass changes nothing. More thresholds fit the
    validation set more closely, so this wants a reasonably large validation split.
    """
    # Candidates as they will be stored (float32), so the stored thresholds reproduce the score.
    grid = grid.astype(np.float32)
    values = tune_global(probs, y_true, grid).values.copy()
    hits = _top1_hits(probs, y_true)
    current = samples_f1(y_true, decide(probs, values))
    for _ in range(max_sweeps):
        improved = False
        for c in range(probs.shape[1]):
            pred = probs >= values.astype(probs.dtype)
            curve = _class_f1_curve(probs, y_true, pred, c, grid, hits)
            if curve.max() > current + 1e-12:
                values[c] = _best_near_half(grid, curve)
                current = float(curve.max())
                improved = True
        if not improved:
            break
    return Thresholds(mode="per-class", values=values.astype(np.float32))


def tune_balanced(probs: np.ndarray, y_true: np.ndarray, grid: np.ndarray = GRID) -> Thresholds:
    """Per-class thresholds where validation false positives ≈ false negatives (min |FP - FN|).

    Equal error counts make the predicted label count match the true one per class, which
    keeps label frequencies calibrated without optimising the score on the validation set
    directly. Each class is chosen on its own (fallback ignored: it couples classes and only
    touches rows with nothing above threshold); `decide` still applies the fallback.
    """
    truth = y_true.astype(bool)
    grid = grid.astype(np.float32)  # as stored, so decide() reproduces the counts
    cut = grid.astype(probs.dtype)[:, None]
    values = np.empty(probs.shape[1], dtype=np.float32)
    for c in range(probs.shape[1]):
        pred = probs[:, c][None, :] >= cut  # (G, N)
        fp = (pred & ~truth[None, :, c]).sum(axis=1)
        fn = (~pred & truth[None, :, c]).sum(axis=1)
        values[c] = _best_near_half(grid, np.abs(fp - fn).astype(float), maximise=False)
    return Thresholds(mode="balanced", values=values)


EXPECTED_F1 = "gfm"  # the decision rule that tunes nothing (see `expected_f1`)


def expected_f1_rule(probs: np.ndarray, y_true: np.ndarray) -> Thresholds:
    """The expected-F1 decision per item: nothing is fitted to the validation rows. Its record
    keeps 0.5 per class only so every decision record has the same shape; `decide` ignores it."""
    return Thresholds(mode=EXPECTED_F1, values=np.full(probs.shape[1], 0.5, dtype=np.float32))


# Below this many validation rows, the epoch and threshold chosen on them are noise: on coco-real,
# a 195-row split overstated held-out sample-F1 by 1-3 points and ranked the heads wrongly.
FEW_VALIDATION_ROWS = 1000

AUTO = "auto"
AUTO_CANDIDATES = ("global", "per-class", EXPECTED_F1)  # global first: the one kept on doubt
AUTO_FOLDS = 5


def tune_auto(probs: np.ndarray, y_true: np.ndarray) -> Thresholds:
    """The decision rule chosen on validation rows it is not tuned on, then tuned on them all.

    Each candidate of AUTO_CANDIDATES is tuned on four fifths of the rows (seeded folds) and
    scored on the fifth. `global` is kept unless another rule beats it by more than one standard
    error of their paired per-fold difference (the one-standard-error rule, Hastie et al., ESL
    §7.10): no rule wins everywhere (gfm needs calibrated probabilities, which a large training
    set gives and a small one may not), and a small validation set cannot tell close rules
    apart; below FEW_VALIDATION_ROWS rows it is not asked to, and `global` is used. The chosen
    rule's record names it (`mode`), so prediction and export apply it as if
    it had been asked for; `chosen_from` keeps each candidate's held-part sample-F1.
    """
    n = len(y_true)
    if n < FEW_VALIDATION_ROWS:
        # a fifth of so few rows cannot tell close rules apart (one process and two, differing
        # only in float order, chose global and per-class on 90 rows): the plain rule
        return tune_global(probs, y_true)
    parts = np.array_split(np.random.default_rng(0).permutation(n), AUTO_FOLDS)
    splits = [(np.concatenate(parts[:i] + parts[i + 1:]), held) for i, held in enumerate(parts)]

    def held_part_f1(rule: str) -> np.ndarray:
        """The rule tuned on each split's other parts, scored on its held part."""
        tuned = [(held, TUNERS[rule](probs[rest], y_true[rest])) for rest, held in splits]
        return np.array([samples_f1(y_true[held], decide(probs[held], t)) for held, t in tuned])

    held_f1 = {rule: held_part_f1(rule) for rule in AUTO_CANDIDATES}
    base = AUTO_CANDIDATES[0]
    chosen, best_gain = base, 0.0
    for rule in AUTO_CANDIDATES[1:]:
        diff = held_f1[rule] - held_f1[base]
        gain, stderr = float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))
        if gain > stderr and gain > best_gain:
            chosen, best_gain = rule, gain
    means = {rule: float(f.mean()) for rule, f in held_f1.items()}
    log.info("decision auto: %s (sample-F1 on held parts of %d validation rows: %s)", chosen, n,
             ", ".join(f"{r} {v:.4f}" for r, v in means.items()))
    thresholds = TUNERS[chosen](probs, y_true)
    thresholds.chosen_from = means
    return thresholds


# The decision rules by name (`--decision`, also spelled `--thresholds`).
TUNERS: dict[str, Callable[[np.ndarray, np.ndarray], Thresholds]] = {
    "global": tune_global,
    "per-class": tune_per_class,
    "balanced": tune_balanced,
    EXPECTED_F1: expected_f1_rule,
    AUTO: tune_auto,
}


def tune(mode: str, probs: np.ndarray, y_true: np.ndarray) -> Thresholds:
    """The decision rule `mode` fitted on validation scores (global, per-class, balanced, gfm)."""
    try:
        tuner = TUNERS[mode]
    except KeyError:
        raise MmtagError(f"unknown threshold mode '{mode}'; "
                         f"available: {', '.join(TUNERS)}") from None
    return tuner(probs, y_true)


def tune_decisions(mode: str, scores: Scores, y_true: np.ndarray,
                   ranges: dict[str, tuple[float, float]] | None = None) -> Thresholds:
    """Thresholds for a head's scores: `tune(mode)` on the final probabilities, or for union
    heads one threshold vector per branch.

    For union with `global` mode the two branch thresholds are searched jointly (a coarse pair
    grid) for the sample-F1 of the united label sets, since tuning each branch alone for its own
    F1 ignores what the other branch already covers; other modes tune each branch on its own.
    `ranges` confines a branch's threshold to [lo, hi] (reference design A fixes the image
    threshold at 0.8 and searches the text one in 0.3-0.6).
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
        return tune(mode, scores.probs, y_true)
    names = sorted(scores.branches)
    if mode == "global" and len(names) == 2:
        coarse = np.round(np.arange(0.1, 0.951, 0.05), 2)
        a, b = scores.branches[names[0]], scores.branches[names[1]]
        best, best_pair = -1.0, (0.5, 0.5)
        for ta in grid_for(names[0], coarse):
            pa = a >= ta
            for tb in grid_for(names[1], coarse):
                f1 = samples_f1(y_true, _top1_fallback(pa | (b >= tb), scores.probs))
                closer = abs(ta - 0.5) + abs(tb - 0.5) < abs(best_pair[0] - 0.5) + abs(best_pair[1] - 0.5)
                if f1 > best + 1e-12 or (abs(f1 - best) <= 1e-12 and closer):
                    best, best_pair = f1, (float(ta), float(tb))
        c = scores.probs.shape[1]
        branches = {names[0]: np.full(c, best_pair[0], np.float32),
                    names[1]: np.full(c, best_pair[1], np.float32)}
    else:
        branches = {n: np.clip(tune(mode, scores.branches[n], y_true).values, *ranges.get(n, (0.0, 1.0)))
                    for n in names}
    return Thresholds(mode=f"union/{mode}", values=branches[names[0]], branches=branches)
