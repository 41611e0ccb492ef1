"""Exporting a trained bundle's encoders to ONNX Runtime graphs (`mmtag export`).

An exported bundle is an ordinary bundle whose encoders are `onnx:<name>`: the same head,
thresholds and labels, but the encoders run as ONNX graphs in ONNX Runtime (CPU), which fuses
operators and runs convolutions in blocked layouts — several times faster than eager PyTorch on a
laptop CPU. With `int8`, the text encoder's MatMul and embedding weights are quantised to int8
(dynamic, per output channel), which quarters its size; the image encoder stays fp32, since
dynamic int8 convolutions are slower on CPU than fp32 ones and the CNN is small anyway.

The encoders that run those graphs live in `encoders` with the others, so loading a bundle never
needs this module, and `encoders` never imports it (no import cycle).

Every export is checked against the eager encoder on probe inputs of a batch size and length the
trace never saw; a graph that disagrees is refused instead of silently shipped.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..encoders import (ONNX_MODEL_FILE, Encoder, ImageEncoder, OnnxEncoder, OnnxImageEncoder,
                       OnnxTextEncoder, TextEncoder)
from ..errors import MmtagError

log = logging.getLogger("mmtag")

OPSET = 17
# Agreement demanded of an exported graph with the eager encoder (cosine of feature vectors):
# fp32 graphs must match to rounding; int8 graphs lose a little (measured ≈ 0.99 for MiniLM).
MIN_COSINE = {"fp32": 0.9999, "int8": 0.98}


def _export_graph(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path,
                  inputs: list[str], outputs: list[str], dynamic: dict[str, dict[int, str]]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about shapes that dynamic_axes handles
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float((num / den).min())


def export_image_encoder(enc: ImageEncoder, workdir: Path) -> OnnxImageEncoder:
    """Trace `enc` to ONNX (fp32), check it against eager on an unseen batch size."""
    enc.eval()
    s = enc.image_size
    path = workdir / "image" / ONNX_MODEL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    _export_graph(enc, (torch.zeros(2, 3, s, s),), path, ["images"], ["pooled", "tokens"],
                  {"images": {0: "batch"}, "pooled": {0: "batch"}, "tokens": {0: "batch"}})
    out = OnnxImageEncoder(f"onnx:{enc.name}", path, {
        "modality": "image", "source_encoder": enc.name, "source_sha256": enc.weights_sha256,
        "image_size": s, "dim": enc.dim, "precision": "fp32", "opset": OPSET})
    probe = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (3, 3, s, s)).astype(np.float32))
    with torch.inference_mode():
        want = enc(probe)
    got = out(probe)
    cos = min(_cosine(g.numpy(), w.numpy()) for g, w in zip(got, want))
    _check(enc.name, "fp32", cos)
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
    _export_graph(enc, (trace["input_ids"], trace["attention_mask"]), fp32,
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
    cos = _cosine(out(**probe).numpy(), want)
    _check(enc.name, precision, cos)
    out.meta["probe_cosine"] = round(cos, 6)
    out.finalize()
    return out


def _check(name: str, precision: str, cos: float) -> None:
    if cos < MIN_COSINE[precision]:
        raise MmtagError(f"export of '{name}' ({precision}) disagrees with the eager encoder "
                         f"(cosine {cos:.4f} < {MIN_COSINE[precision]}); not exporting it")
    log.info("exported %s (%s): probe cosine %.6f", name, precision, cos)


def export_encoders(encoders: dict[str, Encoder], *, int8: bool) -> tuple[dict[str, Encoder], Path]:
    """ONNX copies of a bundle's encoders, built in a temporary directory the caller removes."""
    workdir = Path(tempfile.mkdtemp(prefix="mmtag-export-"))
    out: dict[str, Encoder] = {}
    try:
        for modality, enc in encoders.items():
            if isinstance(enc, OnnxEncoder):
                raise MmtagError(f"the {modality} encoder is already an ONNX export")
            if isinstance(enc, ImageEncoder):
                out[modality] = export_image_encoder(enc, workdir)
            elif isinstance(enc, TextEncoder):
                out[modality] = export_text_encoder(enc, workdir, int8=int8)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return out, workdir
