"""Image decoding and the one image loader.

Images are decoded here (`decode_image`), only in `IMAGE_FORMATS`, and every bad image raises
`ImageDecodeError`; a Dataset's image files are checked up front by `check_images_exist` (which
tells ImageIDs without their file extension apart from missing files) and `check_images_decode`. The one image loader every
stage uses is `mmtag.data.loader`.
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # the loader's tensors; decoding and checking images need no torch
    import torch

from .dataset import Dataset
from ..errors import DataError

ArrayT = TypeVar("ArrayT", np.ndarray, "torch.Tensor")

# Pillow refuses images above this many pixels (decompression bombs); 8k × 8k is plenty for photos.
Image.MAX_IMAGE_PIXELS = 64_000_000

# The image formats mmtag decodes (Pillow format names). Pillow picks a decoder from a file's
# content, not its name, and has ~40 of them, several of which raise arbitrary exceptions on
# corrupt input; a photo dataset or an upload means one of these, so no other decoder is run.
IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class ImageDecodeError(ValueError):
    """An image (file or upload) that cannot be decoded; the message says why. Every decode path
    (`decode_image`, `load_image`, `open_image_bytes`, `decode_thumbnail`) raises this and only
    this for a bad image, whatever Pillow raised, so callers catch one type. `too_large` marks an
    image refused for its size (a decodable file the caller may not want), not for its content."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


# File extensions of IMAGE_FORMATS, for telling a user whose ImageIDs lack theirs which one to add.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass
class ImageFiles:
    """Where a Dataset's image files stand: the rows whose file exists, and the problems of
    the others (each a DataError with its row), in row order."""

    present: list[int]
    outside: list[DataError]  # a symlink leading outside the images directory
    missing: list[DataError]  # no such file
    problems: list[DataError]  # both, in row order


def locate_images(dataset: Dataset) -> ImageFiles:
    """Which rows' image files exist. When ImageIDs lack the file extension their files have
    (every missing `<images>/139` has a `<images>/139.jpg`), this raises ONE DataError naming a
    file and the flag that fixes it (`--image-ext .jpg`), whatever `--skip-bad` says: it is the
    reading of the CSV that is wrong, not its rows."""
    if dataset.images_dir is None:
        raise DataError(dataset.path, "no images directory given (--images)")
    files = ImageFiles(present=[], outside=[], missing=[], problems=[])
    missing_rows: list[int] = []
    for i in range(len(dataset)):
        try:
            path = dataset.image_path(i)
        except DataError as err:
            files.outside.append(err)
            files.problems.append(err)
            continue
        if path.is_file():
            files.present.append(i)
        else:
            missing_rows.append(i)
            files.missing.append(DataError(dataset.path, f"image {str(path)!r} not found",
                                           **dataset.where(i)))
            files.problems.append(files.missing[-1])
    if missing_rows:
        hint = _extension_hint(dataset, missing_rows)
        if hint is not None:
            raise hint
    return files


def _extension_hint(dataset: Dataset, rows: list[int]) -> DataError | None:
    """The one error for ImageIDs without their file extension, or None: the first missing
    image has exactly one sibling `<name><ext>` with an image extension, and so has every
    missing image."""
    first = dataset.image_path(rows[0])
    if first.suffix.lower() in IMAGE_EXTENSIONS or not first.parent.is_dir():
        return None
    found = [p.name[len(first.name):] for p in first.parent.iterdir()
             if p.name.startswith(first.name + ".") and p.suffix == p.name[len(first.name):]
             and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if len(found) != 1:
        return None
    ext = found[0]
    if not all(Path(str(dataset.image_path(i)) + ext).is_file() for i in rows):
        return None
    others = f" (and so for all {len(rows)} rows whose image is missing)" if len(rows) > 1 else ""
    return DataError(dataset.path, f"image {str(first)!r} not found, but {str(first) + ext!r} "
                     f"is{others}: the ImageIDs have no file extension; pass --image-ext {ext}",
                     **dataset.where(rows[0]))


def check_images_exist(dataset: Dataset, *, skip_bad: bool) -> tuple[Dataset, list[DataError]]:
    """Fail (or, with skip_bad, drop) rows whose image file is missing or is a symlink leading
    outside the images directory, before any compute (see `locate_images`)."""
    files = locate_images(dataset)
    if files.problems and not skip_bad:
        raise files.problems[0]
    return (dataset if not files.problems else dataset.subset(files.present)), files.problems


def check_images_decode(dataset: Dataset, *, skip_bad: bool,
                        progress: bool = False) -> tuple[Dataset, list[DataError]]:
    """Fail (or, with skip_bad, drop) rows whose image does not decode: a real decode of every
    image, at a small size (draft mode keeps it cheap). For work that reads images outside the
    feature cache, e.g. fine-tuning, where one bad file must not stop an epoch."""
    from concurrent.futures import ThreadPoolExecutor

    from ..progress import Bar

    def problem(i: int) -> DataError | None:
        try:
            decode_image(dataset.image_path(i), 64)
            return None
        except ImageDecodeError as exc:
            return DataError(dataset.path, f"image {dataset.image_ids[i]!r}: {exc}",
                             **dataset.where(i))

    # Pillow releases the GIL while decoding, so threads use both cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        found = list(Bar(pool.map(problem, range(len(dataset))), total=len(dataset),
                         label="checking images", unit="img", show=progress))
    skipped = [e for e in found if e is not None]
    if skipped and not skip_bad:
        raise skipped[0]
    keep = [i for i, e in enumerate(found) if e is None]
    return (dataset if not skipped else dataset.subset(keep)), skipped


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
    if not isinstance(x, np.ndarray):  # a torch tensor: torch is loaded by whoever made it
        import torch

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
