"""Classification heads over cached features, one registry for all of them.

A head declares which feature kinds it `needs`; the trainer feeds exactly those. Late-fusion heads
also return each modality's own logits (`HeadOutput.branches`), which the loss supervises too, so
every branch is a working classifier on its own. A head's hyper-parameters are `model.*` config
options that it names in `params`, so they are set in config.yaml and saved with the bundle.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import MmtagError


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


class Head(nn.Module):
    """Base class: `needs` lists the feature kinds read from a FeatureBatch; `decision` says how
    logits become labels: "threshold" (one threshold set on `HeadOutput.logits`) or "union" (each
    branch gets its own tuned thresholds and the label sets are united — the final logits are then
    only a summary, so code that decides must look at the branches). `takes_unpaired`: the head
    can also learn from captions that have no image (`--extra-text`), because its text part is a
    complete classifier on its own.

    `params` names the `ModelConfig` fields the constructor takes as keyword arguments;
    `create_head` passes exactly those from the run's config. A head with a hyper-parameter of its
    own adds one field (with its allowed range) to `ModelConfig` and names it here: no caller
    changes, and the value is saved in the bundle's config.yaml and used again when it loads."""

    needs: ClassVar[tuple[str, ...]] = ()
    decision: ClassVar[str] = "threshold"
    takes_unpaired: ClassVar[bool] = False
    params: ClassVar[tuple[str, ...]] = ("hidden", "dropout")

    def __init__(self, dims: dict[str, int], num_classes: int, *, hidden: int,
                 dropout: float) -> None:
        super().__init__()
        missing = [k for k in self.needs if k not in dims]
        if missing:
            raise MmtagError(f"head '{type(self).__name__}' needs features {missing}")

    @classmethod
    def params_problem(cls, model: ModelConfig) -> tuple[str, str] | None:
        """(option, problem) when `model`'s values of `params` cannot build this head together
        (each value's own range is checked by the config); None when they can."""
        return None

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        raise NotImplementedError


HEADS: dict[str, type[Head]] = {}


def register_head(name: str) -> Callable[[type[Head]], type[Head]]:
    def wrap(cls: type[Head]) -> type[Head]:
        HEADS[name] = cls
        return cls
    return wrap


def head_class(name: str) -> type[Head]:
    """The registered head class `name`."""
    cls = HEADS.get(name)
    if cls is None:
        raise MmtagError(f"unknown fusion head '{name}'; available: {', '.join(sorted(HEADS))}")
    return cls


def create_head(name: str, dims: dict[str, int], num_classes: int,
                model: ModelConfig | None = None, **overrides: Any) -> Head:
    """Instantiate the registered head `name`. Its hyper-parameters (`Head.params`) come from
    `model` (the run's `config.model`; ModelConfig's defaults when None), then from `overrides`
    (e.g. `hidden=16` in a test)."""
    cls = head_class(name)
    options = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - options)
    if unknown:
        raise MmtagError(f"unknown head hyper-parameter(s) {unknown}; model options: "
                         f"{', '.join(sorted(options))}")
    source = model if model is not None else ModelConfig()
    kwargs: dict[str, Any] = {}
    for p in cls.params:
        if p not in options:
            raise MmtagError(f"head '{name}' reads hyper-parameter '{p}', which is no model option "
                             "(declare it in config.ModelConfig)")
        kwargs[p] = overrides[p] if p in overrides else getattr(source, p)
    return cls(dims, num_classes, **kwargs)


def head_params_problem(name: str, model: ModelConfig) -> tuple[str, str] | None:
    """(option, problem) when `model`'s hyper-parameters cannot build head `name` (see
    `Head.params_problem`); None when they can."""
    return head_class(name).params_problem(model)


def takes_unpaired(name: str) -> bool:
    """Whether the registered head `name` learns from unpaired captions (see `Head`)."""
    cls = HEADS.get(name)
    return cls is not None and cls.takes_unpaired


def head_needs(name: str) -> tuple[str, ...]:
    return head_class(name).needs


class SingleModalityHead(Head):
    """An MLP on one modality's pooled vector; the other modality is never read."""

    modality: ClassVar[str]

    def __init__(self, dims: dict[str, int], num_classes: int, *, hidden: int,
                 dropout: float) -> None:
        super().__init__(dims, num_classes, hidden=hidden, dropout=dropout)
        self.net = mlp(dims[self.modality], hidden, num_classes, dropout)

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        return HeadOutput(self.net(batch[self.modality]))


@register_head("image")
class ImageHead(SingleModalityHead):
    """Image-only: MLP on the pooled image vector."""

    modality = "image"
    needs = ("image",)


