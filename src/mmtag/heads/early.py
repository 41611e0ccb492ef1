"""Early fusion by concatenation, and the projected image/text pair every early-fusion head
builds on (`add_projected_pair`, `EARLY_FUSION_PARAMS`)."""
from __future__ import annotations

import torch
from torch import nn

from .base import FeatureBatch, Head, HeadOutput, projection


# The early-fusion hyper-parameters (model.proj_dim, model.image_input_dropout): why their
# defaults are what they are is said where they are declared, in config.ModelConfig.
EARLY_FUSION_PARAMS = ("hidden", "dropout", "proj_dim", "image_input_dropout")


def add_projected_pair(head: nn.Module, dims: dict[str, int], num_classes: int, hidden: int,
                       dropout: float, proj_dim: int, image_input_dropout: float,
                       fused_dim: int) -> None:
    """Give an early-fusion head its pooled-image and pooled-text projections (`image`, `text`),
    the classifier over the fused vector (`net`) and linear auxiliary classifiers on the
    projections (`aux_image`, `aux_text`). Modules are created in this order on purpose: it fixes
    how the seeded random initialisation is consumed, so a seed reproduces earlier runs."""
    head.image = projection(dims["image"], proj_dim, image_input_dropout)
    head.text = projection(dims["text"], proj_dim)
    head.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(fused_dim, hidden), nn.GELU(),
                             nn.Dropout(dropout), nn.Linear(hidden, num_classes))
    head.aux_image = nn.Linear(proj_dim, num_classes)
    head.aux_text = nn.Linear(proj_dim, num_classes)


class ConcatHead(Head):
    """Early fusion: each modality projected to the same width (so the 1280-d image vector cannot
    drown the 384-d caption vector), concatenated, then an MLP. Each projection also feeds a linear
    auxiliary classifier whose loss makes it informative on its own."""

    needs = ("image", "text")
    params = EARLY_FUSION_PARAMS

    def __init__(self, dims: dict[str, int], num_classes: int, *, hidden: int, dropout: float,
                 proj_dim: int, image_input_dropout: float) -> None:
        super().__init__(dims, num_classes, hidden=hidden, dropout=dropout)
        add_projected_pair(self, dims, num_classes, hidden, dropout, proj_dim, image_input_dropout,
                           2 * proj_dim)

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        zi, zt = self.image(batch["image"]), self.text(batch["text"])
        return HeadOutput(self.net(torch.cat([zi, zt], dim=1)),
                          {"image": self.aux_image(zi), "text": self.aux_text(zt)})
