"""Image encoders made of other image encoders: `flip:<encoder>` and `concat:<a>+<b>[+...]`.

* `flip:<encoder>`: horizontal-flip test-time augmentation. The features of an image are the mean
  of the inner encoder's features of the image and of its mirror; the mirror's token grid is
  mirrored back first, so token (i, j) of both views describes the same place in the image.
* `concat:<a>+<b>`: several backbones side by side; their pooled features are concatenated
  (EfficientNet-Lite0 1280 + Lite2 1280 → 2560). The batch arrives at the largest part's
  image size and is shrunk (bilinear, antialiased) for each smaller part; each part's token grid
  is resized to the largest grid, so tokens are (B, T, dim) like every other encoder's.

Another image size (`--image-size`) scales every part alike: `flip:` runs its encoder at that
size, and `concat:` its largest part at it and each other part scaled by the same factor.

Both compose (`flip:concat:efficientnet-lite0+efficientnet-lite2`, `concat:flip:a+b`) and take
the one input contract every image encoder has (`data.normalize_images`: mean = std = 0.5; a part
needing other statistics re-normalises inside itself, as `timm:` does), so parts never disagree
about normalisation. They are frozen feature extractors: `trainable_groups` is the base's
"cannot be fine-tuned" error, since fine-tuning through two views or several backbones would need
a block count per part that `--unfreeze-blocks` cannot say.

A composite's bundle directory holds each part's directory (`inner/`, or `part0/`, `part1/`, ...)
as that part saves it, plus an `encoder.json` naming the parts; its id hashes every part's
weights under the composite's own name, so its cached features never mix with a part's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MmtagError, quoted
from ..io import atomic_write_text, load_json
from .base import (MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, Encoder, EncoderEntry, EncoderFamily, ImageEncoder,
                   Lookup, error_summary)

META_FILE = "encoder.json"


def grid_side(tokens: torch.Tensor, who: str) -> int:
    """The side of the square token grid (B, side*side, D) an encoder of square images gives."""
    count = int(tokens.shape[1])
    side = math.isqrt(count)
    if side * side != count:  # e.g. a ViT's class token: there is no grid to mirror or resize
        raise MmtagError(f"image encoder '{who}': its {count} tokens are not a square grid, so "
                         "flip:/concat: cannot line them up")
    return side


def resize_matrix(n: int, m: int) -> torch.Tensor:
    """The (m, n) matrix A with A @ v = `interpolate(v, m, bilinear, antialias)` for a signal v
    of length n: antialiased resizing is separable, so an image resizes as A @ x @ A.T.

    ONNX opset 17 has no antialiased Resize; the export traces these matmuls instead, built by
    resizing the identity with the very function the eager path calls."""
    eye = torch.eye(n, dtype=torch.float64)[None, None]
    rows = F.interpolate(eye, size=(n, m), mode="bilinear", antialias=True, align_corners=False)
    return rows[0, 0].T.float().contiguous()


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, S, S) → (B, 3, size, size), bilinear with antialiasing (a smaller part's input)."""
    if torch.onnx.is_in_onnx_export():
        a = resize_matrix(int(images.shape[-1]), size).to(images.device, images.dtype)
        return a @ images @ a.T
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)


