"""`mmtag check`: validate a dataset without training (every row parsed, every image decoded)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..config import DataConfig
from ..data import RepeatedIds, check_images_decode, locate_images, read_csv, repeated_ids
from ..errors import DataError, MmtagError


@dataclass
class CheckReport:
    """What `mmtag check` found in a dataset (nothing trained, nothing written)."""

    path: Path
    rows: int  # data rows read, bad ones included
    labelled: bool
    # label → rows carrying it; the label is its id, or its name for named labels (`cat dog`)
    label_counts: dict[int | str, int]
    bad_rows: list[DataError]  # rows the reader refuses (quoting, labels, empty captions, paths)
    missing_images: list[DataError]
    corrupt_images: list[DataError]
    duplicate_ids: dict[str, int]  # ImageID → times it occurs (only those occurring twice or more)
    # what each repetition is: several captions of one image (not a problem: each row trains,
    # and splits keep them together), copied rows, or the same image and caption with
    # different labels
    repeated: RepeatedIds = RepeatedIds({}, {}, {})

    @property
    def problems(self) -> int:
        return (len(self.bad_rows) + len(self.missing_images) + len(self.corrupt_images)
                + len(self.repeated.copies) + len(self.repeated.conflicts))


def check(csv_path: str | Path, images: str | Path | None = None, *, progress: bool = True,
          image_col: str | None = None, caption_col: str | None = None,
          labels_col: str | None = None, label_sep: str | None = None,
          image_ext: str | None = None) -> CheckReport:
    """Validate a dataset without training: every row parsed, every image opened and decoded.
    The keyword arguments say how the CSV is laid out (see `DataConfig.csv_format`)."""
    fmt = DataConfig().csv_format(image_col=image_col, caption_col=caption_col,
                                  labels_col=labels_col, label_sep=label_sep, image_ext=image_ext)
    if images is not None and not Path(images).is_dir():
        raise MmtagError(f"{images}: images directory not found")
    result = read_csv(csv_path, images_dir=images, skip_bad=True, csv_format=fmt)
    d = result.dataset
    counts: Counter[int] = Counter(label for row in (d.labels or []) for label in set(row))
    dup = {i: n for i, n in Counter(d.image_ids).items() if n > 1}
    missing: list[DataError] = []
    corrupt: list[DataError] = []
    escaped: list[DataError] = []
    if images is not None:
        files = locate_images(d)  # ImageIDs lacking their extension: one error, raised
        escaped, missing = files.outside, files.missing  # a symlink leading outside: a bad row
        _, corrupt = check_images_decode(d.subset(files.present), skip_bad=True, progress=progress)
    label_counts: dict[int | str, int] = {
        (d.vocab.token(i) if d.vocab.named else i): n for i, n in sorted(counts.items())}
    return CheckReport(path=Path(csv_path), rows=len(d) + len(result.skipped), labelled=d.labelled,
                       label_counts=label_counts,
                       bad_rows=sorted(result.skipped + escaped, key=lambda e: e.row or 0),
                       missing_images=missing, corrupt_images=corrupt, duplicate_ids=dup,
                       repeated=repeated_ids(d))
