"""`mmtag export`: a copy of a run whose encoders run in ONNX Runtime."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MmtagError
from ..io import check_writable_dir
from ..model import bundle as bundle_io
from ..model import rundir
from ..model.tagger import Tagger


def export(run: str | Path, out: str | Path, *, format: str = "onnx", int8: bool = False,
           retune: bool = False) -> dict[str, Any]:
    """Write a copy of a run whose encoders run in ONNX Runtime (`mmtag export`); returns its
    manifest. The head's weights are stored in fp16; `int8` quantises the text encoder and
    stores the image encoder's large weights in fp16 (`model.export`). The head, labels,
    thresholds and decision rule are the run's: they were chosen on its validation rows, and
    choosing them again on the same few rows after a small shift in the scores fits noise (on a
    600-row task, re-tuning on 60 rows cut held-out macro-F1 from 0.41 to 0.28). `retune` asks
    for it all the same. Either way the export re-scores the run's validation split, so its
    metrics are its own, and records how its scores and decisions there agree with the run's
    (`export.agreement` in metrics.json)."""
    # Imported here, not at the top: what loads and runs an exported bundle (the onnx: encoders)
    # must not depend on the code that writes one, and `tests/model/test_export.py` checks it.
    from ..model.export import export_encoders, fp16_head

    if format != "onnx":
        raise MmtagError(f"unknown export format '{format}' (available: onnx)")
    if Path(out).resolve() == Path(run).resolve():
        raise MmtagError(f"{out}: export into a new directory, not over the run itself")
    # Before the slow export: OUT must be new, empty or an mmtag run (replaced only when complete).
    rundir.inspect(out)
    check_writable_dir(Path(os.path.abspath(out)).parent)
    b = bundle_io.load(run)
    # The run's own scores and decisions on its validation split, to compare the export's with.
    run_probs = b.validation.probs if b.validation is not None else None
    run_decided = Tagger.from_bundle(b).validation_decisions()
    encoders, workdir = export_encoders(b.encoders, int8=int8)
    try:
        config = b.config
        for modality, enc in encoders.items():
            setattr(config.model, f"{modality}_encoder", enc.name)
        b.config, b.encoders, b.manifest = config, encoders, {}
        b.head_state = fp16_head(b.head_state)  # what is stored is what scores, below
        # The export reports its own metrics: the run's validation split scored by the export.
        # Where that split cannot be replayed, the record (of the eager model) is dropped.
        tagger = Tagger.from_bundle(b)
        before = b.thresholds
        rescored = tagger.recalibrate(retune=retune) is not None
        if rescored:
            state = tagger.state()
            b.thresholds, b.val_metrics, b.validation = (state.thresholds, state.val_metrics,
                                                         state.validation)
            if state.extra.get("folds"):  # a cross-fitted run's per-fold figures, re-scored
                b.extra = {**b.extra, "folds": state.extra["folds"]}
        else:
            b.validation = None
        agreement = None
        if rescored and run_probs is not None and run_decided is not None:
            decided = tagger.validation_decisions()
            assert decided is not None and b.validation is not None
            agreement = {"rows": len(run_probs),
                         "max_score_diff": round(float(np.abs(b.validation.probs - run_probs).max()), 6),
                         "decisions_equal": round(float((decided == run_decided).all(1).mean()), 6)}
        b.extra = {**b.extra, "export": {
            "format": format, "int8": int8, "from_run": str(run),
            "from_manifest_sha256": bundle_io.manifest_sha256(run),
            "head_dtype": "float16",
            "thresholds_retuned": rescored and retune,
            "thresholds_before": before.to_dict(), "thresholds_after": b.thresholds.to_dict(),
            "agreement": agreement}}
        return bundle_io.save(out, b)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
