"""Computing encoder features once, and caching them on disk by encoder id + input content.

The cache is content-addressed: an image's key is the SHA-1 of its file bytes, a caption's the
SHA-1 of its text. So a second `train`, an `evaluate` on a subset, or another CSV naming the same
files reuses what was computed. Shards are written as extraction proceeds (atomically), so an
interrupted extraction resumes where it stopped. Each shard carries the SHA-256 of its array;
a shard whose bytes no longer match (a flipped bit, a file truncated behind mmtag's back) is
deleted when read and its items are computed again.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from .. import dist
from ..data.augment import ImageAugment, TextAugment
from ..data import Dataset, ImageItems, image_batches, image_loader, normalize_images
from ..encoders import ImageEncoder, TextEncoder
from ..errors import DataError, MmtagError
from ..io import atomic_write_with

log = logging.getLogger("mmtag")

FEATURE_KINDS = ("image", "image_tokens", "text")
SHARD_ITEMS = 512  # items per cache shard: the unit of work lost if extraction is killed
T = TypeVar("T")


class Features:
    """Per-item encoder outputs keyed by feature kind, row-aligned with a Dataset (fp16 to halve
    memory and disk). A kind is a modality's name ("image", "text"), or that name with a
    suffix for another output of the same encoder ("image_tokens": the spatial tokens); a new
    modality is a new key, not a new field in every type that carries features."""

    def __init__(self, arrays: dict[str, np.ndarray] | None = None) -> None:
        self.arrays: dict[str, np.ndarray] = dict(arrays or {})
        rows = {len(a) for a in self.arrays.values()}
        if len(rows) > 1:
            raise MmtagError(f"features of different lengths: "
                             f"{ {k: len(a) for k, a in self.arrays.items()} }")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values()))) if self.arrays else 0

    def __contains__(self, kind: object) -> bool:
        return kind in self.arrays

    def __getitem__(self, kind: str) -> np.ndarray:
        return self.arrays[kind]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.arrays)

    def subset(self, index: np.ndarray | list[int]) -> "Features":
        idx = np.asarray(index, dtype=np.int64)
        return Features({k: a[idx] for k, a in self.arrays.items()})

    def get(self, kind: str) -> np.ndarray | None:
        return self.arrays.get(kind)


def modality_of(kind: str) -> str:
    """The modality a feature kind comes from: "image_tokens" → "image"."""
    return kind.split("_", 1)[0]


def concat_features(a: Features, b: Features) -> Features:
    """Rows of `a` followed by rows of `b` (kinds present in both)."""
    return Features({k: np.concatenate([a[k], b[k]]) for k in a.kinds if k in b})


@dataclass
class FeatureSet:
    """Features plus the dataset rows they belong to (rows with bad images may be dropped)."""

    features: Features
    dataset: Dataset
    skipped: list[DataError] = field(default_factory=list)


class CorruptShard(MmtagError):
    """A cache shard failed its checksum; it has been removed and its items must be recomputed."""


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).data).hexdigest()


class FeatureCache:
    """Shards of `<root>/<encoder_id>/<kind>/*.safetensors`, each holding keys + an fp16 array."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None
        self._index: dict[tuple[str, str], dict[str, tuple[Path, int]]] = {}

    def _dir(self, encoder_id: str, kind: str) -> Path:
        assert self.root is not None
        return self.root / encoder_id / kind

    def index(self, encoder_id: str, kind: str) -> dict[str, tuple[Path, int]]:
        """key → (shard, row) for everything cached for this encoder and kind."""
        cache_key = (encoder_id, kind)
        if cache_key in self._index:
            return self._index[cache_key]
        found: dict[str, tuple[Path, int]] = {}
        if self.root is not None and self._dir(encoder_id, kind).is_dir():
            for shard in sorted(self._dir(encoder_id, kind).glob("*.safetensors")):
                try:
                    with safe_open(str(shard), "np") as fh:
                        keys = (fh.metadata() or {}).get("keys", "").split("\n")
                except Exception:  # a torn or foreign file: ignore it, its items get recomputed
                    log.warning("ignoring unreadable cache shard %s", shard)
                    continue
                for row, key in enumerate(keys):
                    if key:
                        found[key] = (shard, row)
        self._index[cache_key] = found
        return found

    def forget_index(self) -> None:
        """Drop the in-memory index, so the next lookup sees shards other processes wrote."""
        self._index.clear()

    def put(self, encoder_id: str, kind: str, keys: list[str], values: np.ndarray) -> None:
        """Store one shard; the in-memory index learns it too."""
        if self.root is None or not keys:
            return
        directory = self._dir(encoder_id, kind)
        directory.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:20]
        path = directory / f"{name}.safetensors"
        arr = np.ascontiguousarray(values.astype(np.float16))
        meta = {"keys": "\n".join(keys), "sha256": _digest(arr)}
        atomic_write_with(path, lambda p: save_file({"x": arr}, str(p), metadata=meta))
        idx = self.index(encoder_id, kind)
        for row, key in enumerate(keys):
            idx[key] = (path, row)

    def gather(self, encoder_id: str, kind: str, keys: list[str],
               extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Stack cached vectors for `keys` (which must all be cached or in `extra`)."""
        idx = self.index(encoder_id, kind)
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        out: np.ndarray | None = None
        for i, key in enumerate(keys):
            if extra is not None and key in extra:
                value = extra[key]
                if out is None:
                    out = np.empty((len(keys),) + value.shape, dtype=np.float16)
                out[i] = value
            else:
                shard, row = idx[key]
                by_shard.setdefault(shard, []).append((i, row))
        corrupt: list[Path] = []
        for shard, pairs in by_shard.items():
            data = self._read_verified(shard)
            if data is None:
                corrupt.append(shard)
                continue
            if out is None:
                out = np.empty((len(keys),) + data.shape[1:], dtype=np.float16)
            rows_out = np.array([p[0] for p in pairs])
            rows_in = np.array([p[1] for p in pairs])
            out[rows_out] = data[rows_in]
        if corrupt:
            self._forget(encoder_id, kind, corrupt)
            raise CorruptShard(f"{len(corrupt)} cache shard(s) failed their checksum, e.g. {corrupt[0]}")
        if out is None:
            raise MmtagError("no features to gather (empty dataset)")
        return out


    @staticmethod
    def _read_verified(shard: Path) -> np.ndarray | None:
        """The shard's array, or None if it is unreadable or fails its checksum."""
        try:
            with safe_open(str(shard), "np") as fh:
                expected = (fh.metadata() or {}).get("sha256")
                data = fh.get_tensor("x")
        except Exception:  # torn after indexing, or deleted by another process
            return None
        return data if expected is not None and _digest(data) == expected else None

    def _forget(self, encoder_id: str, kind: str, shards: list[Path]) -> None:
        """Delete bad shards and drop their keys from the index, so their items get recomputed."""
        bad = set(shards)
        for shard in bad:
            log.warning("cache shard %s is corrupt or has no checksum; recomputing its items", shard)
            shard.unlink(missing_ok=True)
        idx = self.index(encoder_id, kind)
        for key in [k for k, (s, _) in idx.items() if s in bad]:
            del idx[key]


def _recomputing(compute: Callable[[], T]) -> T:
    """Run an extraction; if cache shards turned out corrupt (they are forgotten by then), run
    it once more, which recomputes exactly their items."""
    try:
        return compute()
    except CorruptShard:
        return compute()


def caption_key(caption: str) -> str:
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()


def file_key(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract(dataset: Dataset, kinds: Iterable[str], *, image_encoder: ImageEncoder | None,
            text_encoder: TextEncoder | None, cache: FeatureCache, skip_bad: bool = False,
            workers: int = 2, batch_size: int = 32, progress: bool = True,
            distribute: bool = True) -> FeatureSet:
    """Features of `kinds` for every row of `dataset`, computing only what the cache lacks.

    A row whose image cannot be decoded raises DataError (after everything computed so far has
    been cached), or with `skip_bad` is dropped and reported in `FeatureSet.skipped`.

    Under torchrun (and `distribute`), each rank first computes its shard of the rows into the
    cache; then every rank reads all rows from it. With the cache on storage all ranks share,
    every item is computed once; on a cache private to a machine, a rank computes what it
    cannot find (slower, same result).
    """
    ctx = dist.context()
    if distribute and ctx.distributed and cache.root is not None:
        dist.checked(lambda: extract(
            dataset.subset(ctx.shard(len(dataset))), kinds, image_encoder=image_encoder,
            text_encoder=text_encoder, cache=cache, skip_bad=skip_bad, workers=workers,
            batch_size=batch_size, progress=progress, distribute=False))
        cache.forget_index()
        progress = False  # what is left is reading the cache
    kinds = set(kinds)
    unknown = kinds - set(FEATURE_KINDS)
    if unknown:
        raise MmtagError(f"unknown feature kind(s) {sorted(unknown)}")
    arrays: dict[str, np.ndarray] = {}
    skipped: list[DataError] = []
    if kinds & {"image", "image_tokens"}:
        if image_encoder is None:
            raise MmtagError("image features requested but no image encoder given")
        image_kinds = sorted(kinds & {"image", "image_tokens"})
        image_arrays, keep, bad = _extract_images(dataset, image_kinds, image_encoder, cache,
                                            skip_bad=skip_bad, workers=workers,
                                            batch_size=batch_size, progress=progress)
        if bad:
            skipped.extend(err for _, err in bad)
            dataset = dataset.subset(keep)
        arrays.update(image_arrays)
    if "text" in kinds:
        if text_encoder is None:
            raise MmtagError("text features requested but no text encoder given")
        arrays["text"] = _extract_text(dataset.captions, text_encoder, cache, progress=progress)
    return FeatureSet(features=Features(arrays), dataset=dataset, skipped=skipped)


def _extract_images(*args, **kwargs) -> tuple[dict[str, np.ndarray], list[int], list[tuple[int, DataError]]]:
    return _recomputing(lambda: _extract_images_once(*args, **kwargs))


def _extract_images_once(dataset: Dataset, kinds: list[str], encoder: ImageEncoder, cache: FeatureCache,
                    *, skip_bad: bool, workers: int, batch_size: int, progress: bool,
                    view: tuple[ImageAugment, str] | None = None) -> tuple[dict[str, np.ndarray], list[int], list[tuple[int, DataError]]]:
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
        order = list(todo.items())
        items = ImageItems([paths[i] for _, i in order], encoder.image_size,
                           view[0] if view else None, source=dataset, rows=[i for _, i in order])
        seeds = [_seed_of(k) if view else None for k, _ in order]
        loader = image_loader(items, image_batches(seeds, batch_size), workers)
        pending: dict[str, tuple[list[str], list[np.ndarray]]] = {k: ([], []) for k in kinds}
        bar = tqdm(total=len(order), desc=f"{encoder.name} features", unit="img", disable=not progress)
        try:
            for batch in loader:
                for j, msg in batch.errors:
                    err = items.error(j, msg)
                    if not skip_bad:
                        raise err
                    bad.extend((i, err) for i, k in enumerate(keys) if k == order[j][0])
                if batch.images is not None:
                    outs = encode_images(encoder, batch.images)
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
                  progress: bool = True) -> list[Features]:
    """K augmented views of every row's features, each cached like plain features.

    With frozen encoders, augmentation only reaches the model through features: a training run
    caches `views` augmented versions of each item once and draws one per row per epoch. Kinds of
    a modality without augmentation are absent (the caller uses the plain ones).
    """
    kinds = set(kinds)
    out: list[Features] = []
    for k in range(views):
        arrays: dict[str, np.ndarray] = {}
        image_kinds = sorted(kinds & {"image", "image_tokens"})
        if image_kinds and image_augment is not None and image_encoder is not None:
            tag = f"{image_augment.spec}|seed{seed}|view{k}"
            image_arrays, keep, bad = _extract_images(dataset, image_kinds, image_encoder, cache,
                                                      skip_bad=False, workers=workers, batch_size=32,
                                                      progress=progress, view=(image_augment, tag))
            arrays.update(image_arrays)
        if "text" in kinds and text_augment is not None and text_encoder is not None:
            captions = [text_augment(c, _seed_of(_view_key(caption_key(c), f"{seed}|{k}")))
                        for c in dataset.captions]
            arrays["text"] = _extract_text(captions, text_encoder, cache, progress=progress)
        f = Features(arrays)
        out.append(f)
    return out


def encode_images(encoder: ImageEncoder, images: torch.Tensor) -> dict[str, np.ndarray]:
    """One batch of decoded images (B, 3, S, S), uint8 (`data.decode_image`) or normalised
    float (`data.load_image`) → {"image", "image_tokens"} arrays, computed on the encoder's
    device (autocast under `--amp` on CUDA)."""
    device = dist.device_of(encoder)
    # Normalised after the move: on a GPU the uint8 batch is the smaller transfer.
    x = normalize_images(images.to(device))
    if encoder.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), dist.context().autocast():
        pooled, tokens = encoder(x)
    return {"image": pooled.float().cpu().numpy(), "image_tokens": tokens.float().cpu().numpy()}


