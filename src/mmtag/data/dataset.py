"""Reading the competition layout: `ImageID,Labels,Caption` CSVs and images at `<images>/<ImageID>`.

Nothing here drops a row silently: a bad row raises `DataError` naming file, row and line, or, with
`skip_bad=True`, is skipped and reported back in `ReadResult.skipped`.

Images are decoded here too (`decode_image`), and batched by the one image loader every stage
uses (`ImageItems` + `collate_images`, through `image_loader`): feature extraction and encoder
fine-tuning decode, augment, batch and report a bad image the same way.
"""
from __future__ import annotations

import csv
import io
import math
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .augment import ImageAugment
from .coco import COCO_NAMES
from ..errors import DataError

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

# Pillow refuses images above this many pixels (decompression bombs); 8k × 8k is plenty for photos.
Image.MAX_IMAGE_PIXELS = 64_000_000

# The image formats mmtag decodes (Pillow format names). Pillow picks a decoder from a file's
# content, not its name, and has ~40 of them, several of which raise arbitrary exceptions on
# corrupt input; a photo dataset or an upload means one of these, so no other decoder is run.
IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Captions are encoded with a 128-token limit anyway; this bound stops a 100 MB "caption".
MAX_CAPTION_CHARS = 10_000


class ImageDecodeError(ValueError):
    """An image (file or upload) that cannot be decoded; the message says why. Every decode path
    (`decode_image`, `load_image`, `open_image_bytes`, `decode_thumbnail`) raises this and only
    this for a bad image, whatever Pillow raised, so callers catch one type. `too_large` marks an
    image refused for its size (a decodable file the caller may not want), not for its content."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


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


@dataclass
class ReadResult:
    """A parsed dataset plus the rows skipped under `skip_bad` (as DataErrors, in file order)."""

    dataset: Dataset
    skipped: list[DataError]


_LABEL = re.compile(r"[0-9]+")


def parse_labels(text: str) -> list[int]:
    """'1 3  19' → [1, 3, 19] (sorted, unique); raises ValueError naming the bad token.

    The one place a Labels field is read. A label is a string of ASCII digits: Python's int()
    also reads '1_8' as 18, '+3', and Arabic-Indic or full-width digits, none of which a
    label file means.
    """
    out: set[int] = set()
    for token in text.split():
        if not _LABEL.fullmatch(token):
            kind = "negative" if _LABEL.fullmatch(token.removeprefix("-")) else "not an integer"
            raise ValueError(f"label {token!r} is {kind} (labels are ASCII digits 0-9)")
        out.add(int(token))
    return sorted(out)


def check_image_id(image_id: str) -> None:
    """Reject ids that would escape the images directory (absolute paths, '..', drive letters)
    and ids with leading or trailing whitespace: an id names a file and is echoed in the
    submission, so it is used exactly, never trimmed into another name."""
    if not image_id:
        raise ValueError("ImageID is empty")
    if image_id != image_id.strip():
        raise ValueError(f"ImageID {image_id!r} has leading or trailing spaces (ids are used exactly)")
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
    for name in ("ImageID", "Labels", "Caption"):
        if header.count(name) > 1:
            # Otherwise one of the two silently wins, and a submission could list the wrong ids.
            raise DataError(path, f"column {name!r} appears more than once in the header "
                            f"{','.join(header)!r}", line=1)
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
                if len(record) <= 1 and not "".join(record).strip():
                    seen_rows -= 1  # blank (or whitespace-only) lines are not rows
                    continue
                try:
                    if not any(f.strip() for f in record):
                        # `,,` is a record, unlike a blank line: something was meant to be here.
                        raise ValueError("every field is empty")
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
    image_id = record[col["ImageID"]]
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
    """Fail (or, with skip_bad, drop) rows whose image file is missing or is a symlink leading
    outside the images directory, before any compute."""
    if dataset.images_dir is None:
        raise DataError(dataset.path, "no images directory given (--images)")
    keep: list[int] = []
    skipped: list[DataError] = []
    for i in range(len(dataset)):
        err = _image_problem(dataset, i)
        if err is None:
            keep.append(i)
            continue
        if not skip_bad:
            raise err
        skipped.append(err)
    return (dataset if not skipped else dataset.subset(keep)), skipped


def check_images_decode(dataset: Dataset, *, skip_bad: bool,
                        progress: bool = False) -> tuple[Dataset, list[DataError]]:
    """Fail (or, with skip_bad, drop) rows whose image does not decode: a real decode of every
    image, at a small size (draft mode keeps it cheap). For work that reads images outside the
    feature cache, e.g. fine-tuning, where one bad file must not stop an epoch."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    def problem(i: int) -> DataError | None:
        try:
            decode_image(dataset.image_path(i), 64)
            return None
        except ImageDecodeError as exc:
            return DataError(dataset.path, f"image {dataset.image_ids[i]!r}: {exc}",
                             **dataset.where(i))

    # Pillow releases the GIL while decoding, so threads use both cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        found = list(tqdm(pool.map(problem, range(len(dataset))), total=len(dataset),
                          desc="checking images", unit="img", disable=not progress))
    skipped = [e for e in found if e is not None]
    if skipped and not skip_bad:
        raise skipped[0]
    keep = [i for i, e in enumerate(found) if e is None]
    return (dataset if not skipped else dataset.subset(keep)), skipped


