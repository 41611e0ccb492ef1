"""The one image loader every stage that decodes images uses (feature extraction, fine-tuning):
`ImageItems` decodes (and augments) each item, `collate_images` batches them, `image_loader` runs
DataLoader workers over them. So those stages decode, augment, batch and report a bad image the
same way. Apart from `mmtag.data.images` because it needs torch, which reading a CSV and checking
its images do not.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .augment import ImageAugment
from .dataset import Dataset
from .images import ImageDecodeError, decode_image, normalize_images
from ..errors import DataError

ImageItem = tuple[int, int | None]  # (position, augmentation seed; None = the plain view)


@dataclass
class ImageBatch:
    """What a DataLoader worker hands over: the decoded images stacked into one tensor (sent
    through shared memory, where a list of arrays would be pickled through a pipe), the positions
    they belong to, and (position, reason) for each image that failed to decode."""

    items: list[int]
    images: torch.Tensor | None  # None when every image of the batch failed
    errors: list[tuple[int, str]]


class ImageItems(torch.utils.data.Dataset):
    """The image Dataset of every stage that decodes images (feature extraction, fine-tuning):
    decode, then augment when the item carries a seed; batch with `collate_images`.

    Items are (position, seed). A plain view stays uint8 (a quarter of float32's bytes to hand
    to the main process, which normalises whole batches with `normalize_images`); an augmented
    view is normalised here, since augmentation works on normalised floats. The seed travels with
    the item, so a view does not depend on which worker decodes it or in which order. A file that
    cannot be decoded yields its reason instead of raising, so the caller decides whether the
    row is skipped or stops the run; `error` turns it into the DataError either way.
    """

    def __init__(self, paths: Sequence[Path], size: int, augment: ImageAugment | None = None, *,
                 source: Dataset | None = None, rows: Sequence[int] | None = None) -> None:
        """`source`: the Dataset the paths come from, so errors name its file and row; `rows`:
        the source row of each position (default: position = row)."""
        self.paths = list(paths)
        self.size = size
        self.augment = augment
        self.source = source
        self.rows = list(rows) if rows is not None else None

    @classmethod
    def from_dataset(cls, dataset: Dataset, size: int,
                     augment: ImageAugment | None = None) -> "ImageItems":
        """Every row's image, in row order."""
        return cls([dataset.image_path(i) for i in range(len(dataset))], size, augment,
                   source=dataset)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: ImageItem) -> tuple[int, torch.Tensor | None, str]:
        i, seed = item
        try:
            x = torch.from_numpy(decode_image(self.paths[i], self.size))
        except ImageDecodeError as exc:  # whatever the decoder raised, unreadable files included
            return i, None, str(exc)
        if seed is not None and self.augment is not None:
            x = self.augment(normalize_images(x), seed=seed)
        return i, x.contiguous(), ""

    def error(self, position: int, reason: str) -> DataError:
        """The DataError for an image that failed to decode: the CSV, row and line when the
        images come from a Dataset, else the image file itself."""
        path = self.paths[position]
        if self.source is None:
            return DataError(path, reason)
        row = self.rows[position] if self.rows is not None else position
        return DataError(self.source.path, f"image {str(path)!r}: {reason}",
                         **self.source.where(row))


def collate_images(batch: list[tuple[int, torch.Tensor | None, str]]) -> ImageBatch:
    """Stack the decoded images of a batch (all plain or all augmented); failures are listed."""
    good = [(i, x) for i, x, _ in batch if x is not None]
    return ImageBatch(items=[i for i, _ in good],
                      images=torch.stack([x for _, x in good]) if good else None,
                      errors=[(i, msg) for i, x, msg in batch if x is None])


def image_batches(seeds: Sequence[int | None], batch_size: int) -> list[list[ImageItem]]:
    """Positions 0..len(seeds)-1 in order, in batches of `batch_size`, each with its seed."""
    return [[(j, seeds[j]) for j in range(start, min(start + batch_size, len(seeds)))]
            for start in range(0, len(seeds), batch_size)]


def image_loader(items: ImageItems, batches: Sequence[list[ImageItem]],
                 workers: int) -> Iterable[ImageBatch]:
    """`batches` of `items`, decoded by `workers` DataLoader processes (0: in this process),
    yielded in order as `ImageBatch`es."""
    return torch.utils.data.DataLoader(items, batch_sampler=batches, num_workers=workers,
                                       collate_fn=collate_images, persistent_workers=False)
