"""Training losses for multi-label heads, chosen by name (`train.loss`).

Every loss takes (logits (B, C), targets (B, C) in {0, 1}) and returns the mean over all B*C
elements, so the printed train/val losses stay on the same scale whichever loss is picked.
"""
from __future__ import annotations


import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .. import registries
from ..errors import MmtagError

# A class with 3 positives in 2000 rows would otherwise get pos_weight ~660: its few positives
# then dominate every batch they appear in and the gradient spikes destabilise training.
POS_WEIGHT_MAX = 50.0


def pos_weights(y_train: np.ndarray, max_weight: float = POS_WEIGHT_MAX) -> np.ndarray:
    """Per-class neg/pos ratio from the training labels, clipped to [1, `max_weight`].

    The lower clip keeps common classes (more positives than negatives) at plain BCE rather than
    down-weighting their positives; a class with no positives has nothing to weight and gets 1.
    """
    y = np.asarray(y_train) > 0
    pos = y.sum(axis=0).astype(np.float64)
    neg = len(y) - pos
    ratio = np.divide(neg, pos, out=np.ones_like(pos), where=pos > 0)
    return np.clip(ratio, 1.0, max_weight).astype(np.float32)


def weighted_bce(y_train: np.ndarray) -> nn.BCEWithLogitsLoss:
    """BCE whose positive terms are scaled per class so rare labels are not simply ignored."""
    return nn.BCEWithLogitsLoss(pos_weight=torch.from_numpy(pos_weights(y_train)))


def _focusing(base: torch.Tensor, gamma: float) -> torch.Tensor:
    """base**gamma, with gamma == 0 giving exact ones (no 0**0 gradient edge case)."""
    return torch.ones_like(base) if gamma == 0 else base.pow(gamma)


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (Ridnik et al., ICCV 2021), element-wise mean.

    Multi-label data is dominated by easy negatives; ASL focuses them away (gamma_neg) and
    additionally shifts negative probabilities down by `clip`, so a negative scored below `clip`
    costs nothing at all (this also discards possibly mislabelled negatives). Positives keep
    plain BCE (gamma_pos = 0), as the paper and the official training script use; the official
    class's default gamma_pos = 1 is not what their reported results were trained with.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05,
                 eps: float = 1e-8) -> None:
        super().__init__()
        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.clip = clip
        self.eps = eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        y = targets.to(logits.dtype)
        p = torch.sigmoid(logits)
        # Positive term -(1-p)^g+ log p; log-sigmoid keeps log p finite for huge negative logits.
        pos = -_focusing(torch.sigmoid(-logits), self.gamma_pos) * F.logsigmoid(logits)
        # Negative term on the shifted probability p_m = max(p - clip, 0): -p_m^g- log(1 - p_m).
        p_m = (p - self.clip).clamp(min=0) if self.clip > 0 else p
        log_not_p_m = (self._log_one_minus_shifted(logits) if self.clip > 0
                       else F.logsigmoid(-logits))
        neg = -_focusing(p_m, self.gamma_neg) * log_not_p_m
        return (y * pos + (1 - y) * neg).mean()

    def _log_one_minus_shifted(self, logits: torch.Tensor) -> torch.Tensor:
        """log(1 - p_m) = log(min(1 - p + clip, 1)); 1 - p taken as sigmoid(-x) for precision."""
        return torch.log((torch.sigmoid(-logits) + self.clip).clamp(min=self.eps, max=1.0))


class FocalLoss(nn.Module):
    """Sigmoid focal loss (Lin et al. 2017) as torchvision defines it, element-wise mean.

    loss = alpha_t * (1 - p_t)^gamma * BCE, with alpha weighting positives and 1 - alpha
    negatives; confident correct predictions contribute almost nothing.
    """

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25) -> None:
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        y = targets.to(logits.dtype)
        ce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * y + (1 - p) * (1 - y)
        loss = ce * _focusing(1 - p_t, self.gamma)
        if self.alpha >= 0:  # torchvision: a negative alpha disables class weighting
            loss = loss * (self.alpha * y + (1 - self.alpha) * (1 - y))
        return loss.mean()


def bce(y_train: np.ndarray) -> nn.Module:
    return nn.BCEWithLogitsLoss()


def asl(y_train: np.ndarray) -> nn.Module:
    return AsymmetricLoss()


def focal(y_train: np.ndarray) -> nn.Module:
    return FocalLoss()


# name → factory(y_train): declared in mmtag.registries
LOSSES = registries.LOSSES


def create_loss(name: str, y_train: np.ndarray) -> nn.Module:
    """The loss called `name`; `y_train` (N, C) supplies class frequencies where one needs them."""
    try:
        factory = LOSSES[name]
    except KeyError:
        raise MmtagError(f"unknown loss '{name}'; available: {', '.join(LOSSES)}") from None
    return factory(y_train)
