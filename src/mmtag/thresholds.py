"""Turning scores into label sets: thresholds tuned on validation, and the top-1 fallback."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import samples_f1

GRID = np.round(np.arange(0.05, 0.951, 0.01), 2)


@dataclass
class Thresholds:
    """One threshold per class (a global threshold is the same value repeated)."""

    mode: str
    values: np.ndarray  # (C,)

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "values": [float(v) for v in self.values]}

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> "Thresholds":
        return cls(mode=str(raw["mode"]), values=np.asarray(raw["values"], dtype=np.float32))

    @classmethod
    def constant(cls, value: float, num_classes: int) -> "Thresholds":
        return cls(mode="global", values=np.full(num_classes, value, dtype=np.float32))


def decide(probs: np.ndarray, thresholds: Thresholds | np.ndarray | float) -> np.ndarray:
    """Scores (N, C) → boolean label matrix; a row with no label above threshold gets its top-1.

    Every item carries at least one label, so an empty prediction is always wrong; the top-1
    label is the best single guess.
    """
    t = thresholds.values if isinstance(thresholds, Thresholds) else thresholds
    pred = probs >= np.asarray(t, dtype=probs.dtype)
    empty = ~pred.any(axis=1)
    if empty.any():
        rows = np.flatnonzero(empty)
        pred[rows, probs[rows].argmax(axis=1)] = True
    return pred


def tune_global(probs: np.ndarray, y_true: np.ndarray, grid: np.ndarray = GRID) -> Thresholds:
    """The single threshold (on `grid`) maximising validation sample-F1, top-1 fallback included.

    Ties go to the threshold closest to 0.5, so a flat curve does not drift to an extreme.
    """
    scores = np.array([samples_f1(y_true, decide(probs, t)) for t in grid])
    best = scores.max()
    candidates = grid[np.isclose(scores, best, rtol=0, atol=1e-12)]
    value = float(candidates[np.argmin(np.abs(candidates - 0.5))])
    return Thresholds.constant(value, probs.shape[1])


def threshold_curve(probs: np.ndarray, y_true: np.ndarray,
                    grid: np.ndarray = GRID) -> tuple[np.ndarray, np.ndarray]:
    """(grid, sample-F1 at each global threshold) for plots and reports."""
    return grid, np.array([samples_f1(y_true, decide(probs, t)) for t in grid])
