"""A head's `Scores` on features: `mmtag.heads.scoring`'s probabilities as the decision reads
them. What a trained model predicts with and what training tunes its decision on.

Not imported by the package's `__init__`: it loads torch with the heads, which the decision
rules themselves never need.
"""
from __future__ import annotations

import numpy as np

from ..features import Features
from ..heads import Head
from ..heads.scoring import head_probs
from .thresholds import Scores


def head_scores(head: Head, feats: Features) -> Scores:
    """The head's probabilities (and each branch's, for late fusion) on features."""
    probs, branches = head_probs(head, feats)
    return Scores(probs=probs, branches=branches, union=head.decision == "union")


def mean_scores_by(scores: Scores, keys: list[str]) -> tuple[Scores, np.ndarray]:
    """The scores of rows sharing a key (an ImageID) averaged, probabilities and each branch's
    alike, one row per key in the order of its first row; and those first rows' indices."""
    _, first, inverse = np.unique(np.asarray(keys, dtype=object), return_index=True,
                                  return_inverse=True)
    order = np.argsort(first)  # np.unique sorts the keys; the answer keeps the input's order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    group = rank[inverse.ravel()]
    counts = np.bincount(group, minlength=len(order))[:, None]

    def mean(a: np.ndarray) -> np.ndarray:
        out = np.zeros((len(order), a.shape[1]), dtype=np.float64)
        np.add.at(out, group, a)
        return (out / counts).astype(a.dtype)

    return (Scores(probs=mean(scores.probs), branches={k: mean(v) for k, v in scores.branches.items()},
                   union=scores.union), first[order])
