"""Exporting a trained bundle's encoders to ONNX Runtime graphs (`mmtag export`).

An exported bundle is an ordinary bundle whose encoders are `onnx:<name>`: the same head,
thresholds and labels, but the encoders run as ONNX graphs in ONNX Runtime (CPU), which fuses
operators and runs convolutions in blocked layouts — several times faster than eager PyTorch on a
laptop CPU. With `int8`, the text encoder's MatMul and embedding weights are quantised to int8
(dynamic, per output channel), which quarters its size, and the image encoder's large weights are
stored in fp16 (`encoders.onnx_export.store_fp16`); the image encoder still computes in fp32,
since dynamic int8 convolutions are slower on CPU than fp32 ones, and ONNX Runtime turns the
fp16 weights back into fp32 constants when it loads the graph, so it runs as fast. Every export
stores the head's weights in fp16 (`fp16_head`), read back as fp32. Neither is done to a
trained run: `mmtag train` writes fp32 heads and its encoders as they are.

The tracing (`encoders.onnx_export`) and the encoders that run the graphs live in `encoders` with
the others: feature extraction traces frozen encoders the same way (runtime twins), and loading a
bundle never needs this module. Every export is checked against the eager encoder on probe
inputs of a batch size and length the trace never saw; a graph that disagrees is refused
instead of silently shipped.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from ..encoders import Encoder, export_encoder

FP16_MAX = float(torch.finfo(torch.float16).max)


def export_encoders(encoders: dict[str, Encoder], *, int8: bool) -> tuple[dict[str, Encoder], Path]:
    """ONNX copies of a bundle's encoders, built in a temporary directory the caller removes."""
    workdir = Path(tempfile.mkdtemp(prefix="mmtag-export-"))
    out: dict[str, Encoder] = {}
    try:
        for modality, enc in encoders.items():
            # --int8 is the compact export: the image encoder's weights go to fp16 with it
            out[modality] = export_encoder(enc, workdir, int8=int8, fp16_weights=int8)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return out, workdir


def fp16_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head's tensors to store in fp16: each fp32 tensor rounded to fp16 (one whose values
    lie beyond fp16's range stays fp32; integer buffers stay as they are). Half the bytes of
    `head.safetensors`; a bundle's loader reads them back as fp32. The export scores its
    validation split with these very values, so its recorded metrics are the stored head's."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        fits = (value.dtype == torch.float32
                and bool((value.abs() <= FP16_MAX).all()))  # NaN fails too: it stays as it was
        out[key] = value.to(torch.float16) if fits else value
    return out
