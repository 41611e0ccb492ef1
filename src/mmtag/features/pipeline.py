"""A model's feature pipeline: one encoder per modality, the feature cache, and the feature
kinds its head reads → `Features` for a dataset (cached) or for in-memory inputs (not cached).

Training (`mmtag.training.trainer`) and the fitted `Tagger` share this object, so features at
training time and at prediction time are computed by the same code from the same encoders.
"""
from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import dist
from ..data import (Dataset, ImageAugment, ImageDecodeError, TextAugment, check_images_exist,
                    decode_image)
from ..encoders import (Encoder, ImageEncoder, OnnxEncoder, TextEncoder, create_encoder,
                        error_summary, runtime_twin, twin_traced)
from ..errors import DataError, MmtagError
from .cache import FeatureCache
from .extract import encode_captions, encode_images, extract, extract_views
from .types import IMAGE_POOL_KINDS, Features, FeatureSet, modality_of

log = logging.getLogger("mmtag")

# Tracing an encoder for ONNX Runtime costs a few seconds (Lite0 ≈ 3 s, MiniLM ≈ 6 s, with the
# agreement check); under `auto` a twin is traced only when at least this many items are to be
# computed, which repays it (bench/feature_runtime.py, 2 cores: Lite0 59 against 15 images/s,
# decoding included; MiniLM 281 against 176 captions/s). A traced twin is used for any number.
TWIN_MIN_ITEMS = {"image": 200, "text": 5000}


