"""The dataset types: `LabelSpace` (the ordered label ids a model predicts), `Dataset` (the rows
of one CSV and where each came from) and the seeded train/validation split.

`mmtag.data.reader` builds a Dataset from a CSV; `mmtag.data.images` decodes its images.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .coco import COCO_NAMES
from ..errors import DataError


@dataclass(frozen=True)
class LabelSpace:
    """The ordered set of label ids a model predicts, with display names."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_labels(cls, labels: list[list[int]], names: dict[int, str] | None = None) -> "LabelSpace":
        """Infer the label space from training labels (sorted ids)."""
        ids = tuple(sorted({label for row in labels for label in row}))
        lookup = names if names is not None else COCO_NAMES
        return cls(ids=ids, names=tuple(lookup.get(i, str(i)) for i in ids))

    def __len__(self) -> int:
        return len(self.ids)

    def encode(self, labels: list[list[int]]) -> np.ndarray:
        """Label lists → (N, C) 0/1 float32 matrix; ids outside the space are ignored (see
        `unknown` for what was ignored: evaluation must not hide them)."""
        index = {label: j for j, label in enumerate(self.ids)}
        y = np.zeros((len(labels), len(self.ids)), dtype=np.float32)
        for i, row in enumerate(labels):
            for label in row:
                j = index.get(label)
                if j is not None:
                    y[i, j] = 1.0
        return y

    def unknown(self, labels: list[list[int]]) -> dict[int, int]:
        """Label ids outside this space → number of rows carrying each (sorted by id)."""
        known = set(self.ids)
        counts = Counter(label for row in labels for label in set(row) if label not in known)
        return dict(sorted(counts.items()))

    def decode(self, mask: np.ndarray) -> list[list[int]]:
        """(N, C) boolean matrix → label id lists in label-space order."""
        return [[self.ids[j] for j in np.flatnonzero(row)] for row in mask]

    def to_dict(self) -> dict[str, list]:
        return {"ids": list(self.ids), "names": list(self.names)}

    @classmethod
    def from_dict(cls, raw: dict[str, list]) -> "LabelSpace":
        return cls(ids=tuple(int(i) for i in raw["ids"]), names=tuple(str(n) for n in raw["names"]))


@dataclass
class Dataset:
    """Rows of one CSV: image ids, captions, optional labels, and where the rows came from."""

    path: Path
    image_ids: list[str]
    captions: list[str]
    labels: list[list[int]] | None
    images_dir: Path | None = None
    rows: list[int] = field(default_factory=list)  # 1-based data row of each item, for messages
    lines: list[int] = field(default_factory=list)  # physical line where each record starts

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def label_rows(self) -> list[list[int]]:
        """Every row's label ids; a DataError naming the file when it has no Labels column."""
        if self.labels is None:
            raise DataError(self.path, "needs a Labels column")
        return self.labels

    def image_path(self, i: int) -> Path:
        """`<images>/<ImageID>`; DataError (with the row) when it resolves outside the images
        directory through a symlink, the way `check_image_id` refuses `../` in the id itself."""
        if self.images_dir is None:
            raise DataError(self.path, "no images directory given (--images)")
        path = self.images_dir / self.image_ids[i]
        # Checked on every call, so no path handed out (to a decoder, a report) skips the check.
        try:
            target = path.resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop, before Python 3.13
            raise DataError(self.path, f"image {self.image_ids[i]!r}: cannot resolve its path "
                            f"({exc})", **self.where(i)) from None
        if not target.is_relative_to(self.images_dir.resolve()):
            raise DataError(self.path, f"image {self.image_ids[i]!r} is a symlink that resolves "
                            f"outside the images directory (to {str(target)!r})", **self.where(i))
        return path

    def subset(self, index: list[int] | np.ndarray) -> "Dataset":
        idx = [int(i) for i in index]
        return Dataset(
            path=self.path,
            image_ids=[self.image_ids[i] for i in idx],
            captions=[self.captions[i] for i in idx],
            labels=None if self.labels is None else [self.labels[i] for i in idx],
            images_dir=self.images_dir,
            rows=[self.rows[i] for i in idx] if self.rows else [],
            lines=[self.lines[i] for i in idx] if self.lines else [],
        )

    def where(self, i: int) -> dict[str, int | None]:
        """Row/line keywords for a DataError about item i."""
        return {"row": self.rows[i] if self.rows else None,
                "line": self.lines[i] if self.lines else None}


def train_val_split(n: int, val_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split → (train_idx, val_idx), both sorted; at least one item in each."""
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"val_frac must be in (0, 1), got {val_frac}")
    if n < 2:
        raise ValueError(f"need at least 2 rows to split off validation, got {n}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = min(max(1, int(math.floor(n * val_frac + 0.5))), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
