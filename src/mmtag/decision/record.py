"""The validation rows as the final model scored them: what thresholds are tuned on, what
`report.html` is drawn from, and what an export re-scores to re-tune its thresholds."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ValidationRecord:
    """The validation split as the final model scored it: what `report.html` is drawn from."""

    probs: np.ndarray  # (N, C)
    y_true: np.ndarray  # (N, C) 0/1
    image_ids: list[str]
    captions: list[str]
    image_paths: list[str]  # "" where the model used no image
    branches: dict[str, np.ndarray] = field(default_factory=dict)  # late fusion: per branch