class Featurizer:
    """Features of the `kinds` a head needs, from `encoders` (modality → encoder); an encoder
    not given is built from its registered name in `encoder_names` when first used.

    `image_size` (`model.image_size`; 0: the image encoder's own) is the side of the images the
    image encoder reads: encoders built here are built for it, and a given one reading another
    size is replaced by a copy that reads it (never changed itself: `mmtag sweep` shares it).
    None (not said): given encoders read what they read, built ones their own size.
    `image_pool` (`model.image_pool`) says what the "image" vector heads read is: the mean of
    the spatial tokens, or that and their max side by side (`IMAGE_POOL_KINDS`)."""

    def __init__(self, kinds: tuple[str, ...], encoder_names: dict[str, str], cache: FeatureCache,
                 *, encoders: dict[str, Encoder] | None = None, workers: int = 2,
                 random_init: bool = False, runtime: str = "torch", image_size: int | None = None,
                 image_pool: str = "mean") -> None:
        if image_pool not in IMAGE_POOL_KINDS:
            raise MmtagError(f"unknown image pooling {image_pool!r}; available: "
                             f"{', '.join(IMAGE_POOL_KINDS)}")
        self.kinds = tuple(kinds)
        self.encoder_names = dict(encoder_names)
        self.cache = cache
        self.image_size = image_size
        self.image_pool = image_pool
        self.encoders: dict[str, Encoder] = {m: self._sized(e) for m, e in (encoders or {}).items()}
        self.workers = workers
        self.random_init = random_init
        self.runtime = runtime  # Config.feature_runtime: auto | onnx | torch
        self._twins: dict[str, Encoder] = {}  # encoder_id → what computes its features

    @property
    def cached_kinds(self) -> tuple[str, ...]:
        """The kinds extracted (and cached) to make `kinds`: "image" stands for the kinds its
        pooling joins (`pooled` joins them back)."""
        out: list[str] = []
        for kind in self.kinds:
            out.extend(IMAGE_POOL_KINDS[self.image_pool] if kind == "image" else (kind,))
        return tuple(dict.fromkeys(out))

    def pooled(self, feats: Features) -> Features:
        """`feats` with the image pooling's kinds joined into "image" (mean, then max); as they
        are under mean pooling, or where the pooling's kinds are not all there (a view without
        image augmentation carries no image kinds)."""
        parts = IMAGE_POOL_KINDS[self.image_pool]
        if len(parts) == 1 or not all(k in feats for k in parts):
            return feats
        arrays = {k: a for k, a in feats.arrays.items() if k not in parts}
        arrays["image"] = np.concatenate([feats[k] for k in parts], axis=-1)
        return Features(arrays)

    def _sized(self, encoder: Encoder) -> Encoder:
        """`encoder`, or for an image encoder reading another size than `image_size` asks, a
        copy reading that size."""
        if not isinstance(encoder, ImageEncoder) or self.image_size is None:
            return encoder
        want = self.image_size or encoder.native_image_size
        if int(encoder.image_size) == want:
            return encoder
        if isinstance(encoder, OnnxEncoder):  # a graph reads the size it was traced at: it
            encoder.set_image_size(want)  # refuses another with a line saying which it reads
            return encoder
        resized = copy.deepcopy(encoder)
        resized.set_image_size(want)
        return resized

    @property
    def modalities(self) -> list[str]:
        """The modalities the kinds come from, in the order the head lists them."""
        return list(dict.fromkeys(modality_of(k) for k in self.kinds))

    def encoder(self, modality: str) -> Encoder:
        if modality not in self.encoders:
            size = self.image_size if modality == "image" else None  # None, 0: its own
            self.encoders[modality] = create_encoder(self.encoder_names[modality], modality,
                                                     random_init=self.random_init, image_size=size)
        enc = self.encoders[modality]
        if dist.device_of(enc) != dist.context().device:
            enc.to(dist.context().device)  # --device: features are computed where the encoder lives
        return enc

    def replace_encoder(self, modality: str, encoder: Encoder) -> None:
        """Use `encoder` from now on (a fine-tuned or exported copy). Its id keys the cache, so
        features of the old and new encoders never mix."""
        self.encoders[modality] = encoder

    def runner(self, encoder: Encoder, n_items: int) -> Encoder:
        """What computes `n_items` uncached features of `encoder`: the encoder, or its ONNX
        Runtime twin (`encoders.runtime_twin`) under `runtime` onnx, or auto on a CPU where the
        work repays the tracing. Under auto a failed trace falls back to PyTorch, said once."""
        if self.runtime == "torch" or isinstance(encoder, OnnxEncoder):
            return encoder
        known = self._twins.get(encoder.encoder_id)
        if known is not None:
            return known
        if self.runtime == "auto":
            on_cpu = dist.device_of(encoder).type == "cpu"
            traced = twin_traced(encoder, self.cache.root)
            if not on_cpu or importlib.util.find_spec("onnxruntime") is None or \
                    (n_items < TWIN_MIN_ITEMS.get(encoder.modality, 0) and not traced):
                return encoder
        try:
            twin: Encoder = runtime_twin(encoder, self.cache.root)
        except Exception as exc:  # tracing and ONNX Runtime raise many types
            if self.runtime == "onnx":
                raise MmtagError(f"--feature-runtime onnx: cannot run '{encoder.name}' in ONNX "
                                 f"Runtime ({error_summary(exc)})") from None
            log.warning("computing %s features with PyTorch: its ONNX Runtime twin failed (%s)",
                        encoder.name, error_summary(exc))
            twin = encoder
        self._twins[encoder.encoder_id] = twin
        return twin

    def dims(self, feats: Features) -> dict[str, int]:
        return {k: int(feats[k].shape[-1]) for k in self.kinds}

    # ------------------------------------------------------------------ datasets (cached)
    def features(self, dataset: Dataset, *, skip_bad: bool = False, progress: bool = True,
                 distribute: bool = True) -> FeatureSet:
        """Cached features of every row; bad rows raise or (skip_bad) drop. Under torchrun the
        ranks share the computing (see `extract`)."""
        skipped: list[DataError] = []
        if "image" in self.modalities:
            dataset, skipped = check_images_exist(dataset, skip_bad=skip_bad)
        fs = extract(dataset, self.cached_kinds,
                     image_encoder=self._encoder_of(ImageEncoder, "image"),
                     text_encoder=self._encoder_of(TextEncoder, "text"), cache=self.cache,
                     skip_bad=skip_bad, workers=self.workers, progress=progress,
                     distribute=distribute, runner=self.runner)
        fs.skipped = skipped + fs.skipped
        fs.features = self.pooled(fs.features)
        return fs

    def text_features(self, dataset: Dataset, *, progress: bool = True) -> Features:
        """Caption features alone (rows without images, e.g. `--extra-text`)."""
        text = self._encoder_of(TextEncoder, "text", required=True)
        return extract(dataset, ["text"], image_encoder=None, text_encoder=text, cache=self.cache,
                       progress=progress, runner=self.runner).features

    def views(self, dataset: Dataset, n: int, *, image_augment: ImageAugment | None,
              text_augment: TextAugment | None, seed: int, progress: bool) -> list[Features]:
        """`n` cached augmented views of every row (see `extract_views`)."""
        views = extract_views(dataset, self.cached_kinds, n,
                              image_encoder=self._encoder_of(ImageEncoder, "image", build=False),
                              text_encoder=self._encoder_of(TextEncoder, "text", build=False),
                              cache=self.cache, image_augment=image_augment,
                              text_augment=text_augment, seed=seed, workers=self.workers,
                              progress=progress, runner=self.runner)
        return [self.pooled(v) for v in views]

    def _encoder_of(self, kind: type, modality: str, *, required: bool = False,
                    build: bool = True) -> Any:
        if modality not in self.modalities and not required:
            return None
        if not build:
            return self.encoders.get(modality)
        enc = self.encoder(modality)
        if not isinstance(enc, kind):
            raise MmtagError(f"the {modality} encoder {enc.name!r} is not a {kind.__name__}")
        return enc

    # ------------------------------------------------------------ in-memory inputs (not cached)
    def encode(self, images: list[Any] | None, captions: list[str] | None,
               batch_size: int = 32, *, modalities: tuple[str, ...] | None = None) -> Features:
        """Features of in-memory inputs: image paths or PIL images, and captions; `modalities`
        (default: all of this featurizer's) says which to encode, e.g. one late-fusion branch."""
        wanted = self.modalities if modalities is None else list(modalities)
        encoded: dict[str, np.ndarray] = {}
        if "image" in wanted and images is None:
            raise MmtagError("this model needs images (one per item)")
        if "text" in wanted and captions is None:
            raise MmtagError("this model needs captions (one per item)")
        sizes = {len(x) for x in (images, captions) if x is not None}
        if len(sizes) != 1:
            raise MmtagError(f"got {len(images or [])} images but {len(captions or [])} captions")
        n = sizes.pop()
        if n == 0:
            raise MmtagError("nothing to predict: no items given")
        if "image" in wanted:
            assert images is not None
            encoded.update(self._encode_images(images, n, batch_size))
        if "text" in wanted:
            assert captions is not None
            enc = self._encoder_of(TextEncoder, "text")
            encoded["text"] = np.concatenate([encode_captions(enc, list(captions[s:s + 128]))
                                              for s in range(0, n, 128)])
        return self.pooled(Features(encoded))

    def _encode_images(self, images: list[Any], n: int, batch_size: int) -> dict[str, np.ndarray]:
        enc = self._encoder_of(ImageEncoder, "image")
        chunks: dict[str, list[np.ndarray]] = {k: [] for k in self.cached_kinds
                                               if modality_of(k) == "image"}
        for start in range(0, n, batch_size):
            arrays = []
            for k, img in enumerate(images[start:start + batch_size]):
                if not isinstance(img, (Image.Image, str, Path)):
                    raise MmtagError(f"image {start + k}: expected a file path or a PIL image, "
                                     f"got {type(img).__name__}")
                try:
                    arrays.append(decode_image(img if isinstance(img, Image.Image) else Path(img),
                                               enc.image_size))
                except ImageDecodeError as exc:  # whatever the decoder raised
                    if isinstance(img, Image.Image):
                        raise MmtagError(f"image {start + k}: {exc}") from None
                    raise DataError(img, str(exc)) from None
            out = encode_images(enc, torch.from_numpy(np.stack(arrays)))
            for kind in chunks:
                chunks[kind].append(out[kind])
        return {kind: np.concatenate(chunks[kind]) for kind in chunks}
