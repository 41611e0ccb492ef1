"""Pseudo-label self-training: which unlabelled rows to trust, and the log of each round."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PseudoRound:
    """One self-training round: how many pseudo-labelled rows joined, and validation sample-F1
    of the head trained with them (round 0 = the head trained on labelled rows only)."""

    round: int
    n_pseudo: int
    val_samples_f1: float


def select_pseudo_labels(probs: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose every label score is confidently on one side (>= c or <= 1 - c) and that have
    at least one positive label → (row indices, their 0/1 label matrix).

    Requiring confidence on every class, not just the predicted ones, keeps rows where a missed
    label would silently become a negative training example out of the pseudo set.
    """
    if not 0.5 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence}")
    positive = probs >= confidence
    sure = positive | (probs <= 1.0 - confidence)
    keep = np.flatnonzero(sure.all(axis=1) & positive.any(axis=1))
    return keep, positive[keep].astype(np.float32)
