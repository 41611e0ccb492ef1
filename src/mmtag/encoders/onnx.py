"""The `onnx:NAME` encoders: ONNX Runtime graphs of exported bundles (`mmtag export`).

They sit with the other encoder families so that loading any bundle needs only this package;
`mmtag.model.export` writes them and imports this package, never the other way round.
onnxruntime is imported only when a graph is loaded, never when this module is.
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MmtagError, quoted
from ..io import atomic_path, atomic_write_text, load_json
from .base import (Encoder, EncoderEntry, EncoderFamily, ImageEncoder, Lookup, TextEncoder,
                   error_summary, sha256_file)

ONNX_MODEL_FILE = "model.onnx"
RUN_BATCH = 8  # images per ONNX Runtime call


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MmtagError("ONNX bundles need onnxruntime: pip install onnxruntime") from None
    return onnxruntime


def _session(path: Path) -> Any:
    """A single-threaded session: parallelism comes from running several batches at once (see
    `OnnxEncoder._run`), which on 2 cores beat one session splitting each operator over 2
    threads — Lite0 about 160 against 135 images/s, MiniLM int8 about 1150 against 950
    captions/s — because the threads never wait for each other inside an operator."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    # No idle spinning: the JPEG-decoding workers share these cores, and spinning took their
    # time (measured: 80 → 89 pairs/s end to end on 2 cores).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """Shared by both ONNX encoders: the graph file is the weights, so its hash is the id."""

    path: Path
    meta: dict[str, Any]
    _weights_hash: str

    def _init_onnx(self, name: str, path: Path, meta: dict[str, Any]) -> None:
        self.name = name
        self.path = path
        self.meta = meta
        self.dim = int(meta["dim"])
        self.session = _session(path)
        # One worker per thread torch may use (OMP_NUM_THREADS / torch.set_num_threads), so
        # one knob sets both runtimes' parallelism; ORT releases the GIL while it runs.
        self._threads = max(1, torch.get_num_threads())
        self._pool: ThreadPoolExecutor | None = None

    def _run(self, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        """Each feed's outputs, in order, with up to `_threads` feeds running at once."""
        if self._threads == 1 or len(feeds) == 1:
            return [self.session.run(None, f) for f in feeds]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="mmtag-onnx")
        return list(self._pool.map(lambda f: self.session.run(None, f), feeds))

    def finalize(self) -> None:  # nothing to round or freeze: the weights live in the graph
        self._weights_hash = sha256_file(self.path)

    def twin_of(self, source: Encoder) -> None:
        """Stand in for `source`, whose graph this is (`encoders.onnx_export.runtime_twin`):
        its name and weights hash (and an image encoder's own size, from which its image size
        may differ), hence its `encoder_id` and its feature-cache entries."""
        self.name = source.name
        self._weights_hash = source.weights_sha256
        if isinstance(source, ImageEncoder):
            self._native_image_size = source.native_image_size

    def _save_graph(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / ONNX_MODEL_FILE
        if target.resolve() != self.path.resolve():
            with atomic_path(target) as tmp:
                shutil.copyfile(self.path, tmp)
        atomic_write_text(directory / "encoder.json", json.dumps(
            {"name": self.name, **self.meta}, indent=2))
        return target


class OnnxImageEncoder(OnnxEncoder, ImageEncoder):
    """An exported image encoder: normalised images → pooled vector and spatial tokens."""

    channels_last = False  # ONNX Runtime picks its own layout; NHWC input would cost a copy

    def __init__(self, name: str, path: Path, meta: dict[str, Any]) -> None:
        ImageEncoder.__init__(self)
        self._init_onnx(name, path, meta)
        self.image_size = int(meta["image_size"])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.ascontiguousarray(images.detach().numpy(), dtype=np.float32)
        # Small runs keep each layer's activations in cache: measured on 2 cores, Lite0 runs at
        # 165 images/s in runs of 8 against 147/s in runs of 32.
        outs = self._run([{"images": x[i:i + RUN_BATCH]} for i in range(0, len(x), RUN_BATCH)])
        return (torch.from_numpy(np.concatenate([o[0] for o in outs])),
                torch.from_numpy(np.concatenate([o[1] for o in outs])))

    def _resize(self, size: int) -> None:
        raise MmtagError(f"image encoder '{self.name}': its ONNX graph reads {self.image_size}x"
                         f"{self.image_size} images (it was traced at that size), not {size}x{size}")

    def save(self, directory: Path) -> list[Path]:
        return [self._save_graph(directory)]


class OnnxTextEncoder(OnnxEncoder, TextEncoder):
    """An exported text encoder: the saved tokenizer + an ONNX graph ending in mean pooling."""

    def __init__(self, name: str, path: Path, meta: dict[str, Any]) -> None:
        TextEncoder.__init__(self)
        self._init_onnx(name, path, meta)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path.parent))
        self.max_length = int(meta.get("max_length", self.max_length))

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(captions, padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="np")
        return {"input_ids": torch.from_numpy(batch["input_ids"].astype(np.int64)),
                "attention_mask": torch.from_numpy(batch["attention_mask"].astype(np.int64))}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        parts = max(1, min(self._threads, len(input_ids)))  # contiguous row blocks, as views
        outs = self._run([{"input_ids": i, "attention_mask": m} for i, m in
                          zip(np.array_split(input_ids.numpy(), parts),
                              np.array_split(attention_mask.numpy(), parts))])
        return torch.from_numpy(np.concatenate([o[0] for o in outs]))

    def save(self, directory: Path) -> list[Path]:
        target = self._save_graph(directory)
        if self.path.parent.resolve() != directory.resolve():
            self.tokenizer.save_pretrained(str(directory))
        return [target]


