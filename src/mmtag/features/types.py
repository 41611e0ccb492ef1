"""The containers features travel in: `Features` (arrays keyed by feature kind, row-aligned with
a Dataset), `FeatureSet` (features plus the rows they belong to), and helpers over them."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..data import Dataset
from ..errors import DataError, MmtagError

# Every feature kind and the modality whose encoder makes it: the one place a kind is routed to
# its modality (`modality_of`). A new modality adds its kinds here. "image_max" (the spatial
# tokens max-pooled) is read by no head: the Featurizer joins it to "image" under
# `model.image_pool` mean+max (see `IMAGE_POOL_KINDS`).
KIND_MODALITY = {"image": "image", "image_tokens": "image", "text": "text", "image_max": "image"}
FEATURE_KINDS = tuple(KIND_MODALITY)

# `model.image_pool` → the cached kinds whose concatenation is the "image" vector heads read.
# Max pooling is a kind of its own, computed from the spatial tokens alongside the mean, rather
# than taken from the cached "image_tokens" when a head asks for it: the tokens are 49 vectors
# per image (125 KB at fp16 for Lite0's 7x7x1280, 49x the pooled vector) in the cache and in
# memory, and they are cached only for heads that read them (xattn), so reading them would
# save no extraction either. A kind of its own costs one more vector per image, leaves every
# head's `needs`, the bundle's checks and the branches that answer alone as they are (they read
# "image"), and needs no change to any encoder or ONNX graph (`extract.encode_images`).
IMAGE_POOL_KINDS = {"mean": ("image",), "mean+max": ("image", "image_max")}


class Features:
    """Per-item encoder outputs keyed by feature kind, row-aligned with a Dataset (fp16 to halve
    memory and disk). A kind is a modality's name ("image", "text"), or that name with a
    suffix for another output of the same encoder ("image_tokens": the spatial tokens); a new
    modality is a new key, not a new field in every type that carries features."""

    def __init__(self, arrays: dict[str, np.ndarray] | None = None) -> None:
        self.arrays: dict[str, np.ndarray] = dict(arrays or {})
        rows = {len(a) for a in self.arrays.values()}
        if len(rows) > 1:
            raise MmtagError(f"features of different lengths: "
                             f"{ {k: len(a) for k, a in self.arrays.items()} }")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values()))) if self.arrays else 0

    def __contains__(self, kind: object) -> bool:
        return kind in self.arrays

    def __getitem__(self, kind: str) -> np.ndarray:
        return self.arrays[kind]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.arrays)

    def subset(self, index: np.ndarray | list[int]) -> "Features":
        idx = np.asarray(index, dtype=np.int64)
        return Features({k: a[idx] for k, a in self.arrays.items()})

    def get(self, kind: str) -> np.ndarray | None:
        return self.arrays.get(kind)


def modality_of(kind: str) -> str:
    """The modality a feature kind comes from ("image_tokens" → "image"); a kind not in
    `KIND_MODALITY` is an MmtagError naming it, never guessed."""
    try:
        return KIND_MODALITY[kind]
    except (KeyError, TypeError):
        raise MmtagError(f"unknown feature kind {kind!r} (known: {', '.join(FEATURE_KINDS)})") from None


def concat_features(a: Features, b: Features) -> Features:
    """Rows of `a` followed by rows of `b` (kinds present in both)."""
    return Features({k: np.concatenate([a[k], b[k]]) for k in a.kinds if k in b})


@dataclass
class FeatureSet:
    """Features plus the dataset rows they belong to (rows with bad images may be dropped)."""

    features: Features
    dataset: Dataset
    skipped: list[DataError] = field(default_factory=list)
