"""Tracing encoders to ONNX graphs, checked against eager PyTorch, and ONNX Runtime twins.

Two users: `mmtag export` (`model.export`) ships a bundle's encoders as graphs, and feature
extraction (`features.extract`, through the Featurizer) computes the features of a frozen encoder
with its *runtime twin*: the same encoder traced to a graph once, kept in the feature cache, and
run by ONNX Runtime, which fuses convolution, batch norm and activation and runs depthwise
convolutions in blocked layouts. On this project's 2-core CPU, decoding included, EfficientNet-Lite0
ran at 59 images/s that way against 15 in eager PyTorch, and MiniLM at 281 captions/s against 176
(bench/feature_runtime.py). A twin keeps its source's name and `encoder_id`, so it reads and writes
the same cache entries: its features agree with the eager ones to a cosine of 0.9999 (checked on
probe inputs before first use), and the cache stores fp16 anyway.

onnx / onnxruntime are imported only when a graph is made or loaded.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import MmtagError
from ..io import load_json
from .base import Encoder, ImageEncoder, TextEncoder
from .onnx import ONNX_MODEL_FILE, OnnxEncoder, OnnxImageEncoder, OnnxTextEncoder

log = logging.getLogger("mmtag")

OPSET = 17
# Agreement demanded of an exported graph with the eager encoder (cosine of feature vectors):
# fp32 graphs must match to rounding; int8 graphs lose a little (measured ≈ 0.99 for MiniLM).
MIN_COSINE = {"fp32": 0.9999, "int8": 0.98}


def export_graph(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path,
                  inputs: list[str], outputs: list[str], dynamic: dict[str, dict[int, str]]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about shapes that dynamic_axes handles
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float((num / den).min())


def export_image_encoder(enc: ImageEncoder, workdir: Path, *,
                         fp16_weights: bool = False) -> OnnxImageEncoder:
    """Trace `enc` to ONNX (fp32), check it against eager on an unseen batch size. With
    `fp16_weights` its weights are stored in fp16 and computed with in fp32 (`store_fp16`)."""
    enc.eval()
    s = enc.image_size
    path = workdir / "image" / ONNX_MODEL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    export_graph(enc, (torch.zeros(2, 3, s, s),), path, ["images"], ["pooled", "tokens"],
                  {"images": {0: "batch"}, "pooled": {0: "batch"}, "tokens": {0: "batch"}})
    meta = {"modality": "image", "source_encoder": enc.name, "source_sha256": enc.weights_sha256,
            "image_size": s, "dim": enc.dim, "precision": "fp32", "opset": OPSET}
    if fp16_weights:
        store_fp16(path)
        meta["stored_weights"] = "fp16"
    out = OnnxImageEncoder(f"onnx:{enc.name}", path, meta)
    probe = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (3, 3, s, s)).astype(np.float32))
    with torch.inference_mode():
        want = enc(probe)
    got = out(probe)
    cos = min(cosine(g.numpy(), w.numpy()) for g, w in zip(got, want))
    check_agreement(enc.name, "fp32", cos)
    out.meta["probe_cosine"] = round(cos, 6)
    out.finalize()
    return out


def export_text_encoder(enc: TextEncoder, workdir: Path, *, int8: bool) -> OnnxTextEncoder:
    """Trace `enc` to ONNX, optionally quantise to int8, check against eager on unseen shapes."""
    enc.eval()
    directory = workdir / "text"
    directory.mkdir(parents=True, exist_ok=True)
    fp32 = directory / ("fp32.onnx" if int8 else ONNX_MODEL_FILE)
    trace = enc.tokenize(["a photo", "two people riding horses along a beach at sunset"])
    export_graph(enc, (trace["input_ids"], trace["attention_mask"]), fp32,
                  ["input_ids", "attention_mask"], ["pooled"],
                  {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                   "pooled": {0: "batch"}})
    precision = "fp32"
    path = fp32
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        path = directory / ONNX_MODEL_FILE
        # Per-channel scales keep MiniLM's features at cosine ≈ 0.99 of fp32 (per-tensor: ≈ 0.96).
        logging.disable(logging.WARNING)  # the quantiser logs advice to the root logger
        try:
            quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gather"])
        finally:
            logging.disable(logging.NOTSET)
        fp32.unlink()
        precision = "int8"
    enc.tokenizer.save_pretrained(str(directory))  # type: ignore[attr-defined]
    out = OnnxTextEncoder(f"onnx:{enc.name}", path, {
        "modality": "text", "source_encoder": enc.name, "source_sha256": enc.weights_sha256,
        "dim": enc.dim, "max_length": enc.max_length, "precision": precision, "opset": OPSET})
    probe = enc.tokenize(["a dog", "a man on a motorcycle next to a red bus",
                          "a cat sleeping on a bench in the park near three bicycles and a car"])
    with torch.inference_mode():
        want = enc(**probe).numpy()
    cos = cosine(out(**probe).numpy(), want)
    check_agreement(enc.name, precision, cos)
    out.meta["probe_cosine"] = round(cos, 6)
    out.finalize()
    return out


# Only float initializers of at least this many elements are stored in fp16. The small ones hold
# little of the bytes but most of the rounding error: in EfficientNet-Lite0 (batch norm folded
# into the convolutions) the early layers' few, wide-ranged weights and biases. Measured on 48
# real images against the fp32 graph: every tensor in fp16 saves 6.7 MB at a relative error of
# the features of up to 4.8% (cosine 0.9996); those of >= 65536 elements (the 16 largest) save
# 5.7 MB at 0.28%. Random probe images show neither (cosine 0.99999 for both).
FP16_MIN_ELEMENTS = 16384


def store_fp16(path: Path) -> None:
    """Rewrite the graph at `path` with its float32 weights stored as float16, each behind a
    Cast back to float32: the file halves, while the computation stays fp32, since ONNX Runtime
    folds the Casts into fp32 constants when it loads the graph (the optimised graph is the
    fp32 one). Measured on EfficientNet-Lite0: 13.5 → 6.8 MB, features at cosine 0.99999 of
    the fp32 graph's, the same speed. A tensor with values beyond fp16's range stays fp32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inputs = {i.name for i in graph.input}  # an initializer that is also an input stays as is
    taken = ({i.name for i in graph.initializer} | inputs
             | {n for node in graph.node for n in node.output})
    casts = []
    for init in graph.initializer:
        if (init.data_type != TensorProto.FLOAT or init.name in inputs
                or int(np.prod(init.dims)) < FP16_MIN_ELEMENTS):
            continue
        weights = numpy_helper.to_array(init)
        half = weights.astype(np.float16)
        if not np.isfinite(half).all():
            continue
        name, stored = init.name, f"{init.name}.fp16"
        while stored in taken:
            stored += "_"
        taken.add(stored)
        init.CopyFrom(numpy_helper.from_array(half, stored))
        casts.append(helper.make_node("Cast", [stored], [name], name=f"{stored}.cast",
                                      to=TensorProto.FLOAT))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)  # the Casts first: the graph stays in topological order
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def check_agreement(name: str, precision: str, cos: float) -> None:
    if cos < MIN_COSINE[precision]:
        raise MmtagError(f"export of '{name}' ({precision}) disagrees with the eager encoder "
                         f"(cosine {cos:.4f} < {MIN_COSINE[precision]}); not exporting it")
    log.info("exported %s (%s): probe cosine %.6f", name, precision, cos)


