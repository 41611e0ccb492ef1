"""Scores, from scikit-learn: sample-F1 (Kaggle's "Mean F1"), micro-F1, macro-F1, per class."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import sparse
from sklearn.metrics import f1_score, precision_recall_fscore_support


@dataclass
class ClassMetrics:
    label: int
    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class Metrics:
    """The competition score and its companions for one labelled set of predictions."""

    samples_f1: float
    micro_f1: float
    macro_f1: float
    per_class: list[ClassMetrics]
    n: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> "Metrics":
        per_class = [ClassMetrics(**c) for c in raw["per_class"]]  # type: ignore[arg-type]
        return cls(samples_f1=float(raw["samples_f1"]), micro_f1=float(raw["micro_f1"]),  # type: ignore[arg-type]
                   macro_f1=float(raw["macro_f1"]), per_class=per_class, n=int(raw["n"]))  # type: ignore[arg-type]

    def figure(self, metric: str) -> float:
        """The figure of `metric` (a name of registries.METRICS: samples, micro, macro)."""
        return float(getattr(self, f"{metric}_f1"))

    def headline(self) -> str:
        return (f"samples_f1={self.samples_f1:.4f} micro_f1={self.micro_f1:.4f} "
                f"macro_f1={self.macro_f1:.4f} (n={self.n})")

    def table(self) -> str:
        """A fixed-width per-class table followed by the three averages."""
        lines = [f"{'label':>5}  {'name':<16}{'precision':>10}{'recall':>8}{'f1':>8}{'support':>9}"]
        for c in self.per_class:
            lines.append(f"{c.label:>5}  {c.name[:16]:<16}{c.precision:>10.3f}{c.recall:>8.3f}"
                         f"{c.f1:>8.3f}{c.support:>9d}")
        lines.append("")
        lines.append(f"samples F1 (Mean F1): {self.samples_f1:.4f}")
        lines.append(f"micro F1:             {self.micro_f1:.4f}")
        lines.append(f"macro F1:             {self.macro_f1:.4f}")
        lines.append(f"items:                {self.n}")
        return "\n".join(lines)


def samples_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Sample-averaged F1 in plain numpy (same value as sklearn's, used in tight tuning loops)."""
    t = y_true.astype(bool)
    p = y_pred.astype(bool)
    tp = (t & p).sum(axis=1)
    denom = t.sum(axis=1) + p.sum(axis=1)
    f1 = np.divide(2.0 * tp, denom, out=np.zeros(len(t)), where=denom > 0)
    return float(f1.mean()) if len(t) else 0.0


