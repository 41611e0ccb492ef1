"""The expected-F1 decision: per item, the label set that maximises the item's expected F1 under
its label probabilities, assuming the labels independent given the item.

Sample-averaged F1 is a sum of per-item F1s, so the best decision is made item by item: for the
probabilities p of one item, predict the set S maximising E[F1(S, Y)] with Y_j ~ Bernoulli(p_j).
Under independence the best set is always the k most probable labels for some k (Lewis 1995), so
only n candidates are scored; each score is exact:

    E[F1(top-k, Y)] = Σ_t Σ_r P(TP = t) · P(R = r) · 2t / (k + t + r)

with TP the true labels inside the top k and R those outside, both Poisson-binomial, their
distributions built by one convolution per label (the O(n²) idea of Ye et al., ICML 2012; the
general, dependence-aware form is Waegeman et al., JMLR 2014). k ≥ 1: every item carries a label,
as the threshold rules' top-1 fallback also ensures. No threshold is tuned, so nothing is fitted
to the validation rows; it needs calibrated probabilities (Lipton et al. 2014 show a tuned
threshold is the better bet when they are not), which is why it is measured out of fold.
"""
from __future__ import annotations

import numpy as np


def poisson_binomial(p: np.ndarray) -> np.ndarray:
    """(N, m) success probabilities → (N, m + 1) distribution of the number of successes."""
    n, m = p.shape
    dist = np.zeros((n, m + 1))
    dist[:, 0] = 1.0
    for j in range(m):
        q = p[:, j:j + 1]
        dist[:, 1:j + 2] = dist[:, 1:j + 2] * (1 - q) + dist[:, :j + 1] * q
        dist[:, 0] *= 1 - q[:, 0]
    return dist


def expected_f1_by_k(probs: np.ndarray) -> np.ndarray:
    """(N, C) probabilities → (N, C) expected F1 of predicting each item's top k labels, k = 1..C."""
    probs = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    n, c = probs.shape
    ranked = -np.sort(-probs, axis=1)
    out = np.empty((n, c))
    for k in range(1, c + 1):
        inside = poisson_binomial(ranked[:, :k])  # (N, k + 1): true labels among the k
        outside = poisson_binomial(ranked[:, k:])  # (N, c - k + 1): true labels missed
        t = np.arange(k + 1)[:, None]
        r = np.arange(c - k + 1)[None, :]
        f1 = 2.0 * t / (k + t + r)  # (k + 1, c - k + 1); k ≥ 1, so never 0 / 0
        out[:, k - 1] = np.einsum("nt,tr,nr->n", inside, f1, outside)
    return out


def decide_expected_f1(probs: np.ndarray) -> np.ndarray:
    """(N, C) probabilities → (N, C) boolean decisions: each item's top k labels, k maximising
    its expected F1 (ties: the smaller set)."""
    best_k = expected_f1_by_k(probs).argmax(axis=1) + 1
    order = np.argsort(-np.asarray(probs), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(probs.shape[1])[None, :].repeat(len(probs), 0), axis=1)
    return rank < best_k[:, None]