def encode_captions(encoder: TextEncoder, captions: list[str]) -> np.ndarray:
    """One batch of captions → (B, D) float32 vectors (on the encoder's device)."""
    device = dist.device_of(encoder)
    inputs = {k: v.to(device) for k, v in encoder.tokenize(captions).items()}
    with torch.inference_mode(), dist.context().autocast():
        return encoder(**inputs).float().cpu().numpy()


def _extract_text(captions: list[str], encoder: TextEncoder, cache: FeatureCache, *,
                  progress: bool, batch_size: int = 128) -> np.ndarray:
    return _recomputing(lambda: _extract_text_once(captions, encoder, cache, progress=progress,
                                                   batch_size=batch_size))


def _extract_text_once(captions: list[str], encoder: TextEncoder, cache: FeatureCache, *,
                       progress: bool, batch_size: int) -> np.ndarray:
    keys = [caption_key(c) for c in captions]
    index = cache.index(encoder.encoder_id, "text")
    todo: dict[str, str] = {}
    for key, cap in zip(keys, captions):
        if key not in index:
            todo.setdefault(key, cap)
    extra: dict[str, np.ndarray] = {}
    if todo:
        # Sorting by length keeps padding (wasted compute) low within a batch.
        items = sorted(todo.items(), key=lambda kv: len(kv[1]))
        bar = tqdm(total=len(items), desc=f"{encoder.name} features", unit="cap", disable=not progress)
        ks: list[str] = []
        vs: list[np.ndarray] = []
        try:
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                vec = encode_captions(encoder, [c for _, c in chunk]).astype(np.float16)
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