def _image_problem(dataset: Dataset, i: int) -> DataError | None:
    """Why row i's image cannot be read (outside the images directory, or not a file), or None."""
    try:
        p = dataset.image_path(i)
    except DataError as err:
        return err
    if p.is_file():
        return None
    return DataError(dataset.path, f"image {str(p)!r} not found", **dataset.where(i))


@contextmanager
def _decoding() -> Iterator[None]:
    """Turn any failure to decode inside the block into ImageDecodeError.

    Pillow's plugins raise NotImplementedError, struct.error, IndexError, EOFError, RuntimeError
    (libavif), ... on corrupt input, besides OSError and ValueError, and which one depends on the
    decoder the content selects: one bad file must not abort a run or answer HTTP 500, so every
    exception here is the image's fault. (KeyboardInterrupt and SystemExit are not Exceptions.)
    """
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError("image is too large (possible decompression bomb)",
                               too_large=True) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"cannot decode image: not a {_FORMAT_LIST} file") from None
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode image ({exc.__class__.__name__}: {exc})") from None


_FORMAT_LIST = ", ".join(IMAGE_FORMATS[:-1]) + f" or {IMAGE_FORMATS[-1]}"


def _open(source: str | Path | BinaryIO) -> Image.Image:
    """Open lazily (header only), trying only the decoders of IMAGE_FORMATS; call in `_decoding`."""
    img = Image.open(source, formats=IMAGE_FORMATS)
    w, h = img.size
    # Checked here as well as by Pillow's warning: warning filters are process-wide, and a
    # thread leaving `catch_warnings` can reset them while another thread opens an image.
    if Image.MAX_IMAGE_PIXELS is not None and w * h > Image.MAX_IMAGE_PIXELS:
        img.close()
        raise Image.DecompressionBombError(f"{w}x{h} pixels")
    return img


def decode_image(path: str | Path | Image.Image, size: int) -> np.ndarray:
    """Decode an image to a (3, size, size) uint8 array (see `normalize_images`).

    JPEG draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale, much faster than decoding full
    resolution and shrinking. The whole frame is resized (no crop) so no labelled object is cut off.
    Decoding stops at uint8 because DataLoader workers hand batches to the main process: a uint8
    batch is a quarter of the bytes of a float32 one, and normalising a whole batch at once is
    cheaper than image by image. Files are decoded only in IMAGE_FORMATS; an image already open
    (e.g. from `open_image_bytes`) is decoded as it is. Raises ImageDecodeError saying why.
    """
    with _decoding():
        if isinstance(path, Image.Image):
            arr = _pixels(path, size)
        else:
            with _open(path) as img:
                arr = _pixels(img, size)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageDecodeError(f"unexpected image shape {arr.shape}")
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _pixels(img: Image.Image, size: int) -> np.ndarray:
    img.draft("RGB", (size, size))
    img = _exif_upright(img)
    if img.mode != "RGB":
        img = _to_rgb(img)
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def decode_thumbnail(path: str | Path, max_side: int) -> Image.Image:
    """An upright RGB copy of an image file, at most `max_side` pixels per side, aspect kept
    (for reports); decoded like `decode_image`. Raises ImageDecodeError saying why."""
    with _decoding(), _open(path) as img:
        img.draft("RGB", (max_side, max_side))
        out = _exif_upright(img)
        out = _to_rgb(out) if out.mode != "RGB" else out.copy()
        out.thumbnail((max_side, max_side))
        return out


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
    Raises ImageDecodeError (a ValueError) with the reason when it is not a usable image."""
    return normalize_images(decode_image(path, size))


def open_image_bytes(data: bytes, *, max_side: int = 8192) -> Image.Image:
    """Open image bytes (an upload) lazily, after checking what the header promises: one of
    IMAGE_FORMATS, at most `max_side` pixels per side. Decode it with `decode_image`.

    Raises ImageDecodeError (a ValueError) saying why it is not usable: "empty file", "cannot
    decode image: not a JPEG, ... file", "image is too large (possible decompression bomb)",
    "image is WxH pixels; the limit is N per side", or "cannot decode image (<Type>: ...)".
    """
    if not data:
        raise ImageDecodeError("empty file")
    with _decoding():
        img = _open(io.BytesIO(data))
    w, h = img.size
    if w < 1 or h < 1 or max(w, h) > max_side:
        raise ImageDecodeError(f"image is {w}x{h} pixels; the limit is {max_side} per side",
                               too_large=True)
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



# ---------------------------------------------------------------------- the one image loader
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
