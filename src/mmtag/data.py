"""Reading the competition layout: `ImageID,Labels,Caption` CSVs and images at `<images>/<ImageID>`.

Nothing here drops a row silently: a bad row raises `DataError` naming file, row and line, or, with
`skip_bad=True`, is skipped and reported back in `ReadResult.skipped`.
"""
from __future__ import annotations

import csv
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from .errors import DataError

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

# COCO category ids → names, so reports and the server can say "person" rather than "1".
COCO_NAMES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse",
}

# Pillow refuses images above this many pixels (decompression bombs); 8k × 8k is plenty for photos.
Image.MAX_IMAGE_PIXELS = 64_000_000

# Captions are encoded with a 128-token limit anyway; this bound stops a 100 MB "caption".
MAX_CAPTION_CHARS = 10_000


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
        """Label lists → (N, C) 0/1 float32 matrix; ids outside the space are ignored."""
        index = {label: j for j, label in enumerate(self.ids)}
        y = np.zeros((len(labels), len(self.ids)), dtype=np.float32)
        for i, row in enumerate(labels):
            for label in row:
                j = index.get(label)
                if j is not None:
                    y[i, j] = 1.0
        return y

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

    def image_path(self, i: int) -> Path:
        if self.images_dir is None:
            raise DataError(self.path, "no images directory given (--images)")
        return self.images_dir / self.image_ids[i]

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


@dataclass
class ReadResult:
    """A parsed dataset plus the rows skipped under `skip_bad` (as DataErrors, in file order)."""

    dataset: Dataset
    skipped: list[DataError]


def parse_labels(text: str) -> list[int]:
    """'1 3  19' → [1, 3, 19] (sorted, unique); raises ValueError naming the bad token."""
    out: set[int] = set()
    for token in text.split():
        try:
            value = int(token)
        except ValueError:
            raise ValueError(f"label {token!r} is not an integer") from None
        if value < 0:
            raise ValueError(f"label {token!r} is negative")
        out.add(value)
    return sorted(out)


def check_image_id(image_id: str) -> None:
    """Reject ids that would escape the images directory (absolute paths, '..', drive letters)."""
    if not image_id or image_id != image_id.strip():
        raise ValueError("ImageID is empty or has surrounding spaces")
    posix, win = PurePosixPath(image_id), PureWindowsPath(image_id)
    if posix.is_absolute() or win.is_absolute() or win.drive or ".." in posix.parts or ".." in win.parts:
        raise ValueError(f"ImageID {image_id!r} points outside the images directory")
    if "\x00" in image_id:
        raise ValueError("ImageID contains a NUL byte")


