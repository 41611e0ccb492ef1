"""`mmtag check`: validate a dataset without training (every row parsed, every image decoded)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..data import check_images_decode, read_csv
from ..errors import DataError, MmtagError


@dataclass
class CheckReport:
    """What `mmtag check` found in a dataset (nothing trained, nothing written)."""

    path: Path
    rows: int  # data rows read, bad ones included
    labelled: bool
    label_counts: dict[int, int]  # label id → rows carrying it
    bad_rows: list[DataError]  # rows the reader refuses (quoting, labels, empty captions, paths)
    missing_images: list[DataError]
    corrupt_images: list[DataError]
    duplicate_ids: dict[str, int]  # ImageID → times it occurs (only those occurring twice or more)

    @property
    def problems(self) -> int:
        return (len(self.bad_rows) + len(self.missing_images) + len(self.corrupt_images)
                + len(self.duplicate_ids))


def check(csv_path: str | Path, images: str | Path | None = None, *,
          progress: bool = True) -> CheckReport:
    """Validate a dataset without training: every row parsed, every image opened and decoded."""
    if images is not None and not Path(images).is_dir():
        raise MmtagError(f"{images}: images directory not found")
    result = read_csv(csv_path, images_dir=images, skip_bad=True)
    d = result.dataset
    counts: Counter[int] = Counter(label for row in (d.labels or []) for label in set(row))
    dup = {i: n for i, n in Counter(d.image_ids).items() if n > 1}
    missing: list[DataError] = []
    corrupt: list[DataError] = []
    escaped: list[DataError] = []
    if images is not None:
        present = []
        for i in range(len(d)):
            try:
                path = d.image_path(i)
            except DataError as err:  # a symlink leading outside the images directory: a bad row
                escaped.append(err)
                continue
            if path.is_file():
                present.append(i)
            else:
                missing.append(DataError(d.path, f"image {str(path)!r} not found", **d.where(i)))
        _, corrupt = check_images_decode(d.subset(present), skip_bad=True, progress=progress)
    return CheckReport(path=Path(csv_path), rows=len(d) + len(result.skipped), labelled=d.labelled,
                       label_counts=dict(sorted(counts.items())),
                       bad_rows=sorted(result.skipped + escaped, key=lambda e: e.row or 0),
                       missing_images=missing, corrupt_images=corrupt, duplicate_ids=dup)