def load_onnx_encoder(name: str, directory: Path) -> Encoder:
    """Rebuild an `onnx:<name>` encoder from a bundle directory."""
    meta_path = directory / "encoder.json"
    try:
        meta = load_json(meta_path, "encoder metadata file")
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        raise MmtagError(f"{meta_path}: cannot read ONNX encoder metadata ({error_summary(exc)})") from None
    if not isinstance(meta, dict):
        raise MmtagError(f"{meta_path}: ONNX encoder metadata is not a JSON object")
    meta.pop("name", None)
    modality = meta.get("modality")
    needed = ("dim", "image_size") if modality == "image" else ("dim",)
    bad = [k for k in needed if isinstance(meta.get(k), bool) or not isinstance(meta.get(k), int)
           or meta[k] < 1]
    if modality not in ("image", "text") or bad:
        raise MmtagError(f"{meta_path}: ONNX encoder metadata needs modality image|text and positive "
                         f"integer {' and '.join(needed)} (got modality {quoted(modality)}"
                         + "".join(f", {k} {quoted(meta.get(k))}" for k in needed) + ")")
    cls = OnnxImageEncoder if modality == "image" else OnnxTextEncoder
    graph = directory / ONNX_MODEL_FILE
    if not graph.is_file():
        raise MmtagError(f"{graph}: ONNX graph missing")
    try:
        return cls(name, graph, meta)
    except MmtagError:
        raise
    except Exception as exc:  # onnxruntime's and the tokenizer's many exception types
        raise MmtagError(f"{graph}: not a loadable ONNX {modality} encoder ({error_summary(exc)})") from None


def _onnx_entry(source_name: str, lookup: Lookup) -> EncoderEntry:
    name = f"onnx:{source_name}"
    source = lookup(source_name)

    def create(random_init: bool) -> Encoder:
        raise MmtagError(f"encoder '{name}' is an export: train with '{source_name}', then run "
                         "`mmtag export RUN --format onnx`")

    def load(directory: Path) -> Encoder:
        return load_onnx_encoder(name, directory)

    def present() -> bool:
        import importlib.util

        return importlib.util.find_spec("onnxruntime") is not None

    return EncoderEntry(name, source.modality, create, load, present,
                        f"ONNX Runtime export of {source_name}")


ONNX = EncoderFamily("onnx", _onnx_entry, None)  # the registry's family (mmtag.registries)
