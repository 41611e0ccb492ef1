"""What a fitted model's head can be beyond one registered head, built from the config so a bundle
rebuilds it as it rebuilds a single head: the fold ensemble of a cross-fitted model (`--folds
K`: K heads of one kind, trained on different folds, logits averaged) and the stacked late
fusion (`--stack`: per-label weights of the branches, fitted out of fold)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .base import Branches, FeatureBatch, Head, HeadOutput
from .registry import create_head


class FoldEnsemble(Branches, nn.Module):
    """Averages its members' outputs; it reads, decides, takes unpaired rows and answers from one
    branch as they do."""

    def __init__(self, members: list[Head]) -> None:
        super().__init__()
        if not members or len({type(m) for m in members}) != 1:
            raise ValueError("a fold ensemble needs one or more heads of one kind")
        self.members = nn.ModuleList(members)
        self.needs = members[0].needs
        self.branches = members[0].branches
        self.decision = members[0].decision
        self.takes_unpaired = members[0].takes_unpaired

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        outs = [m(batch) for m in self.members]
        return HeadOutput(logits=torch.stack([o.logits for o in outs]).mean(0),
                          branches={k: torch.stack([o.branches[k] for o in outs]).mean(0)
                                    for k in outs[0].branches})

    def branch_only(self, batch: FeatureBatch, branch: str) -> torch.Tensor:
        """The members' `branch` logits averaged: the same as that branch in `forward`."""
        return torch.stack([m.branch_only(batch, branch) for m in self.members]).mean(0)


def create_model_head(name: str, dims: dict[str, int], num_classes: int, model: ModelConfig,
                      folds: int = 1, stack: bool = False) -> nn.Module:
    """The head a fitted model holds: one head, or with `folds` > 1 an ensemble of that many;
    with `stack`, wrapped in its fitted per-label combiner."""
    head: nn.Module = (create_head(name, dims, num_classes, model) if folds <= 1 else
                       FoldEnsemble([create_head(name, dims, num_classes, model) for _ in range(folds)]))
    return StackedHead(head, num_classes) if stack else head


class StackedHead(Branches, nn.Module):
    """Late fusion with learned per-label weights (`--stack`): label c's logit is
    w_c · (image logit, text logit) + b_c, the branches those of `inner` (one head or a fold
    ensemble). The weights are fitted on out-of-fold branch scores (`training.stacking`), so
    each label leans on the modality that predicts it: a weak image branch no longer drags the
    caption's confident labels down, as an equal-weight mean does.

    An item with one modality is answered by that branch of `inner` as it is: the weights were
    fitted on both branches together, so one weighted term alone is no fitted model."""

    branches = ("image", "text")

    def __init__(self, inner: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.inner = inner
        self.needs = inner.needs
        self.decision = "threshold"
        self.takes_unpaired = inner.takes_unpaired
        self.weight = nn.Parameter(torch.full((num_classes, len(self.branches)), 1 / len(self.branches)),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(num_classes), requires_grad=False)

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        out = self.inner(batch)
        z = torch.stack([out.branches[b] for b in self.branches], dim=-1)  # (N, C, B)
        return HeadOutput(logits=(z * self.weight).sum(-1) + self.bias, branches=out.branches)

    def branch_only(self, batch: FeatureBatch, branch: str) -> torch.Tensor:
        return self.inner.branch_only(batch, branch)


def can_stack(head_class: type) -> bool:
    """Stacking needs a complete classifier per modality whose labels are one set (not union)."""
    from .late import LateFusionHead

    return issubclass(head_class, LateFusionHead) and head_class.decision != "union"
