"""Late fusion: a complete classifier per modality, combined by mean, union or a learned gate."""
from __future__ import annotations

import torch
from torch import nn

from .base import FeatureBatch, Head, HeadOutput, mlp


class LateFusionHead(Head):
    """Shared base of heads that keep a complete classifier per modality: an image MLP and a text
    MLP on the pooled vectors (`self.image`, `self.text`), whose logits the loss supervises as
    branches. Subclasses only decide how the two are combined. Each branch answers alone for an
    item that lacks the other modality (`branch_only`)."""

    needs = ("image", "text")
    branches = ("image", "text")
    takes_unpaired = True

    def __init__(self, dims: dict[str, int], num_classes: int, *, hidden: int,
                 dropout: float) -> None:
        super().__init__(dims, num_classes, hidden=hidden, dropout=dropout)
        self.image = mlp(dims["image"], hidden, num_classes, dropout)
        self.text = mlp(dims["text"], hidden, num_classes, dropout)

    def branch_logits(self, batch: FeatureBatch) -> dict[str, torch.Tensor]:
        """{"image": image-MLP logits, "text": text-MLP logits}."""
        return {b: self.branch_only(batch, b) for b in self.branches}

    def branch_only(self, batch: FeatureBatch, branch: str) -> torch.Tensor:
        """One modality's MLP logits, reading only that modality's pooled vector."""
        if branch not in self.branches:
            return super().branch_only(batch, branch)  # the one-line refusal
        net = self.image if branch == "image" else self.text
        return net(batch[branch])


class MeanHead(LateFusionHead):
    """Late fusion: an image MLP and a text MLP, final logits are the mean of the two."""

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        b = self.branch_logits(batch)
        return HeadOutput((b["image"] + b["text"]) / 2, b)


class UnionHead(LateFusionHead):
    """Late fusion by label-set union: each modality keeps its own classifier and, at decision
    time, its own tuned thresholds; a label is predicted if either modality predicts it. Useful
    when a tag is visible in only one modality (an object the caption omits, a word the image
    cannot show). The logits are the elementwise max of the branches — the union at one shared
    threshold — so the head still works where only one threshold is available."""

    decision = "union"

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        b = self.branch_logits(batch)
        return HeadOutput(torch.maximum(b["image"], b["text"]), b)


class GatedHead(LateFusionHead):
    """Late fusion with learned per-sample modality weights: a small gate network reads both
    (LayerNorm'd) pooled vectors and outputs softmax weights (w_image, w_text), so a blurry photo
    with a detailed caption can lean on the text and vice versa, where `mean` always weighs 1:1.
    The gate's last layer starts at zero, i.e. the head starts as `mean` and learns departures."""

    params = LateFusionHead.params + ("gate_hidden",)

    def __init__(self, dims: dict[str, int], num_classes: int, *, hidden: int, dropout: float,
                 gate_hidden: int) -> None:
        super().__init__(dims, num_classes, hidden=hidden, dropout=dropout)
        self.gate_norm_image = nn.LayerNorm(dims["image"])
        self.gate_norm_text = nn.LayerNorm(dims["text"])
        self.gate = nn.Sequential(nn.Dropout(dropout),
                                  nn.Linear(dims["image"] + dims["text"], gate_hidden), nn.GELU(),
                                  nn.Linear(gate_hidden, 2))
        nn.init.zeros_(self.gate[-1].weight)
        nn.init.zeros_(self.gate[-1].bias)

    def gate_weights(self, batch: FeatureBatch) -> torch.Tensor:
        """(B, 2) softmax weights, column 0 for the image branch and column 1 for the text one."""
        x = torch.cat([self.gate_norm_image(batch["image"]), self.gate_norm_text(batch["text"])], dim=1)
        return torch.softmax(self.gate(x), dim=1)

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        b = self.branch_logits(batch)
        w = self.gate_weights(batch)
        return HeadOutput(w[:, :1] * b["image"] + w[:, 1:] * b["text"], b)
