"""Stacking the branches of a late-fusion model (`--stack`): per label, a logistic regression of
the truth on the branches' out-of-fold logits (scikit-learn). Fitted on out-of-fold scores only,
so the combiner never learns from a score the branch produced for a row it trained on."""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def fit_stacker(branches: list[np.ndarray], y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Branch probabilities [(N, C), ...] and truth (N, C) → weights (C, B) and biases (C,).
    A label whose rows are all one class keeps the plain mean of the branches."""
    z = np.stack([logit(b) for b in branches], axis=-1)  # (N, C, B)
    n_classes, n_branches = y.shape[1], len(branches)
    weight = np.full((n_classes, n_branches), 1.0 / n_branches)
    bias = np.zeros(n_classes)
    # One small fit per label (thousands, with thousands of labels): a BLAS thread pool only
    # adds waiting to each, many times the fit on a busy CPU (same weights, issue 29).
    with threadpool_limits(1, user_api="blas"):
        for c in range(n_classes):
            if 0 < y[:, c].sum() < len(y):
                lr = LogisticRegression(C=1.0, max_iter=1000).fit(z[:, c, :], y[:, c].astype(int))
                weight[c], bias[c] = lr.coef_[0], lr.intercept_[0]
    return weight, bias


def stacked_probs(branches: list[np.ndarray], weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    z = np.stack([logit(b) for b in branches], axis=-1)
    return 1.0 / (1.0 + np.exp(-((z * weight[None]).sum(-1) + bias[None])))
