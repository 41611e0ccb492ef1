"""The validation rows as the final model scored them: what thresholds are tuned on, what
`report.html` is drawn from, and what an export re-scores to re-tune its thresholds."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..data import Dataset


@dataclass
class ValidationRecord:
    """The validation split as the final model scored it: what `report.html` is drawn from."""

    probs: np.ndarray  # (N, C)
    y_true: np.ndarray  # (N, C) 0/1
    image_ids: list[str]
    captions: list[str]
    image_paths: list[str]  # "" where the model used no image
    branches: dict[str, np.ndarray] = field(default_factory=dict)  # late fusion: per branch
    # A cross-fitted run's decisions of these rows, each fold's by the rule tuned on the other
    # folds (what its figures are of); None where the run's thresholds decide them
    decided: np.ndarray | None = None
    # A cross-fitted run's fold of each row (0..K-1): the folds its figures were drawn over,
    # kept because grouped folds (rows sharing an image or caption) cannot be redrawn from the
    # labels alone; None for a split, and in runs from before it was kept
    fold: np.ndarray | None = None

    @classmethod
    def of(cls, probs: np.ndarray, branches: dict[str, np.ndarray], y_true: np.ndarray,
           data: Dataset, *, with_images: bool,
           decided: np.ndarray | None = None, fold: np.ndarray | None = None) -> "ValidationRecord":
        """The record of `data`'s rows scored `probs` (and `branches`), with their truth."""
        return cls(probs=probs, y_true=y_true, branches=branches, image_ids=list(data.image_ids),
                   captions=list(data.captions),
                   image_paths=[str(data.image_path(i)) if with_images else ""
                                for i in range(len(data))], decided=decided, fold=fold)