@register_head("text")
class TextHead(SingleModalityHead):
    """Text-only: MLP on the pooled caption vector."""

    modality = "text"
    needs = ("text",)
    takes_unpaired = True


def projection(in_dim: int, out_dim: int, input_dropout: float = 0.0) -> nn.Sequential:
    """LayerNorm → Dropout → Linear → GELU: brings a modality to a common width and scale."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Dropout(input_dropout), nn.Linear(in_dim, out_dim),
                         nn.GELU())


# The early-fusion hyper-parameters (model.proj_dim, model.image_input_dropout): why their
# defaults are what they are is said where they are declared, in config.ModelConfig.
EARLY_FUSION_PARAMS = ("hidden", "dropout", "proj_dim", "image_input_dropout")


def _add_projected_pair(head: nn.Module, dims: dict[str, int], num_classes: int, hidden: int,
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


@register_head("concat")
class ConcatHead(Head):
    """Early fusion: each modality projected to the same width (so the 1280-d image vector cannot
    drown the 384-d caption vector), concatenated, then an MLP. Each projection also feeds a linear
    auxiliary classifier whose loss makes it informative on its own."""

    needs = ("image", "text")
    params = EARLY_FUSION_PARAMS

    def __init__(self, dims: dict[str, int], num_classes: int, *, hidden: int, dropout: float,
                 proj_dim: int, image_input_dropout: float) -> None:
        super().__init__(dims, num_classes, hidden=hidden, dropout=dropout)
        _add_projected_pair(self, dims, num_classes, hidden, dropout, proj_dim, image_input_dropout,
                            2 * proj_dim)

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        zi, zt = self.image(batch["image"]), self.text(batch["text"])
        return HeadOutput(self.net(torch.cat([zi, zt], dim=1)),
                          {"image": self.aux_image(zi), "text": self.aux_text(zt)})


class LateFusionHead(Head):
    """Shared base of heads that keep a complete classifier per modality: an image MLP and a text
    MLP on the pooled vectors (`self.image`, `self.text`), whose logits the loss supervises as
    branches. Subclasses only decide how the two are combined."""

    needs = ("image", "text")
    takes_unpaired = True

    def __init__(self, dims: dict[str, int], num_classes: int, *, hidden: int,
                 dropout: float) -> None:
        super().__init__(dims, num_classes, hidden=hidden, dropout=dropout)
        self.image = mlp(dims["image"], hidden, num_classes, dropout)
        self.text = mlp(dims["text"], hidden, num_classes, dropout)

    def branch_logits(self, batch: FeatureBatch) -> dict[str, torch.Tensor]:
        """{"image": image-MLP logits, "text": text-MLP logits}."""
        return {"image": self.image(batch["image"]), "text": self.text(batch["text"])}


@register_head("mean")
class MeanHead(LateFusionHead):
    """Late fusion: an image MLP and a text MLP, final logits are the mean of the two."""

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        b = self.branch_logits(batch)
        return HeadOutput((b["image"] + b["text"]) / 2, b)


@register_head("union")
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


@register_head("gated")
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


@register_head("xattn")
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
        _add_projected_pair(self, dims, num_classes, hidden, dropout, proj_dim, image_input_dropout,
                            3 * proj_dim)

    @classmethod
    def params_problem(cls, model: ModelConfig) -> tuple[str, str] | None:
        # each attention head reads an equal slice of the projected width
        if model.proj_dim % model.attention_heads:
            return "attention_heads", (f"must divide model.proj_dim ({model.proj_dim}) for head "
                                       f"'xattn', got {model.attention_heads}")
        return None

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

    @classmethod
    def params_problem(cls, model: ModelConfig) -> tuple[str, str] | None:
        return cls.fused_cls.params_problem(model)

    def forward(self, batch: FeatureBatch) -> HeadOutput:
        b = self.branch_logits(batch)
        f = self.fused(batch)
        branches = {**b, self.fused_name: f.logits,
                    **{f"{self.fused_name}_{k}": v for k, v in f.branches.items()}}
        return HeadOutput((f.logits + b["image"] + b["text"]) / 3, branches)


@register_head("concat+mean")
class ConcatMeanHead(MeanWithBranchesHead):
    """`concat` averaged with an image MLP and a text MLP (reference "FM2")."""

    needs = ConcatHead.needs
    params = ConcatHead.params
    fused_cls = ConcatHead
    fused_name = "concat"


@register_head("xattn+mean")
class CrossAttentionMeanHead(MeanWithBranchesHead):
    """`xattn` averaged with an image MLP and a text MLP (reference "FM3")."""

    needs = CrossAttentionHead.needs
    params = CrossAttentionHead.params
    fused_cls = CrossAttentionHead
    fused_name = "xattn"