class CompositeImageEncoder(ImageEncoder):
    """An image encoder made of named image encoders (`parts`: bundle subfolder → encoder)."""

    family: str

    def __init__(self, name: str, parts: dict[str, ImageEncoder]) -> None:
        super().__init__()
        self.name = name
        self.parts = nn.ModuleDict(parts)
        # NHWC input only when every part asks for it; otherwise plain NCHW suits them all
        self.channels_last = all(p.channels_last for p in parts.values())
        self.source = {f"{sub}.{k}": v for sub, p in parts.items() for k, v in p.source.items()}

    def finalize(self) -> None:
        """Each part as it would be alone (rounded, frozen, hashed), then the whole: the state
        dict's keys carry the part folders, so every part's weights and place are in the hash."""
        for part in self.parts.values():
            part.finalize()  # type: ignore[operator]
        super().finalize()

    def save(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        files: list[Path] = []
        for sub, part in self.parts.items():
            files += part.save(directory / sub)  # type: ignore[operator]
        parts = {sub: part.name for sub, part in self.parts.items()}
        atomic_write_text(directory / META_FILE, json.dumps(
            {"name": self.name, "family": self.family, "parts": parts}, indent=2))
        return files


class FlipEncoder(CompositeImageEncoder):
    """`flip:<encoder>`: features of the image and of its mirror, averaged."""

    family = "flip"

    def __init__(self, name: str, inner: ImageEncoder) -> None:
        super().__init__(name, {"inner": inner})
        self.dim = inner.dim
        self.image_size = inner.image_size

    @property
    def inner(self) -> ImageEncoder:
        return self.parts["inner"]  # type: ignore[return-value]

    def _resize(self, size: int) -> None:
        self.inner.set_image_size(size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One batch of both views: one pass through the backbone instead of two half-full ones.
        pooled, tokens = self.inner(torch.cat([images, images.flip(-1)]))
        side, d = grid_side(tokens, str(self.inner.name)), int(tokens.shape[-1])
        # Views are split by reshaping, never by slicing at the batch size: an ONNX trace would
        # bake that size in, and the export must take any batch.
        pooled = pooled.reshape(2, -1, d)
        grids = tokens.reshape(2, -1, side, side, d)
        # Column j of the mirror's grid saw column side-1-j of the image: flip it back.
        mean_grid = (grids[0] + grids[1].flip(2)) / 2
        return (pooled[0] + pooled[1]) / 2, mean_grid.reshape(-1, side * side, d)


class ConcatEncoder(CompositeImageEncoder):
    """`concat:<a>+<b>[+...]`: the parts' features side by side."""

    family = "concat"

    def __init__(self, name: str, parts: list[ImageEncoder]) -> None:
        super().__init__(name, {f"part{i}": p for i, p in enumerate(parts)})
        self.dim = sum(p.dim for p in parts)
        self.image_size = max(p.image_size for p in parts)

    def _resize(self, size: int) -> None:
        """Every part scaled by the same factor, so each keeps its resolution relative to the
        largest (which reads `size`): the whole's own size then restores every part's own."""
        native = self.native_image_size
        for part in self.parts.values():
            scaled = round(size * part.native_image_size / native)  # type: ignore[operator]
            part.set_image_size(min(max(scaled, MIN_IMAGE_SIZE), MAX_IMAGE_SIZE))  # type: ignore[operator]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, grids = [], []
        for part in self.parts.values():
            size = int(part.image_size)  # type: ignore[arg-type]
            p, t = part(images if size == self.image_size else resize_images(images, size))
            pooled.append(p)
            grids.append((t, grid_side(t, str(part.name))))
        side = max(s for _, s in grids)
        tokens = []
        for t, s in grids:
            if s != side:  # upsampling a coarser grid (no antialiasing needed going up)
                grid = t.transpose(1, 2).reshape(-1, int(t.shape[-1]), s, s)  # -1: any batch
                grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
                t = grid.flatten(2).transpose(1, 2)
            tokens.append(t)
        return torch.cat(pooled, dim=1), torch.cat(tokens, dim=2)


def _part_entry(what: str, name: str, lookup: Lookup) -> EncoderEntry:
    try:
        return lookup(what, "image")
    except MmtagError as exc:
        raise MmtagError(f"encoder '{name}': {exc}") from None


def _image_encoder(enc: Encoder, name: str) -> ImageEncoder:
    if not isinstance(enc, ImageEncoder):  # a family whose entries say image but build otherwise
        raise MmtagError(f"encoder '{name}': part '{enc.name}' is not an image encoder")
    return enc


def _load_parts(name: str, directory: Path, parts: dict[str, str],
                lookup: Lookup) -> dict[str, ImageEncoder]:
    """The parts saved under `directory`, after checking its encoder.json names the same ones."""
    meta_path = directory / META_FILE
    try:
        meta = load_json(meta_path, "encoder metadata file")
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        raise MmtagError(f"{meta_path}: cannot read the encoder metadata ({error_summary(exc)})") from None
    saved = meta.get("parts") if isinstance(meta, dict) else None
    if saved != parts:
        raise MmtagError(f"{meta_path}: lists parts {quoted(saved)}, but encoder '{name}' is made of {parts!r}")
    return {sub: _image_encoder(lookup(what, "image").load(directory / sub), name)
            for sub, what in parts.items()}


def _flip_entry(what: str, lookup: Lookup) -> EncoderEntry:
    name = f"flip:{what}"
    inner = _part_entry(what, name, lookup)

    def create(random_init: bool) -> Encoder:
        return FlipEncoder(name, _image_encoder(inner.create(random_init), name))

    def load(directory: Path) -> Encoder:
        return FlipEncoder(name, _load_parts(name, directory, {"inner": what}, lookup)["inner"])

    return EncoderEntry(name, "image", create, load, inner.weights_present,
                        f"{what}, averaged with its features of the mirrored image")


def _concat_entry(what: str, lookup: Lookup) -> EncoderEntry:
    name = f"concat:{what}"
    names = what.split("+")
    if len(names) < 2 or not all(names):
        raise MmtagError(f"encoder '{name}': 'concat:' needs two or more image encoders joined by '+', "
                         "e.g. concat:efficientnet-lite0+efficientnet-lite2")
    entries = [_part_entry(n, name, lookup) for n in names]

    def create(random_init: bool) -> Encoder:
        return ConcatEncoder(name, [_image_encoder(e.create(random_init), name) for e in entries])

    def load(directory: Path) -> Encoder:
        parts = _load_parts(name, directory, {f"part{i}": n for i, n in enumerate(names)}, lookup)
        return ConcatEncoder(name, list(parts.values()))

    def present() -> bool:
        return all(e.weights_present() for e in entries)

    return EncoderEntry(name, "image", create, load, present,
                        f"{' and '.join(names)} side by side, features concatenated")


# the registry's families (mmtag.registries.ENCODER_FAMILIES)
FLIP = EncoderFamily("flip", _flip_entry, "image", "IMAGE_ENCODER")
CONCAT = EncoderFamily("concat", _concat_entry, "image", "A+B")
