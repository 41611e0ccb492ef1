"""The on-disk feature cache, keyed by encoder id + input content.

The cache is content-addressed: an image's key is the SHA-1 of its file bytes, a caption's the
SHA-1 of its text. So a second `train`, an `evaluate` on a subset, or another CSV naming the same
files reuses what was computed. Each shard carries the SHA-256 of its array; a shard whose bytes
no longer match (a flipped bit, a file truncated behind mmtag's back) is deleted when read and its
items are computed again.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ..data.groups import file_digest
from ..errors import MmtagError
from ..io import atomic_write_with

log = logging.getLogger("mmtag")

SHARD_ITEMS = 512  # items per cache shard: the unit of work lost if extraction is killed


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


def caption_key(caption: str) -> str:
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()


def file_key(path: Path) -> str:
    return file_digest(path)  # an image is its bytes, as row grouping sees it