def micro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Micro-averaged F1 in plain numpy, every label decision pooled: 2·TP / (true + predicted
    labels). The same value as sklearn's f1_score(average="micro", zero_division=0)."""
    t, p = np.asarray(y_true) != 0, np.asarray(y_pred) != 0
    tp = int(np.count_nonzero(t & p))
    denom = int(np.count_nonzero(t)) + int(np.count_nonzero(p))
    return 2.0 * tp / denom if denom else 0.0


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-averaged F1 in plain numpy: the mean of each class's F1 over the classes that occur
    (in truth or prediction), as `compute` reports it. The same value as sklearn's
    f1_score(average="macro", zero_division=0, labels=<those classes>)."""
    t, p = np.asarray(y_true) != 0, np.asarray(y_pred) != 0
    return macro_of_counts((t & p).sum(axis=0), t.sum(axis=0), p.sum(axis=0))


def class_f1(tp: np.ndarray, n_true: np.ndarray, n_pred: np.ndarray) -> np.ndarray:
    """Each class's F1 from its counts, 2·TP / (true + predicted), 0 where both are 0 (float64,
    computed as scikit-learn computes it)."""
    denom = np.asarray(n_true, dtype=np.float64) + np.asarray(n_pred, dtype=np.float64)
    return np.divide(2.0 * np.asarray(tp, dtype=np.float64), denom,
                     out=np.zeros(np.shape(denom)), where=denom > 0)


def macro_of_counts(tp: np.ndarray, n_true: np.ndarray, n_pred: np.ndarray) -> float:
    """Macro-F1 of per-class counts (C,): the mean F1 of the classes true or predicted anywhere."""
    occurring = (np.asarray(n_true) > 0) | (np.asarray(n_pred) > 0)
    if not occurring.any():
        return 0.0
    return float(class_f1(tp[occurring], n_true[occurring], n_pred[occurring]).mean())


def metric_title(metric: str) -> str:
    """How lines and tables name a metric of registries.METRICS: sample-F1, micro-F1, macro-F1."""
    return "sample-F1" if metric == "samples" else f"{metric}-F1"


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """Per-fold figures as every table and line quotes them, "mean ± std": their mean and
    sample standard deviation (ddof=1; 0 for a single figure)."""
    if not values:
        raise ValueError("no figures to summarise")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def compute(y_true: np.ndarray, y_pred: np.ndarray, label_ids: tuple[int, ...],
            names: tuple[str, ...]) -> Metrics:
    """All metrics for 0/1 matrices (N, C) whose columns follow `label_ids`.

    scikit-learn is given them as sparse matrices: the same numbers, but it then never looks
    for the unique values of a dense N × C matrix (a hash of every cell, each call: minutes at
    10,000 labels, issue 29)."""
    yt = np.asarray(y_true) != 0
    yp = np.asarray(y_pred) != 0
    n_classes = yt.shape[1]
    if len(yt) == 0 or n_classes == 0:  # nothing to score (sklearn would raise)
        return Metrics(0.0, 0.0, 0.0, [ClassMetrics(int(i), n, 0.0, 0.0, 0.0, 0)
                                       for i, n in zip(label_ids, names)], n=int(len(yt)))
    if n_classes == 1:
        # sklearn reads a one-column matrix as binary targets, not as one label of a multi-label
        # problem (it refuses average="samples" and scores the 0s as a class). A column that is
        # never true and never predicted makes it multi-label and changes no score: it adds no
        # true/false positive or negative count, and the averages below skip absent classes.
        yt = np.hstack([yt, np.zeros_like(yt)])
        yp = np.hstack([yp, np.zeros_like(yp)])
    occurring = np.flatnonzero(yt.any(0) | yp.any(0)).tolist()
    yt, yp = sparse.csr_matrix(yt, dtype=np.int64), sparse.csr_matrix(yp, dtype=np.int64)
    p, r, f, s = precision_recall_fscore_support(yt, yp, average=None, zero_division=0,
                                                 labels=list(range(n_classes)))
    per_class = [ClassMetrics(int(i), n, float(pi), float(ri), float(fi), int(si))
                 for i, n, pi, ri, fi, si in zip(label_ids, names, p, r, f, s)]
    return Metrics(
        samples_f1=float(f1_score(yt, yp, average="samples", zero_division=0)),
        micro_f1=float(f1_score(yt, yp, average="micro", zero_division=0)),
        # Macro over the classes that occur (in truth or prediction): a class absent from this
        # split and never predicted has nothing to score, and counting it as 0 would mislead.
        macro_f1=float(f1_score(yt, yp, average="macro", zero_division=0, labels=occurring))
        if occurring else 0.0,
        per_class=per_class, n=int(len(y_true)))


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """(C, 4) per-class counts TP, FP, FN, TN of 0/1 matrices (N, C)."""
    t, p = y_true.astype(bool), y_pred.astype(bool)
    return np.stack([(t & p).sum(0), (~t & p).sum(0), (t & ~p).sum(0), (~t & ~p).sum(0)], axis=1)


def pr_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Precision, recall and average precision of one class (scikit-learn's)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    precision, recall, _ = precision_recall_curve(y_true.astype(int), scores)
    return precision, recall, float(average_precision_score(y_true.astype(int), scores))
