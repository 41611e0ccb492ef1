"""`mmtag info` and `mmtag encoders`: what a run holds, and which encoders this machine has."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import Config
from ..encoders import EncoderInfo, list_encoders
from ..model import bundle as bundle_io


def available_encoders() -> list[EncoderInfo]:
    """Encoders usable here and now (`mmtag encoders`)."""
    return list_encoders()


def info(run: str | Path) -> dict[str, Any]:
    """What a run holds: config, labels, thresholds, encoders (with hashes), metrics, size."""
    # Every file is validated first (encoders excepted: their weights are only parsed), so what
    # follows reads well-formed files.
    manifest = bundle_io.load(run, build_encoders=False).manifest
    run = Path(run)
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    return {
        "run": str(run),
        "head": manifest["head"],
        "encoders": manifest["encoders"],
        "labels": json.loads((run / "labels.json").read_text(encoding="utf-8")),
        "thresholds": json.loads((run / "thresholds.json").read_text(encoding="utf-8")),
        "validation": metrics.get("validation"),
        "config": Config.from_yaml(run / "config.yaml").to_dict(),
        "model_size_mb": manifest["model_size_mb"],
    }
