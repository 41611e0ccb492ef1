"""`mmtag export`: a copy of a run whose encoders run in ONNX Runtime."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import MmtagError
from ..io import check_writable_dir
from ..model import bundle as bundle_io
from ..model import rundir
from ..model.tagger import Tagger


def export(run: str | Path, out: str | Path, *, format: str = "onnx", int8: bool = False) -> dict[str, Any]:
    """Write a copy of a run whose encoders run in ONNX Runtime (`mmtag export`); returns its
    manifest. `int8` quantises the text encoder. The head, thresholds and labels are unchanged."""
    # Imported here, not at the top: what loads and runs an exported bundle (the onnx: encoders)
    # must not depend on the code that writes one, and `tests/model/test_export.py` checks it.
    from ..model.export import export_encoders

    if format != "onnx":
        raise MmtagError(f"unknown export format '{format}' (available: onnx)")
    if Path(out).resolve() == Path(run).resolve():
        raise MmtagError(f"{out}: export into a new directory, not over the run itself")
    # Before the slow export: OUT must be new, empty or an mmtag run (replaced only when complete).
    rundir.inspect(out)
    check_writable_dir(Path(os.path.abspath(out)).parent)
    b = bundle_io.load(run)
    encoders, workdir = export_encoders(b.encoders, int8=int8)
    try:
        config = b.config
        for modality, enc in encoders.items():
            setattr(config.model, f"{modality}_encoder", enc.name)
        b.config, b.encoders, b.manifest = config, encoders, {}
        # int8 shifts the scores a little, so the thresholds are re-tuned on the run's own
        # validation split, scored by the export; the export then reports its own metrics.
        # Where that split cannot be replayed, the record (of the eager model) is dropped.
        tagger = Tagger.from_bundle(b)
        recalibrated = tagger.recalibrate() is not None
        if recalibrated:
            state = tagger.state()
            b.thresholds, b.val_metrics, b.validation = (state.thresholds, state.val_metrics,
                                                         state.validation)
        else:
            b.validation = None
        b.extra = {**b.extra, "export": {"format": format, "int8": int8, "from_run": str(run),
                                         "from_manifest_sha256": bundle_io.manifest_sha256(run),
                                         "thresholds_retuned": recalibrated}}
        return bundle_io.save(out, b)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
