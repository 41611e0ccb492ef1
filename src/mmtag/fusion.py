"""Classification heads over cached features, one registry for all of them.

A head declares which feature kinds it `needs`; the trainer feeds exactly those. Late-fusion heads
also return each modality's own logits (`HeadOutput.branches`), which the loss supervises too, so
every branch is a working classifier on its own.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .errors import MmtagError


@dataclass
class FeatureBatch:
    """A batch of features as float32 tensors; kinds a head does not need stay None."""

    image: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None
    text: torch.Tensor | None = None

    def __len__(self) -> int:
        for t in (self.image, self.image_tokens, self.text):
            if t is not None:
                return int(t.shape[0])
        return 0


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


class Head(nn.Module):
    """Base class: `needs` lists the feature kinds read from a FeatureBatch."""

    needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, dims: dict[str, int], num_classes: int, hidden: int = 512,
                 dropout: float = 0.2) -> None:
        super().__init__()
        missing = [k for k in self.needs if k not in dims]
        if missing:
            raise MmtagError(f"head '{type(self).__name__}' needs features {missing}")

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        raise NotImplementedError


HEADS: dict[str, type[Head]] = {}


def register_head(name: str) -> Callable[[type[Head]], type[Head]]:
    def wrap(cls: type[Head]) -> type[Head]:
        HEADS[name] = cls
        return cls
    return wrap


def create_head(name: str, dims: dict[str, int], num_classes: int, *, hidden: int = 512,
                dropout: float = 0.2) -> Head:
    """Instantiate a registered head by name."""
    cls = HEADS.get(name)
    if cls is None:
        raise MmtagError(f"unknown fusion head '{name}'; available: {', '.join(sorted(HEADS))}")
    return cls(dims, num_classes, hidden=hidden, dropout=dropout)


def head_needs(name: str) -> tuple[str, ...]:
    cls = HEADS.get(name)
    if cls is None:
        raise MmtagError(f"unknown fusion head '{name}'; available: {', '.join(sorted(HEADS))}")
    return cls.needs


@register_head("image")
class ImageHead(Head):
    """Image-only: MLP on the pooled image vector."""

    needs = ("image",)

    def __init__(self, dims: dict[str, int], num_classes: int, hidden: int = 512,
                 dropout: float = 0.2) -> None:
        super().__init__(dims, num_classes, hidden, dropout)
        self.net = mlp(dims["image"], hidden, num_classes, dropout)

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        return HeadOutput(self.net(batch.image))


@register_head("text")
class TextHead(Head):
    """Text-only: MLP on the pooled caption vector."""

    needs = ("text",)

    def __init__(self, dims: dict[str, int], num_classes: int, hidden: int = 512,
                 dropout: float = 0.2) -> None:
        super().__init__(dims, num_classes, hidden, dropout)
        self.net = mlp(dims["text"], hidden, num_classes, dropout)

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        return HeadOutput(self.net(batch.text))


def projection(in_dim: int, out_dim: int, input_dropout: float = 0.0) -> nn.Sequential:
    """LayerNorm → Dropout → Linear → GELU: brings a modality to a common width and scale."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Dropout(input_dropout), nn.Linear(in_dim, out_dim),
                         nn.GELU())


# 1280-d pooled image vectors overfit small training sets far faster than 384-d caption vectors;
# dropping half of the image inputs while training gave +0.6 points of validation sample-F1 for
# concat fusion on coco-real (see bench/foundation.py) and costs nothing at inference.
IMAGE_INPUT_DROPOUT = 0.5
PROJ_DIM = 256


@register_head("concat")
class ConcatHead(Head):
    """Early fusion: each modality projected to the same width (so the 1280-d image vector cannot
    drown the 384-d caption vector), concatenated, then an MLP. Each projection also feeds a linear
    auxiliary classifier whose loss makes it informative on its own."""

    needs = ("image", "text")

    def __init__(self, dims: dict[str, int], num_classes: int, hidden: int = 512,
                 dropout: float = 0.2) -> None:
        super().__init__(dims, num_classes, hidden, dropout)
        self.image = projection(dims["image"], PROJ_DIM, IMAGE_INPUT_DROPOUT)
        self.text = projection(dims["text"], PROJ_DIM)
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * PROJ_DIM, hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        self.aux_image = nn.Linear(PROJ_DIM, num_classes)
        self.aux_text = nn.Linear(PROJ_DIM, num_classes)

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        zi, zt = self.image(batch.image), self.text(batch.text)
        return HeadOutput(self.net(torch.cat([zi, zt], dim=1)),
                          {"image": self.aux_image(zi), "text": self.aux_text(zt)})


@register_head("mean")
class MeanHead(Head):
    """Late fusion: an image MLP and a text MLP, final logits are the mean of the two."""

    needs = ("image", "text")

    def __init__(self, dims: dict[str, int], num_classes: int, hidden: int = 512,
                 dropout: float = 0.2) -> None:
        super().__init__(dims, num_classes, hidden, dropout)
        self.image = mlp(dims["image"], hidden, num_classes, dropout)
        self.text = mlp(dims["text"], hidden, num_classes, dropout)

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        li, lt = self.image(batch.image), self.text(batch.text)
        return HeadOutput((li + lt) / 2, {"image": li, "text": lt})
