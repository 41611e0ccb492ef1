"""Early fusion by cross-attention: the caption attends over the image's spatial tokens.

A module of its own, not part of `early`, because `xattn` registers after the late-fusion heads:
the registry's order is what users see (`mmtag ablate` variants, help texts), and `mmtag.heads`
imports the head modules in that order.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import MmtagError
from .base import FeatureBatch, Head, HeadOutput
from .early import EARLY_FUSION_PARAMS, add_projected_pair


class CrossAttention(nn.Module):
    """Multi-head scaled dot-product attention of one query vector per sample over a set of
    tokens, written out (rather than nn.MultiheadAttention) so the weights that are actually used
    can be inspected. Keys and values get separate maps: keys decide where to look, values what is
    carried back."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise MmtagError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) → (B, heads, T, D / heads)."""
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def weights(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, heads, T): softmax over tokens of query·key / sqrt(head width)."""
        q = self._split(self.to_q(query).unsqueeze(1))             # (B, H, 1, d)
        k = self._split(self.to_k(tokens))                         # (B, H, T, d)
        scores = (q @ k.transpose(-1, -2)).squeeze(2) / q.shape[-1] ** 0.5
        return torch.softmax(scores, dim=-1)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, D) query, (B, T, D) tokens → (B, D) attended values."""
        w = self.dropout(self.weights(query, tokens))              # (B, H, T)
        v = self._split(self.to_v(tokens))                         # (B, H, T, d)
        attended = (w.unsqueeze(2) @ v).squeeze(2)                 # (B, H, d)
        return self.out(attended.flatten(1))


class CrossAttentionHead(Head):
    """Early fusion by cross-attention: the pooled caption asks *where* in the image to look. The
    caption vector (one query) attends over the image's spatial tokens (keys and values), both
    brought to proj_dim by parallel LayerNorm+Linear maps; the attended vector is added back to the
    query (residual) and normalised. The pooled image throws away the spatial detail a caption may
    point at ("a dog *next to* a bicycle"); attention recovers it. The result is concatenated with
    the projected pooled image and text (as in `concat`) and classified by an MLP; linear
    auxiliary classifiers on the two projections are supervised as branches. Tokens carry no
    position encoding, so the head treats them as a set: their order does not matter."""

    needs = ("image", "image_tokens", "text")
    params = EARLY_FUSION_PARAMS + ("attention_heads",)

    def __init__(self, dims: dict[str, int], num_classes: int, *, hidden: int, dropout: float,
                 proj_dim: int, image_input_dropout: float, attention_heads: int) -> None:
        super().__init__(dims, num_classes, hidden=hidden, dropout=dropout)
        self.query = nn.Sequential(nn.LayerNorm(dims["text"]), nn.Linear(dims["text"], proj_dim))
        self.tokens = nn.Sequential(nn.LayerNorm(dims["image_tokens"]),
                                    nn.Linear(dims["image_tokens"], proj_dim))
        self.attn = CrossAttention(proj_dim, attention_heads, dropout)
        self.attn_norm = nn.LayerNorm(proj_dim)
        add_projected_pair(self, dims, num_classes, hidden, dropout, proj_dim, image_input_dropout,
                           3 * proj_dim)

    def attention_weights(self, batch: FeatureBatch) -> torch.Tensor:
        """(B, heads, T): how much each attention head of each caption looks at each token."""
        return self.attn.weights(self.query(batch["text"]), self.tokens(batch["image_tokens"]))

    def attend(self, batch: FeatureBatch) -> torch.Tensor:
        """(B, proj_dim): LayerNorm(query + attention of the caption query over image tokens)."""
        q = self.query(batch["text"])
        return self.attn_norm(q + self.attn(q, self.tokens(batch["image_tokens"])))

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        zi, zt = self.image(batch["image"]), self.text(batch["text"])
        fused = torch.cat([self.attend(batch), zi, zt], dim=1)
        return HeadOutput(self.net(fused), {"image": self.aux_image(zi), "text": self.aux_text(zt)})
