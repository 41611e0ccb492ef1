"""A head's `Scores` on features: `mmtag.heads.scoring`'s probabilities as the decision reads
them. What a trained model predicts with and what training tunes its decision on.

Not imported by the package's `__init__`: it loads torch with the heads, which the decision
rules themselves never need.
"""
from __future__ import annotations

from ..features import Features
from ..heads import Head
from ..heads.scoring import head_probs
from .thresholds import Scores


def head_scores(head: Head, feats: Features) -> Scores:
    """The head's probabilities (and each branch's, for late fusion) on features."""
    probs, branches = head_probs(head, feats)
    return Scores(probs=probs, branches=branches, union=head.decision == "union")
