"""The run directory as a model bundle: safetensors weights + JSON/YAML, no pickle anywhere.

    RUN/config.yaml        resolved configuration (reproduces the run)
    RUN/labels.json        label space (ids and names)
    RUN/thresholds.json    decision thresholds
    RUN/head.safetensors   fusion head weights
    RUN/encoders/<modality>/weights.safetensors (+ config/tokenizer files)  fp16 encoder weights
    RUN/metrics.json       validation metrics and per-epoch history
    RUN/validation.safetensors + validation.json  validation scores, truth and items (report)
    RUN/manifest.json      written last: head and encoder ids, sha256 of every file, model size
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy
from safetensors.torch import load_file, save_file

from .config import Config
from .data import LabelSpace
from .encoders import Encoder, load_encoder, sha256_file
from .errors import MmtagError
from .io import atomic_write_text, atomic_write_with
from .metrics import Metrics
from .thresholds import Thresholds

FORMAT = "mmtag-bundle/1"


@dataclass
class ValidationRecord:
    """The validation split as the final model scored it: what `report.html` is drawn from."""

    probs: np.ndarray  # (N, C)
    y_true: np.ndarray  # (N, C) 0/1
    image_ids: list[str]
    captions: list[str]
    image_paths: list[str]  # "" where the model used no image
    branches: dict[str, np.ndarray] = field(default_factory=dict)  # late fusion: per branch


@dataclass
class Bundle:
    """Everything needed to predict, plus what the run measured."""

    config: Config
    label_space: LabelSpace
    thresholds: Thresholds
    head_name: str
    dims: dict[str, int]
    head_state: dict[str, torch.Tensor]
    encoders: dict[str, Encoder]  # modality → encoder
    val_metrics: Metrics | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # pseudo-label rounds, fine-tuning logs
    manifest: dict[str, Any] = field(default_factory=dict)
    validation: ValidationRecord | None = None


def save(run_dir: str | Path, bundle: Bundle) -> dict[str, Any]:
    """Write the bundle; the manifest goes last so a half-written run is recognisable."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "manifest.json").unlink(missing_ok=True)
    bundle.config.save_yaml(run / "config.yaml")
    _write_json(run / "labels.json", bundle.label_space.to_dict())
    _write_json(run / "thresholds.json", bundle.thresholds.to_dict())
    state = {k: v.detach().contiguous() for k, v in bundle.head_state.items()}
    atomic_write_with(run / "head.safetensors", lambda p: save_file(state, str(p)))
    weight_files = [run / "head.safetensors"]
    encoders: dict[str, Any] = {}
    for modality, enc in bundle.encoders.items():
        weight_files += enc.save(run / "encoders" / modality)
        encoders[modality] = {"name": enc.name, "encoder_id": enc.encoder_id,
                              "weights_sha256": enc.weights_sha256, "source": enc.source}
    _write_json(run / "metrics.json", {
        "validation": bundle.val_metrics.to_dict() if bundle.val_metrics else None,
        "history": bundle.history, **bundle.extra})
    if bundle.validation is not None:
        v = bundle.validation
        arrays = {"probs": v.probs.astype(np.float32), "y_true": v.y_true.astype(np.uint8),
                  **{f"branch.{k}": b.astype(np.float32) for k, b in v.branches.items()}}
        atomic_write_with(run / "validation.safetensors", lambda p: save_numpy(arrays, str(p)))
        _write_json(run / "validation.json", {"image_ids": v.image_ids, "captions": v.captions,
                                              "image_paths": v.image_paths})
    files = sorted(p for p in run.rglob("*") if p.is_file() and p.name != "manifest.json"
                   and not p.name.startswith(".") and p.suffix != ".tmp"
                   and not p.relative_to(run).parts[0] in ("checkpoints", "report"))
    manifest = {
        "format": FORMAT,
        "head": {"name": bundle.head_name, "dims": bundle.dims,
                 "hidden": bundle.config.model.hidden, "dropout": bundle.config.model.dropout},
        "encoders": encoders,
        "num_classes": len(bundle.label_space),
        "model_size_mb": round(sum(p.stat().st_size for p in weight_files) / 1e6, 3),
        "weight_files": [str(p.relative_to(run)) for p in weight_files],
        "files": {str(p.relative_to(run)): sha256_file(p) for p in files},
    }
    _write_json(run / "manifest.json", manifest)
    bundle.manifest = manifest
    return manifest


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    run = Path(run_dir)
    path = run / "manifest.json"
    if not run.is_dir():
        raise MmtagError(f"{run}: run directory not found")
    if not path.is_file():
        raise MmtagError(f"{run}: not a finished mmtag run (no manifest.json); was training interrupted?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MmtagError(f"{path}: corrupt manifest ({exc.msg})") from None
    if manifest.get("format") != FORMAT:
        raise MmtagError(f"{path}: unsupported bundle format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


def manifest_sha256(run_dir: str | Path) -> str:
    """sha256 of a run's manifest: names the exact bundle (it holds every file's hash)."""
    read_manifest(run_dir)
    return sha256_file(Path(run_dir) / "manifest.json")


def load(run_dir: str | Path, *, verify: bool = True) -> Bundle:
    """Load a bundle; with `verify`, every file must match the sha256 in its manifest."""
    run = Path(run_dir)
    manifest = read_manifest(run)
    if verify:
        for rel, digest in manifest["files"].items():
            p = run / rel
            if not p.is_file():
                raise MmtagError(f"{p}: file listed in the manifest is missing")
            if sha256_file(p) != digest:
                raise MmtagError(f"{p}: sha256 does not match the manifest; the bundle was modified "
                                 "or corrupted, refusing to load it")
    config = Config.from_yaml(run / "config.yaml")
    labels = LabelSpace.from_dict(json.loads((run / "labels.json").read_text(encoding="utf-8")))
    thresholds = Thresholds.from_dict(json.loads((run / "thresholds.json").read_text(encoding="utf-8")))
    metrics_raw = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    encoders = {}
    for modality, info in manifest["encoders"].items():
        enc = load_encoder(info["name"], run / "encoders" / modality)
        if enc.weights_sha256 != info["weights_sha256"]:
            raise MmtagError(f"{run}/encoders/{modality}: weights do not match the manifest")
        enc.source = info.get("source", {})
        encoders[modality] = enc
    return Bundle(
        config=config, label_space=labels, thresholds=thresholds,
        head_name=manifest["head"]["name"], dims={k: int(v) for k, v in manifest["head"]["dims"].items()},
        head_state=load_file(str(run / "head.safetensors")), encoders=encoders,
        val_metrics=Metrics.from_dict(metrics_raw["validation"]) if metrics_raw.get("validation") else None,
        history=metrics_raw.get("history", []),
        extra={k: v for k, v in metrics_raw.items() if k not in ("validation", "history")},
        manifest=manifest, validation=_load_validation(run))


def _load_validation(run: Path) -> ValidationRecord | None:
    if not (run / "validation.safetensors").is_file():
        return None  # runs from before validation records, or exports of them
    arrays = load_numpy(str(run / "validation.safetensors"))
    items = json.loads((run / "validation.json").read_text(encoding="utf-8"))
    return ValidationRecord(
        probs=arrays["probs"], y_true=arrays["y_true"], image_ids=items["image_ids"],
        captions=items["captions"], image_paths=items["image_paths"],
        branches={k.removeprefix("branch."): v for k, v in arrays.items() if k.startswith("branch.")})


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
