"""Early-fusion heads averaged with per-modality branches (`concat+mean`, `xattn+mean`)."""
from __future__ import annotations

from typing import Any, ClassVar

from .base import FeatureBatch, Head, HeadOutput
from .cross_attention import CrossAttentionHead
from .early import ConcatHead
from .late import LateFusionHead


class MeanWithBranchesHead(LateFusionHead):
    """An early-fusion head (`fused`) whose logits are averaged with a separate image MLP's and
    text MLP's (the "FM2"/"FM3" references): the fused head captures cross-modal evidence, the
    single-modality classifiers stay usable where fusion overfits, and averaging hedges between
    them. The fused head's logits are a branch named `fused_name`, so it is supervised as a
    classifier on its own; its auxiliary branches stay supervised too, renamed
    `<fused_name>_<branch>` so they do not collide with the MLP branches "image" and "text"."""

    fused_cls: ClassVar[type[Head]]
    fused_name: ClassVar[str]

    def __init__(self, dims: dict[str, int], num_classes: int, **params: Any) -> None:
        # `params` are this class's `params`: the fused head's, which include hidden and dropout
        super().__init__(dims, num_classes, hidden=params["hidden"], dropout=params["dropout"])
        self.fused = self.fused_cls(dims, num_classes, **params)

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        b = self.branch_logits(batch)
        f = self.fused(batch)
        branches = {**b, self.fused_name: f.logits,
                    **{f"{self.fused_name}_{k}": v for k, v in f.branches.items()}}
        return HeadOutput((f.logits + b["image"] + b["text"]) / 3, branches)


class ConcatMeanHead(MeanWithBranchesHead):
    """`concat` averaged with an image MLP and a text MLP (reference "FM2")."""

    needs = ConcatHead.needs
    params = ConcatHead.params
    fused_cls = ConcatHead
    fused_name = "concat"


class CrossAttentionMeanHead(MeanWithBranchesHead):
    """`xattn` averaged with an image MLP and a text MLP (reference "FM3")."""

    needs = CrossAttentionHead.needs
    params = CrossAttentionHead.params
    fused_cls = CrossAttentionHead
    fused_name = "xattn"