def export_encoder(enc: Encoder, workdir: Path, *, int8: bool = False,
                   fp16_weights: bool = False) -> OnnxEncoder:
    """`enc` traced into `workdir/<modality>/` and checked against eager (see above).
    `int8` quantises a text encoder; `fp16_weights` stores an image encoder's weights in fp16."""
    if isinstance(enc, OnnxEncoder):
        raise MmtagError(f"the {enc.modality} encoder is already an ONNX export")
    if isinstance(enc, ImageEncoder):
        return export_image_encoder(enc, workdir, fp16_weights=fp16_weights)
    if isinstance(enc, TextEncoder):
        return export_text_encoder(enc, workdir, int8=int8)
    raise MmtagError(f"encoder '{enc.name}' is neither an image nor a text encoder")


TWIN_DIR = "onnx-twins"  # under the feature cache root: <root>/onnx-twins/<encoder_id>/


def _twin_dir(enc: Encoder, cache_root: Path) -> Path:
    return cache_root / TWIN_DIR / enc.encoder_id


def twin_traced(enc: Encoder, cache_root: Path | None) -> bool:
    """Whether `enc`'s runtime twin is in the cache already (using it costs no tracing)."""
    return cache_root is not None and (_twin_dir(enc, cache_root) / "done.json").is_file()


def runtime_twin(enc: Encoder, cache_root: Path | None) -> OnnxEncoder:
    """An ONNX Runtime copy of frozen `enc` with its name and `encoder_id` (so it shares its
    cache entries), from `<cache_root>/onnx-twins/<encoder_id>/` or traced there first (a few
    seconds; atomic, so concurrent ranks or runs never see half a graph). Raises MmtagError
    where tracing fails or the graph disagrees with eager PyTorch."""
    if cache_root is None:
        # No cache to keep it in: a directory that lives as long as the process stands in.
        cache_root = Path(tempfile.mkdtemp(prefix="mmtag-twin-"))
        atexit.register(shutil.rmtree, cache_root, True)
    final = _twin_dir(enc, cache_root)
    if not twin_traced(enc, cache_root):
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".tracing-", dir=final.parent))
        try:
            graph = export_encoder(enc, work)
            # Written last, so a directory without it is an interrupted trace, never used.
            (graph.path.parent / "done.json").write_text(json.dumps(graph.meta, indent=2),
                                                         encoding="utf-8")
            try:
                os.rename(graph.path.parent, final)
            except OSError:  # another process finished first: theirs is as good
                if not twin_traced(enc, cache_root):
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    try:
        meta = load_json(final / "done.json", "traced encoder's metadata file")
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("source_sha256") != enc.weights_sha256 or \
            meta.get("image_size") != getattr(enc, "image_size", None):
        # a foreign or damaged directory
        raise MmtagError(f"{final}: damaged, or traced from other weights or another image size "
                         f"than '{enc.name}'; delete it")
    cls = OnnxImageEncoder if enc.modality == "image" else OnnxTextEncoder
    twin = cls(enc.name, final / ONNX_MODEL_FILE, meta)
    twin.twin_of(enc)
    return twin
