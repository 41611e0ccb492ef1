"""Classification heads over cached features: the base class and the building blocks heads share.

A head declares which feature kinds it `needs`; the trainer feeds exactly those. Late-fusion heads
also return each modality's own logits (`HeadOutput.branches`), which the loss supervises too, so
every branch is a working classifier on its own. A head's hyper-parameters are `model.*` config
options that it names in `params`, so they are set in config.yaml and saved with the bundle.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..errors import MmtagError
from ..features import modality_of


class FeatureBatch:
    """A batch of features as float32 tensors, keyed by feature kind like `Features`; a head
    reads the kinds it `needs`."""

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.tensors: dict[str, torch.Tensor] = dict(tensors or {})

    def __len__(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0]) if self.tensors else 0

    def __getitem__(self, kind: str) -> torch.Tensor:
        return self.tensors[kind]

    def __contains__(self, kind: object) -> bool:
        return kind in self.tensors

    def to(self, device: torch.device) -> "FeatureBatch":
        return FeatureBatch({k: t.to(device, non_blocking=True) for k, t in self.tensors.items()})


@dataclass
class HeadOutput:
    """Final logits plus, for late fusion, each branch's own logits (supervised as well)."""

    logits: torch.Tensor
    branches: dict[str, torch.Tensor] = field(default_factory=dict)


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    """LayerNorm → Linear → GELU → Dropout → Linear: the normalisation makes image and text
    features (on very different scales) usable with one learning rate."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(),
                         nn.Dropout(dropout), nn.Linear(hidden, out_dim))


class Branches:
    """What a model's head can answer from: every modality it `needs`, or, through one of its
    `branches`, one modality alone. A branch is a complete classifier that reads only its own
    modality's pooled vector (feature kind = modality = branch name) and is supervised on its own,
    so its scores mean what the fused ones mean: late fusion has one per modality, early fusion
    none (its auxiliary classifiers are training signals on a shared projection, not models).
    Heads and their wrappers (fold ensemble, stacking) declare this, so callers ask the head
    instead of checking its class."""

    needs: tuple[str, ...] = ()
    branches: tuple[str, ...] = ()

    def can_predict_with(self, modalities: Collection[str]) -> bool:
        """Whether items that carry only `modalities` can be predicted, by the whole head or by
        one branch."""
        have = set(modalities)
        whole = bool(have) and {modality_of(k) for k in self.needs} <= have
        return whole or self.branch_for(have) is not None

    def branch_for(self, modalities: Collection[str]) -> str | None:
        """The branch that answers items carrying only `modalities`, when they lack part of what
        the whole head needs; None when the whole head can run, or when no branch can."""
        have = set(modalities)
        if {modality_of(k) for k in self.needs} <= have:
            return None
        return next((b for b in self.branches if b in have), None)

    def branch_only(self, batch: FeatureBatch, branch: str) -> torch.Tensor:
        """The logits of `branch` alone, reading only that modality's features from `batch`."""
        raise MmtagError(f"head '{type(self).__name__}' has no branch '{branch}' that predicts alone"
                         f" (its branches: {', '.join(self.branches) or 'none'})")


class Head(Branches, nn.Module):
    """Base class: `needs` lists the feature kinds read from a FeatureBatch; `decision` says how
    logits become labels: "threshold" (one threshold set on `HeadOutput.logits`) or "union" (each
    branch gets its own tuned thresholds and the label sets are united — the final logits are then
    only a summary, so code that decides must look at the branches). `takes_unpaired`: the head
    can also learn from captions that have no image (`--extra-text`), because its text part is a
    complete classifier on its own. `branches` (see `Branches`): the modalities that each have
    such a classifier, which answers items lacking the other modality.

    `params` names the `ModelConfig` fields the constructor takes as keyword arguments;
    `create_head` passes exactly those from the run's config. A head with a hyper-parameter of its
    own adds one field (with its allowed range) to `ModelConfig` and names it here: no caller
    changes, and the value is saved in the bundle's config.yaml and used again when it loads."""

    needs: ClassVar[tuple[str, ...]] = ()
    branches: ClassVar[tuple[str, ...]] = ()
    decision: ClassVar[str] = "threshold"
    takes_unpaired: ClassVar[bool] = False
    params: ClassVar[tuple[str, ...]] = ("hidden", "dropout")

    def __init__(self, dims: dict[str, int], num_classes: int, *, hidden: int,
                 dropout: float) -> None:
        super().__init__()
        missing = [k for k in self.needs if k not in dims]
        if missing:
            raise MmtagError(f"head '{type(self).__name__}' needs features {missing}")

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        raise NotImplementedError


def projection(in_dim: int, out_dim: int, input_dropout: float = 0.0) -> nn.Sequential:
    """LayerNorm → Dropout → Linear → GELU: brings a modality to a common width and scale."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Dropout(input_dropout), nn.Linear(in_dim, out_dim),
                         nn.GELU())
