"""Exporting a trained bundle's encoders to ONNX Runtime graphs (`mmtag export`).

An exported bundle is an ordinary bundle whose encoders are `onnx:<name>`: the same head,
thresholds and labels, but the encoders run as ONNX graphs in ONNX Runtime (CPU), which fuses
operators and runs convolutions in blocked layouts — several times faster than eager PyTorch on a
laptop CPU. With `int8`, the text encoder's MatMul and embedding weights are quantised to int8
(dynamic, per output channel), which quarters its size; the image encoder stays fp32, since
dynamic int8 convolutions are slower on CPU than fp32 ones and the CNN is small anyway.

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

from ..encoders import Encoder, export_encoder


def export_encoders(encoders: dict[str, Encoder], *, int8: bool) -> tuple[dict[str, Encoder], Path]:
    """ONNX copies of a bundle's encoders, built in a temporary directory the caller removes."""
    workdir = Path(tempfile.mkdtemp(prefix="mmtag-export-"))
    out: dict[str, Encoder] = {}
    try:
        for modality, enc in encoders.items():
            out[modality] = export_encoder(enc, workdir, int8=int8)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return out, workdir
