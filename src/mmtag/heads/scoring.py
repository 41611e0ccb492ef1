"""A head's outputs on features, batch by batch: its logits and each branch's, their
probabilities, and a late-fusion branch alone. Prediction and training both score heads with
these; nothing here trains, so predicting never loads `mmtag.training`.

The `Scores` the decision reads are made of these outputs in `mmtag.decision.scoring` (the
decision layer comes after the heads).
"""
from __future__ import annotations

import numpy as np
import torch

from ..features import Features
from .base import FeatureBatch, Head


def batch_of(features: Features, needs: tuple[str, ...], index: np.ndarray | slice) -> FeatureBatch:
    """Rows `index` of the kinds in `needs`, as float32 tensors."""
    return FeatureBatch({kind: torch.from_numpy(np.asarray(features[kind][index], dtype=np.float32))
                         for kind in needs})


def to_device(batch: FeatureBatch, device: torch.device) -> FeatureBatch:
    return batch if device.type == "cpu" else batch.to(device)


def predict_outputs(head: Head, features: Features,
                    batch_size: int = 1024) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Head logits and each branch's logits for every row, in order (on the head's device)."""
    head.eval()
    device = next(head.parameters()).device
    n = len(features)
    logits: list[np.ndarray] = []
    branches: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            batch = batch_of(features, head.needs, slice(start, min(start + batch_size, n)))
            out = head(to_device(batch, device))
            logits.append(out.logits.float().cpu().numpy())
            for name, value in out.branches.items():
                branches.setdefault(name, []).append(value.float().cpu().numpy())
    return np.concatenate(logits), {k: np.concatenate(v) for k, v in branches.items()}


def predict_logits(head: Head, features: Features, batch_size: int = 1024) -> np.ndarray:
    """Head logits for every row, in order."""
    return predict_outputs(head, features, batch_size)[0]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def head_probs(head: Head, features: Features) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The head's probabilities and each branch's (late fusion), for every row, in order."""
    logits, branches = predict_outputs(head, features)
    return sigmoid(logits), {k: sigmoid(v) for k, v in branches.items()}


def branch_only_logits(head: Head, branch: str, features: np.ndarray) -> np.ndarray:
    """(N, C) logits of `head`'s `branch` alone on that modality's pooled features (N, D)."""
    head.eval()
    device = next(head.parameters()).device
    with torch.inference_mode():
        x = torch.from_numpy(np.asarray(features, dtype=np.float32)).to(device)
        return head.branch_only(FeatureBatch({branch: x}), branch).float().cpu().numpy()
