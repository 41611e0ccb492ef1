"""Rows that must stay on one side of every split: those that share an image or a caption.

A COCO-style CSV lists one image on several rows (a caption each), and the competition's CSV
repeats captions word for word. A row validated against a copy of itself in the training part
makes every choice made on validation (the epoch, the thresholds, the decision rule, the
stacker's weights) and every figure reported out of fold optimistic: on coco-real with five
captions per image, ungrouped folds overstated held-out sample-F1 by 1.6 points (issue 31).
So rows are joined into groups (connected components: an image shared with one row and a
caption with another joins all three) and splits are drawn over groups.

An image is its file's bytes where the file can be read (two ImageIDs of one picture are one
image), else its ImageID (text-only data names its images without shipping them). A caption is
its text with case and runs of whitespace ignored.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dataset import Dataset
from ..errors import MmtagError


def file_digest(path: str | Path, algorithm: str = "sha1") -> str:
    """A hash of a file's bytes, read in chunks. SHA-1: the identity of an image (the feature
    cache's key too); SHA-256: the weight and bundle files' checksums."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def caption_identity(caption: str) -> str:
    return " ".join(caption.lower().split())


@dataclass(frozen=True)
class RowGroups:
    """Each row's group (0..n_groups-1, numbered in order of first row) and why rows joined."""

    of: np.ndarray  # (N,) group id of each row
    by_image: int  # rows that share their image with another row
    by_caption: int  # rows that share their caption with another row

    @property
    def n_groups(self) -> int:
        return int(self.of.max()) + 1 if len(self.of) else 0

    @property
    def grouped_rows(self) -> int:
        """Rows in a group of two or more."""
        sizes = np.bincount(self.of)
        return int(sizes[sizes > 1].sum())

    @property
    def trivial(self) -> bool:
        """Every row is its own group: a split over groups is a split over rows."""
        return self.n_groups == len(self.of)

    def to_rows(self, group_index: np.ndarray) -> np.ndarray:
        """The rows (ascending) of the groups `group_index`."""
        return np.flatnonzero(np.isin(self.of, group_index))


def row_groups(data: Dataset) -> RowGroups:
    """The groups of `data`'s rows: rows sharing an image or a caption are one group."""
    n = len(data)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    shared = {"image": np.zeros(n, dtype=bool), "caption": np.zeros(n, dtype=bool)}
    for kind, keys in (("image", image_keys(data)), ("caption", map(caption_identity, data.captions))):
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            j = first.setdefault(key, i)
            if j != i:
                shared[kind][i] = shared[kind][j] = True
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    _, of = np.unique(roots, return_inverse=True)  # roots ascend with their first row
    return RowGroups(of=of.astype(np.int64), by_image=int(shared["image"].sum()),
                     by_caption=int(shared["caption"].sum()))


def image_keys(data: Dataset) -> list[str]:
    """Each row's image identity: its file's bytes where it can be read, else its ImageID."""
    keys = []
    for i, image_id in enumerate(data.image_ids):
        key = "id:" + image_id
        if data.images_dir is not None:
            try:
                key = "bytes:" + file_digest(data.image_path(i))
            except (OSError, MmtagError):
                pass  # a missing file is its ImageID; reading it is another step's error
        keys.append(key)
    return keys


@dataclass(frozen=True)
class RepeatedIds:
    """The ImageIDs a CSV lists on more than one row, by what the repetition is (rows 1-based)."""

    # several captions of one image, one per row (COCO, Flickr30k): a way to give more text
    caption_groups: dict[str, list[int]]
    # the same image and caption on several rows with the same labels: a copied row
    copies: dict[str, list[int]]
    # the same image and caption with different labels: the data contradicts itself
    conflicts: dict[str, list[int]]


def repeated_ids(data: Dataset) -> RepeatedIds:
    """What each ImageID listed on several rows of `data` is: captions, copies or conflicts."""
    rows_of: dict[str, list[int]] = {}
    for i, image_id in enumerate(data.image_ids):
        rows_of.setdefault(image_id, []).append(i)
    groups: dict[str, list[int]] = {}
    copies: dict[str, list[int]] = {}
    conflicts: dict[str, list[int]] = {}
    for image_id, rows in rows_of.items():
        if len(rows) < 2:
            continue
        by_caption: dict[str, list[int]] = {}
        for i in rows:
            by_caption.setdefault(caption_identity(data.captions[i]), []).append(i)
        number = [data.rows[i] if data.rows else i + 1 for i in rows]
        if len(by_caption) > 1:
            groups[image_id] = number
        for same in by_caption.values():
            if len(same) < 2:
                continue
            labels = {tuple(sorted(set(data.labels[i]))) for i in same} if data.labels else {()}
            into = conflicts if len(labels) > 1 else copies
            into.setdefault(image_id, []).extend(data.rows[i] if data.rows else i + 1 for i in same)
    return RepeatedIds(caption_groups=groups, copies=copies, conflicts=conflicts)
