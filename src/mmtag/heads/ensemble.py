"""The fold ensemble of a cross-fitted model (`--folds K`): K heads of one kind, trained on
different folds, whose logits (and each branch's) are averaged. Built from the config, so a
bundle rebuilds it as it rebuilds a single head."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .base import FeatureBatch, Head, HeadOutput
from .registry import create_head


class FoldEnsemble(nn.Module):
    """Averages its members' outputs; it reads, decides and takes unpaired rows as they do."""

    def __init__(self, members: list[Head]) -> None:
        super().__init__()
        if not members or len({type(m) for m in members}) != 1:
            raise ValueError("a fold ensemble needs one or more heads of one kind")
        self.members = nn.ModuleList(members)
        self.needs = members[0].needs
        self.decision = members[0].decision
        self.takes_unpaired = members[0].takes_unpaired

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        outs = [m(batch) for m in self.members]
        return HeadOutput(logits=torch.stack([o.logits for o in outs]).mean(0),
                          branches={k: torch.stack([o.branches[k] for o in outs]).mean(0)
                                    for k in outs[0].branches})


def create_model_head(name: str, dims: dict[str, int], num_classes: int, model: ModelConfig,
                      folds: int = 1) -> nn.Module:
    """The head a fitted model holds: one head, or with `folds` > 1 an ensemble of that many."""
    if folds <= 1:
        return create_head(name, dims, num_classes, model)
    return FoldEnsemble([create_head(name, dims, num_classes, model) for _ in range(folds)])
