"""Computing encoder features once, through the feature cache (`features.cache`).

Only what the cache lacks is computed. Shards are written as extraction proceeds (atomically), so
an interrupted extraction resumes where it stopped; shards found corrupt while reading are
recomputed.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np
import torch
from .. import dist
from ..progress import Bar
from ..data.augment import ImageAugment, TextAugment
from ..data import Dataset, ImageItems, image_batches, image_loader, normalize_images
from ..encoders import Encoder, ImageEncoder, TextEncoder
from ..errors import DataError, MmtagError
from .cache import SHARD_ITEMS, CorruptShard, FeatureCache, caption_key, file_key
from .types import FEATURE_KINDS, KIND_MODALITY, Features, FeatureSet

T = TypeVar("T")
# (encoder, items it must compute) → what computes them: the encoder itself or its ONNX Runtime
# twin (same encoder_id, same cache entries); the Featurizer decides (`Featurizer.runner`).
Runner = Callable[[Encoder, int], Encoder]


def _same(encoder: Encoder, n: int) -> Encoder:
    return encoder


def _recomputing(compute: Callable[[], T]) -> T:
    """Run an extraction; if cache shards turned out corrupt (they are forgotten by then), run
    it once more, which recomputes exactly their items."""
    try:
        return compute()
    except CorruptShard:
        return compute()


def extract(dataset: Dataset, kinds: Iterable[str], *, image_encoder: ImageEncoder | None,
            text_encoder: TextEncoder | None, cache: FeatureCache, skip_bad: bool = False,
            workers: int = 2, batch_size: int = 32, progress: bool = True,
            distribute: bool = True, runner: Runner = _same) -> FeatureSet:
    """Features of `kinds` for every row of `dataset`, computing only what the cache lacks.

    A row whose image cannot be decoded raises DataError (after everything computed so far has
    been cached), or with `skip_bad` is dropped and reported in `FeatureSet.skipped`.

    Under torchrun (and `distribute`), each rank first computes its shard of the rows into the
    cache; then every rank reads all rows from it. With the cache on storage all ranks share,
    every item is computed once; on a cache private to a machine, a rank computes what it
    cannot find (slower, same result). `runner` picks what computes the missing items.
    """
    ctx = dist.context()
    if distribute and ctx.distributed and cache.root is not None:
        dist.checked(lambda: extract(
            dataset.subset(ctx.shard(len(dataset))), kinds, image_encoder=image_encoder,
            text_encoder=text_encoder, cache=cache, skip_bad=skip_bad, workers=workers,
            batch_size=batch_size, progress=progress, distribute=False, runner=runner))
        cache.forget_index()
        progress = False  # what is left is reading the cache
    kinds = set(kinds)
    unknown = kinds - set(FEATURE_KINDS)
    if unknown:
        raise MmtagError(f"unknown feature kind(s) {sorted(unknown)}")
    arrays: dict[str, np.ndarray] = {}
    skipped: list[DataError] = []
    image_kinds = sorted(k for k in kinds if KIND_MODALITY[k] == "image")
    if image_kinds:
        if image_encoder is None:
            raise MmtagError("image features requested but no image encoder given")
        image_arrays, keep, bad = _extract_images(dataset, image_kinds, image_encoder, cache,
                                            skip_bad=skip_bad, workers=workers,
                                            batch_size=batch_size, progress=progress, runner=runner)
        if bad:
            skipped.extend(err for _, err in bad)
            dataset = dataset.subset(keep)
        arrays.update(image_arrays)
    if "text" in kinds:
        if text_encoder is None:
            raise MmtagError("text features requested but no text encoder given")
        arrays["text"] = _extract_text(dataset.captions, text_encoder, cache, progress=progress,
                                       runner=runner)
    return FeatureSet(features=Features(arrays), dataset=dataset, skipped=skipped)


def _extract_images(*args, **kwargs) -> tuple[dict[str, np.ndarray], list[int], list[tuple[int, DataError]]]:
    return _recomputing(lambda: _extract_images_once(*args, **kwargs))


def _extract_images_once(dataset: Dataset, kinds: list[str], encoder: ImageEncoder, cache: FeatureCache,
                    *, skip_bad: bool, workers: int, batch_size: int, progress: bool,
                    view: tuple[ImageAugment, str] | None = None, runner: Runner = _same) -> tuple[dict[str, np.ndarray], list[int], list[tuple[int, DataError]]]:
    paths = [dataset.image_path(i) for i in range(len(dataset))]
    keys: list[str] = []
    bad: list[tuple[int, DataError]] = []
    for i, p in enumerate(paths):
        try:
            # An augmented view is its own cache entry: file content + augmentation + view tag.
            keys.append(file_key(p) if view is None else _view_key(file_key(p), view[1]))
        except OSError as exc:
            err = DataError(dataset.path, f"cannot read image {str(p)!r} ({exc.strerror or exc})",
                            **dataset.where(i))
            if not skip_bad:
                raise err from None
            bad.append((i, err))
            keys.append("")
    # The token kind is computed whenever any image kind is missing, since pooled = mean(tokens)
    # comes for free; each kind's cache is checked separately so pooled-only runs stay small.
    todo: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key and key not in todo and any(key not in cache.index(encoder.encoder_id, k) for k in kinds):
            todo[key] = i
    extra: dict[str, dict[str, np.ndarray]] = {k: {} for k in kinds}
    if todo:
        compute = runner(encoder, len(todo))
        order = list(todo.items())
        items = ImageItems([paths[i] for _, i in order], encoder.image_size,
                           view[0] if view else None, source=dataset, rows=[i for _, i in order])
        seeds = [_seed_of(k) if view else None for k, _ in order]
        loader = image_loader(items, image_batches(seeds, batch_size), workers)
        pending: dict[str, tuple[list[str], list[np.ndarray]]] = {k: ([], []) for k in kinds}
        what = "augmented image features" if view else "image features"
        bar = Bar(label=f"{what} {encoder.name}", total=len(order), unit="img", show=progress)
        try:
            for batch in loader:
                for j, msg in batch.errors:
                    err = items.error(j, msg)
                    if not skip_bad:
                        raise err
                    bad.extend((i, err) for i, k in enumerate(keys) if k == order[j][0])
                if batch.images is not None:
                    outs = encode_images(compute, batch.images)  # type: ignore[arg-type]
                    for kind in kinds:
                        ks, vs = pending[kind]
                        ks.extend(order[j][0] for j in batch.items)
                        vs.extend(outs[kind].astype(np.float16))
                        if len(ks) >= SHARD_ITEMS:
                            cache.put(encoder.encoder_id, kind, ks, np.stack(vs))
                            extra[kind].update(zip(ks, vs))
                            pending[kind] = ([], [])
                bar.update(len(batch.items) + len(batch.errors))
        finally:
            bar.close()
            # Whatever finished is kept, even when a bad image stops the run.
            for kind, (ks, vs) in pending.items():
                if ks:
                    cache.put(encoder.encoder_id, kind, ks, np.stack(vs))
                    extra[kind].update(zip(ks, vs))
    bad_rows = {i for i, _ in bad}
    keep = [i for i in range(len(keys)) if i not in bad_rows]
    if not keep:
        raise MmtagError(f"{dataset.path}: no usable image in the dataset")
    arrays = {kind: cache.gather(encoder.encoder_id, kind, [keys[i] for i in keep], extra[kind])
              for kind in kinds}
    return arrays, keep, sorted(bad, key=lambda b: b[0])


def _view_key(key: str, tag: str) -> str:
    return hashlib.sha1(f"{key}|{tag}".encode()).hexdigest()


def _seed_of(key: str) -> int:
    """A deterministic augmentation seed per cached item, whichever worker decodes it."""
    return int(key[:15], 16)


def extract_views(dataset: Dataset, kinds: Iterable[str], views: int, *,
                  image_encoder: ImageEncoder | None, text_encoder: TextEncoder | None,
                  cache: FeatureCache, image_augment: ImageAugment | None,
                  text_augment: TextAugment | None, seed: int = 0, workers: int = 2,
                  progress: bool = True, runner: Runner = _same) -> list[Features]:
    """K augmented views of every row's features, each cached like plain features.

    With frozen encoders, augmentation only reaches the model through features: a training run
    caches `views` augmented versions of each item once and draws one per row per epoch. Kinds of
    a modality without augmentation are absent (the caller uses the plain ones).
    """
    kinds = set(kinds)
    out: list[Features] = []
    for k in range(views):
        arrays: dict[str, np.ndarray] = {}
        image_kinds = sorted(kind for kind in kinds if KIND_MODALITY.get(kind) == "image")
        if image_kinds and image_augment is not None and image_encoder is not None:
            tag = f"{image_augment.spec}|seed{seed}|view{k}"
            image_arrays, keep, bad = _extract_images(dataset, image_kinds, image_encoder, cache,
                                                      skip_bad=False, workers=workers, batch_size=32,
                                                      progress=progress, view=(image_augment, tag),
                                                      runner=runner)
            arrays.update(image_arrays)
        if "text" in kinds and text_augment is not None and text_encoder is not None:
            captions = [text_augment(c, _seed_of(_view_key(caption_key(c), f"{seed}|{k}")))
                        for c in dataset.captions]
            arrays["text"] = _extract_text(captions, text_encoder, cache, progress=progress,
                                           what="augmented text features", runner=runner)
        f = Features(arrays)
        out.append(f)
    return out


def encode_images(encoder: ImageEncoder, images: torch.Tensor) -> dict[str, np.ndarray]:
    """One batch of decoded images (B, 3, S, S), uint8 (`data.decode_image`) or normalised
    float (`data.load_image`) → {"image", "image_tokens", "image_max"} arrays (pooled, spatial
    tokens, tokens max-pooled), computed on the encoder's device (autocast under `--amp` on
    CUDA)."""
    device = dist.device_of(encoder)
    # Normalised after the move: on a GPU the uint8 batch is the smaller transfer.
    x = normalize_images(images.to(device))
    if encoder.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), dist.context().autocast():
        pooled, tokens = encoder(x)
        peak = tokens.amax(dim=1)  # any encoder and its ONNX graph give tokens: no new output
    return {"image": pooled.float().cpu().numpy(), "image_tokens": tokens.float().cpu().numpy(),
            "image_max": peak.float().cpu().numpy()}


def encode_captions(encoder: TextEncoder, captions: list[str]) -> np.ndarray:
    """One batch of captions → (B, D) float32 vectors (on the encoder's device)."""
    device = dist.device_of(encoder)
    inputs = {k: v.to(device) for k, v in encoder.tokenize(captions).items()}
    with torch.inference_mode(), dist.context().autocast():
        return encoder(**inputs).float().cpu().numpy()


def _extract_text(captions: list[str], encoder: TextEncoder, cache: FeatureCache, *,
                  progress: bool, batch_size: int = 128, what: str = "text features",
                  runner: Runner = _same) -> np.ndarray:
    return _recomputing(lambda: _extract_text_once(captions, encoder, cache, progress=progress,
                                                   batch_size=batch_size, what=what, runner=runner))


def _extract_text_once(captions: list[str], encoder: TextEncoder, cache: FeatureCache, *,
                       progress: bool, batch_size: int, what: str, runner: Runner) -> np.ndarray:
    keys = [caption_key(c) for c in captions]
    index = cache.index(encoder.encoder_id, "text")
    todo: dict[str, str] = {}
    for key, cap in zip(keys, captions):
        if key not in index:
            todo.setdefault(key, cap)
    extra: dict[str, np.ndarray] = {}
    if todo:
        compute = runner(encoder, len(todo))
        # Sorting by length keeps padding (wasted compute) low within a batch.
        items = sorted(todo.items(), key=lambda kv: len(kv[1]))
        bar = Bar(label=f"{what} {encoder.name}", total=len(items), unit="cap", show=progress)
        ks: list[str] = []
        vs: list[np.ndarray] = []
        try:
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                vec = encode_captions(compute, [c for _, c in chunk]).astype(np.float16)  # type: ignore[arg-type]
                ks.extend(k for k, _ in chunk)
                vs.extend(vec)
                if len(ks) >= SHARD_ITEMS:
                    cache.put(encoder.encoder_id, "text", ks, np.stack(vs))
                    extra.update(zip(ks, vs))
                    ks, vs = [], []
                bar.update(len(chunk))
        finally:
            bar.close()
            if ks:
                cache.put(encoder.encoder_id, "text", ks, np.stack(vs))
                extra.update(zip(ks, vs))
    return cache.gather(encoder.encoder_id, "text", keys, extra)