def read_csv(path: str | Path, *, images_dir: str | Path | None = None,
             require_labels: bool = False, skip_bad: bool = False) -> ReadResult:
    """Parse a competition CSV (train: ImageID,Labels,Caption; test: ImageID,Caption).

    A real CSV parser is used, so quoted captions with commas, quotes and embedded CR/LF parse.
    Labels are read when the header has a `Labels` column (required if `require_labels`).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, "is a directory, expected a CSV file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(path, "not valid UTF-8 text", line=line) from None

    # Split physical lines on LF only (keeping the ends), so line numbers match what an editor or
    # `grep -n` shows even when a quoted caption holds a lone CR; the csv module joins the lines
    # of a multi-line quoted field itself. A file with old-Mac CR-only line ends is split on CR.
    physical = re.split(r"(?<=\n)", text) if "\n" in text else re.split(r"(?<=\r)", text)
    physical = [line for line in physical if line]
    if not physical:
        raise DataError(path, "file is empty (expected a header ImageID,Labels,Caption)")

    try:
        header = next(csv.reader([physical[0]], strict=True), [])
    except csv.Error as exc:
        raise DataError(path, f"malformed header ({exc})", line=1) from None
    header = [h.strip() for h in header]
    col = {name: i for i, name in enumerate(header)}
    missing = [c for c in ("ImageID", "Caption") if c not in col]
    if require_labels and "Labels" not in col:
        missing.insert(1, "Labels")
    if missing:
        raise DataError(path, f"missing column(s) {', '.join(missing)}; header is {','.join(header)!r}",
                        line=1)
    has_labels = "Labels" in col

    ids: list[str] = []
    caps: list[str] = []
    labels: list[list[int]] = []
    rows: list[int] = []
    lines: list[int] = []
    skipped: list[DataError] = []
    seen_rows = 0
    start = 1  # index into `physical` of the next record's first line
    while start < len(physical):
        reader = csv.reader(iter(physical[start:]), strict=True)
        record_line = start + 1
        try:
            for record in reader:
                seen_rows += 1
                line = record_line
                record_line = start + reader.line_num + 1
                if not record or all(not f.strip() for f in record):
                    seen_rows -= 1  # blank lines are not rows
                    continue
                try:
                    image_id, caption, row_labels = _parse_record(record, header, col, has_labels)
                except ValueError as exc:
                    err = DataError(path, str(exc), row=seen_rows, line=line)
                    if not skip_bad:
                        raise err from None
                    skipped.append(err)
                    continue
                ids.append(image_id)
                caps.append(caption)
                labels.append(row_labels)
                rows.append(seen_rows)
                lines.append(line)
            break
        except csv.Error as exc:
            message = str(exc)
            if "unexpected end of data" in message or "EOF" in message:
                message = "unterminated quote: a quoted field runs to the end of the file"
            seen_rows += 1
            err = DataError(path, f"malformed CSV ({message})", row=seen_rows, line=record_line)
            if not skip_bad:
                raise err from None
            skipped.append(err)
            # Resume on the line after the broken record's first line, so one stray quote
            # costs one row rather than the rest of the file.
            start = record_line
    dataset = Dataset(path=path, image_ids=ids, captions=caps,
                      labels=labels if has_labels else None,
                      images_dir=Path(images_dir) if images_dir is not None else None,
                      rows=rows, lines=lines)
    return ReadResult(dataset=dataset, skipped=skipped)


def _parse_record(record: list[str], header: list[str], col: dict[str, int],
                  has_labels: bool) -> tuple[str, str, list[int]]:
    if len(record) != len(header):
        raise ValueError(f"has {len(record)} fields, the header has {len(header)}")
    image_id = record[col["ImageID"]].strip()
    check_image_id(image_id)
    caption = record[col["Caption"]].strip()
    if not caption:
        raise ValueError("Caption is empty")
    if len(caption) > MAX_CAPTION_CHARS:
        raise ValueError(f"Caption is {len(caption)} characters long (limit {MAX_CAPTION_CHARS})")
    row_labels: list[int] = []
    if has_labels:
        row_labels = parse_labels(record[col["Labels"]])
        if not row_labels:
            raise ValueError("Labels is empty (every item needs at least one label)")
    return image_id, caption, row_labels


def check_images_exist(dataset: Dataset, *, skip_bad: bool) -> tuple[Dataset, list[DataError]]:
    """Fail (or, with skip_bad, drop) rows whose image file is missing, before any compute."""
    keep: list[int] = []
    skipped: list[DataError] = []
    for i in range(len(dataset)):
        p = dataset.image_path(i)
        if p.is_file():
            keep.append(i)
            continue
        err = DataError(dataset.path, f"image {str(p)!r} not found", **dataset.where(i))
        if not skip_bad:
            raise err
        skipped.append(err)
    return (dataset if not skipped else dataset.subset(keep)), skipped


def decode_image(path: str | Path | Image.Image, size: int) -> np.ndarray:
    """Decode an image to a (3, size, size) uint8 array (see `normalize_images`).

    JPEG draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale, much faster than decoding full
    resolution and shrinking. The whole frame is resized (no crop) so no labelled object is cut off.
    Decoding stops at uint8 because DataLoader workers hand batches to the main process: a uint8
    batch is a quarter of the bytes of a float32 one, and normalising a whole batch at once is
    cheaper than image by image. Raises ValueError with the reason when the file is not usable.
    """
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = path if isinstance(path, Image.Image) else Image.open(path)
        img.draft("RGB", (size, size))
        img = _exif_upright(img)
        if img.mode != "RGB":
            img = _to_rgb(img)
        img = img.resize((size, size), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError("image is too large (possible decompression bomb)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot decode image ({exc.__class__.__name__}: {exc})") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"unexpected image shape {arr.shape}")
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def normalize_images(x: ArrayT) -> ArrayT:
    """uint8 pixels (numpy or torch, any shape) → float32 normalised with mean = std = 0.5, the
    input every image encoder takes; float input is returned as it is (already normalised)."""
    # The same two float32 operations on both paths, so both give bit-identical features; in
    # place, since fresh batch-sized buffers cost page faults (measured 3x slower).
    if isinstance(x, torch.Tensor):
        return x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x
    if x.dtype != np.uint8:
        return x
    out = x.astype(np.float32)
    out /= 127.5
    out -= 1.0
    return out


def load_image(path: str | Path | Image.Image, size: int) -> np.ndarray:
    """Decode an image to a (3, size, size) float32 array normalised with mean = std = 0.5.
    Raises ValueError with the reason when the file is not a usable image."""
    return normalize_images(decode_image(path, size))


def open_image_bytes(data: bytes, *, max_side: int = 8192) -> Image.Image:
    """Open image bytes (an upload) lazily, after checking what the header promises: a known
    image format, at most `max_side` pixels per side. ValueError says why it is not usable."""
    import io

    if not data:
        raise ValueError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError("image is too large (possible decompression bomb)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"not an image Pillow can read ({exc.__class__.__name__})") from None
    w, h = img.size
    if w < 1 or h < 1 or max(w, h) > max_side:
        raise ValueError(f"image is {w}x{h} pixels; the limit is {max_side} per side")
    return img


def _exif_upright(img: Image.Image) -> Image.Image:
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(img) or img
    except Exception:  # a broken EXIF block should not cost the image
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[-1])
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit images span 0..65535; 32-bit "I" images are usually 8- or 16-bit data widened.
        arr = np.asarray(img, dtype=np.float32)
        full = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(255.0 * arr / full, 0, 255)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


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
