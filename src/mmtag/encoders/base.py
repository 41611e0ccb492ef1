"""The encoder base classes and the weight-file helpers every encoder family shares.

`Encoder` (and its `ImageEncoder` / `TextEncoder` modalities) is what the rest of mmtag sees of a
backbone. Weights are kept at fp16 precision (rounded once on creation, stored as fp16 in bundles)
and computed in fp32: MiniLM + EfficientNet-Lite0 are 104 MB in fp32 but 52 MB in fp16, which
keeps a whole bundle far under the 100 MB budget, and because rounding happens at creation,
features computed while training are bit-identical to those computed by a reloaded bundle.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..data.groups import file_digest
from ..errors import MmtagError

# Set here, where every encoder family starts, so no family can import transformers or
# huggingface_hub before they are.
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Encoder(nn.Module):
    """A frozen feature extractor; `encoder_id` names its exact weights (used as cache key)."""

    name: str
    modality: str
    dim: int

    def __init__(self) -> None:
        super().__init__()
        self._weights_hash = ""
        self.source: dict[str, str] = {}  # where the weights came from, recorded in the bundle

    def finalize(self) -> None:
        """Round weights to fp16 precision, freeze, and hash them."""
        h = hashlib.sha256()
        with torch.no_grad():
            state = self.state_dict()
            for key in sorted(state):
                t = state[key]
                if t.is_floating_point():
                    t.copy_(t.half().float())
                    h.update(key.encode() + t.half().cpu().numpy().tobytes())
                else:
                    h.update(key.encode() + t.cpu().numpy().tobytes())
        self._weights_hash = h.hexdigest()
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def weights_sha256(self) -> str:
        return self._weights_hash

    @property
    def encoder_id(self) -> str:
        return f"{self.name}-{self._weights_hash[:16]}"

    def fp16_state(self) -> dict[str, torch.Tensor]:
        return {k: (v.half() if v.is_floating_point() else v).contiguous()
                for k, v in self.state_dict().items()}

    def save(self, directory: Path) -> list[Path]:
        """Write this encoder's weights (fp16 safetensors) and metadata; return the weight files."""
        raise NotImplementedError

    def trainable_groups(self, k: int | None = None) -> list[nn.Module]:
        """The modules fine-tuning trains: the last `k` layer groups and what follows them (all
        of the encoder when k is None). Fine-tuning asks this instead of knowing any backbone's
        internals (timm's `group_matcher` idea)."""
        raise MmtagError(f"encoder '{self.name}' cannot be fine-tuned")


# The image sizes `ImageEncoder.set_image_size` accepts (`model.image_size` in the config, whose
# own check says the same: 0 there means the encoder's own size).
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024


class ImageEncoder(Encoder):
    modality = "image"
    image_size: int  # the side of the square images it reads, set by each encoder (its own size)
    channels_last = True  # eager PyTorch convolutions run ≈ 1.5x faster on CPU in NHWC

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) normalised images → pooled (B, D) and spatial tokens (B, T, D)."""
        raise NotImplementedError

    @property
    def native_image_size(self) -> int:
        """The size the encoder reads unless told otherwise (`set_image_size`): 224 for
        EfficientNet-Lite0, 240 for Lite1, 260 for Lite2."""
        return int(getattr(self, "_native_image_size", None) or self.image_size)

    @property
    def resized(self) -> bool:
        """Whether it reads images at another size than its own (its id then says so)."""
        return int(self.image_size) != self.native_image_size

    @property
    def encoder_id(self) -> str:
        # The size joins the id only when it is not the encoder's own: features of other sizes
        # never mix in the cache, while the ids of existing caches and bundles stay as they were.
        base = super().encoder_id
        return f"{base}-{int(self.image_size)}px" if self.resized else base

    def set_image_size(self, size: int | None) -> None:
        """Read images of `size` x `size` pixels from now on (None or 0: the encoder's own size).
        The weights are unchanged, so the weights hash is too; `encoder_id` gains the size."""
        native = self.native_image_size
        size = native if not size else size
        if isinstance(size, bool) or not isinstance(size, int) or \
                not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
            raise MmtagError(f"image encoder '{self.name}': the image size must be an integer in "
                             f"[{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {size!r}")
        if size == int(self.image_size):
            return
        self._resize(size)
        self._native_image_size = native
        self.image_size = size

    def _resize(self, size: int) -> None:
        """Rebuild whatever depends on the input size (a fully convolutional backbone: nothing).
        An encoder that cannot read other sizes raises MmtagError here."""


class TextEncoder(Encoder):
    modality = "text"
    max_length: int = 128

    def trainable_groups(self, k: int | None = None) -> list[nn.Module]:
        """The whole transformer: sentence encoders fine-tune end to end."""
        return [self]

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids → pooled (B, D) caption vectors."""
        raise NotImplementedError


@dataclass(frozen=True)
class EncoderEntry:
    """A registered encoder: how to build it from pretrained weights and from a bundle dir."""

    name: str
    modality: str
    create: Callable[[bool], Encoder]  # create(random_init) → encoder with pretrained weights
    load: Callable[[Path], Encoder]
    weights_present: Callable[[], bool]
    description: str


# how a family looks up another encoder by name (`registry.encoder_entry`): given to its
# `resolve`, so a family that wraps encoders (flip:, concat:, onnx:) needs no import of the
# registry that looks it up
Lookup = Callable[..., EncoderEntry]


@dataclass(frozen=True)
class EncoderFamily:
    """An open-ended family of encoders named "<prefix>:<what>", resolved on demand."""

    prefix: str
    resolve: Callable[[str, Lookup], EncoderEntry]  # resolve(what, lookup) → "<prefix>:<what>"
    modality: str | None  # None: the family wraps encoders of either modality (onnx:)
    placeholder: str = "NAME"  # how error messages spell <what>: hf:PATH_OR_NAME


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


def error_summary(exc: BaseException) -> str:
    """`Type: first line of the message`, short: what a one-line error says about a library's
    exception without its traceback."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file. Anything else under that name (a truncated or empty
    file, a pickle renamed to .safetensors, a directory) is a one-line MmtagError naming it; the
    safetensors parser never runs code, so a pickle is only ever refused, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise MmtagError(f"{path}: weights file missing")
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, ...: whatever the bytes provoke
        raise MmtagError(f"{path}: not a readable safetensors file ({error_summary(exc)})") from None


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, *,
                 optional: tuple[str, ...] = ()) -> None:
    """Put saved tensors into `module`. A tensor the architecture lacks, one it needs but the file
    lacks (other than names ending in `optional`), or one of another shape is a one-line error
    naming the file: torch's own error is a multi-line RuntimeError listing every tensor."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(optional)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = [f"{what} {names[:3]}{f' and {len(names) - 3} more' if len(names) > 3 else ''}"
                 for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise MmtagError(f"{path}: weights do not match the architecture ({'; '.join(parts)})")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise MmtagError(f"{path}: tensor '{key}' has shape {tuple(value.shape)}, but the "
                             f"architecture needs {tuple(own[key].shape)}")
    module.load_state_dict(state, strict=False)
