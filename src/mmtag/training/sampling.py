"""Which rows an epoch of head training visits, and how often: shuffling and repeat-factor
oversampling of rows that carry rare labels."""
from __future__ import annotations

import numpy as np
import torch


def repeat_factors(y: np.ndarray, threshold: float = 0.05) -> np.ndarray:
    """Per-row repeat factors for rare labels, LVIS-style repeat-factor sampling (Gupta et al.
    2019): a label on a fraction f < threshold of rows gets r = sqrt(threshold / f), and a row
    repeats as often as its rarest label asks. Common-label rows keep factor 1."""
    freq = y.mean(axis=0)
    per_class = np.where(freq > 0, np.sqrt(threshold / np.maximum(freq, 1e-12)), 1.0)
    per_class = np.maximum(per_class, 1.0)
    return np.where(y > 0, per_class[None, :], 1.0).max(axis=1)


def epoch_order(n: int, factors: np.ndarray | None, generator: torch.Generator) -> np.ndarray:
    """A shuffled epoch of row indices; with repeat factors, rows are repeated by stochastic
    rounding (factor 2.3 → 2 copies, or 3 with probability 0.3)."""
    if factors is None:
        return torch.randperm(n, generator=generator).numpy()
    u = torch.rand(n, generator=generator).numpy()
    copies = np.floor(factors + u).astype(np.int64)
    rows = np.repeat(np.arange(n), copies)
    return rows[torch.randperm(len(rows), generator=generator).numpy()]
