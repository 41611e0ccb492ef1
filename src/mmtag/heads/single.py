"""Single-modality heads: an MLP on one modality's pooled vector."""
from __future__ import annotations

from typing import ClassVar

from .base import FeatureBatch, Head, HeadOutput, mlp


class SingleModalityHead(Head):
    """An MLP on one modality's pooled vector; the other modality is never read."""

    modality: ClassVar[str]

    def __init__(self, dims: dict[str, int], num_classes: int, *, hidden: int,
                 dropout: float) -> None:
        super().__init__(dims, num_classes, hidden=hidden, dropout=dropout)
        self.net = mlp(dims[self.modality], hidden, num_classes, dropout)

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        return HeadOutput(self.net(batch[self.modality]))


class ImageHead(SingleModalityHead):
    """Image-only: MLP on the pooled image vector."""

    modality = "image"
    needs = ("image",)


class TextHead(SingleModalityHead):
    """Text-only: MLP on the pooled caption vector."""

    modality = "text"
    needs = ("text",)
    takes_unpaired = True
