"""The run directory as a model bundle: safetensors weights + JSON/YAML, no pickle anywhere.

    RUN/config.yaml        resolved configuration (reproduces the run)
    RUN/labels.json        label space (ids and names; for named labels, `vocab`: their spellings)
    RUN/thresholds.json    decision thresholds
    RUN/head.safetensors   fusion head weights (fp32; fp16 in an export, read back as fp32)
    RUN/encoders/<modality>/weights.safetensors (+ config/tokenizer files)  fp16 encoder weights
    RUN/metrics.json       validation metrics and per-epoch history
    RUN/validation.safetensors + validation.json  validation scores, truth and items (report)
    RUN/manifest.json      written last: head and encoder ids, sha256 of every file, model size

A bundle is written into a new directory beside RUN and renamed into place when complete, so
RUN is always either the previous bundle or the whole new one (see `io.staged_dir`).
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import torch
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveInt,
                      StringConstraints, ValidationError)
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from ..config import Config, ModelConfig
from ..data import LabelSpace, LabelVocab
from ..encoders import (Encoder, ImageEncoder, error_summary, load_encoder, read_safetensors,
                        sha256_file)
from ..errors import MmtagError
from ..features import IMAGE_POOL_KINDS, modality_of
from ..decision import Metrics, Thresholds, ValidationRecord
from ..heads import HEADS, create_model_head, head_needs
from ..io import (RECORD_MAX_BYTES, RUN_FILE_MAX_BYTES, atomic_write_text, atomic_write_with,
                  load_json, staged_dir)
from . import rundir

FORMAT = "mmtag-bundle/1"
# The dtypes a head's float tensors may be stored in (training writes fp32, an export fp16).
STORED_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


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


def save(run_dir: str | Path, bundle: Bundle, *,
         add_files: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Write the bundle beside `run_dir` and move it into place once complete (`io.staged_dir`):
    a run already there stays intact until then and is then replaced; a file, or a directory
    holding anything that is not an mmtag run, is refused. `add_files(dir)` may add files to the
    new bundle before it is published (training adds metrics.csv and train.log; its report is
    drawn once the run is in place). The manifest, written last, covers every file. The run's
    lock (`rundir.lock`) is held throughout."""
    _check_image_encoder(bundle)
    with rundir.lock(run_dir):
        rundir.inspect(run_dir)
        with staged_dir(run_dir) as run:
            weight_files, encoders = _write_files(run, bundle)
            manifest = _write_manifest(run, bundle, weight_files, encoders)
            if add_files is not None:
                add_files(run)
                manifest = _write_manifest(run, bundle, weight_files, encoders)
    bundle.manifest = manifest
    return manifest


def _check_image_encoder(bundle: Bundle) -> None:
    """Refuse to write what `load` would refuse to read: an image encoder reading another size
    than config.yaml's `model.image_size` says (0: its own), or a head reading image vectors of
    another width than `model.image_pool` makes of it."""
    enc, model = bundle.encoders.get("image"), bundle.config.model
    if not isinstance(enc, ImageEncoder):
        return
    want = model.image_size or enc.native_image_size
    if int(enc.image_size) != want:
        raise MmtagError(f"model.image_size is {model.image_size}, but the image encoder "
                         f"'{enc.name}' reads {enc.image_size}-pixel images; not saving a bundle "
                         "that would not load")
    width = enc.dim * len(IMAGE_POOL_KINDS[model.image_pool])
    if "image" in bundle.dims and bundle.dims["image"] != width:
        raise MmtagError(f"model.image_pool {model.image_pool} makes {width}-d image vectors of "
                         f"'{enc.name}', but the head reads {bundle.dims['image']}-d ones; not "
                         "saving a bundle that would not load")


def _write_files(run: Path, bundle: Bundle) -> tuple[list[Path], dict[str, Any]]:
    """Everything but the manifest; returns the weight files and the encoders' manifest entries."""
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
        if isinstance(enc, ImageEncoder):  # the size it read (config.yaml: 0 for its own)
            encoders[modality]["image_size"] = int(enc.image_size)
    _write_json(run / "metrics.json", {
        "validation": bundle.val_metrics.to_dict() if bundle.val_metrics else None,
        "history": bundle.history, **bundle.extra})
    if bundle.validation is not None:
        v = bundle.validation
        arrays = {"probs": v.probs.astype(np.float32), "y_true": v.y_true.astype(np.uint8),
                  **{f"branch.{k}": b.astype(np.float32) for k, b in v.branches.items()},
                  **({"decided": v.decided.astype(np.uint8)} if v.decided is not None else {}),
                  **({"fold": v.fold.astype(np.int32)} if v.fold is not None else {})}
        atomic_write_with(run / "validation.safetensors", lambda p: save_numpy(arrays, str(p)))
        _write_json(run / "validation.json", {"image_ids": v.image_ids, "captions": v.captions,
                                              "image_paths": v.image_paths})
    return weight_files, encoders


def _write_manifest(run: Path, bundle: Bundle, weight_files: list[Path],
                    encoders: dict[str, Any]) -> dict[str, Any]:
    manifest = {
        "format": FORMAT,
        "head": {"name": bundle.head_name, "dims": bundle.dims,
                 "hidden": bundle.config.model.hidden, "dropout": bundle.config.model.dropout},
        "encoders": encoders,
        "num_classes": len(bundle.label_space),
        "model_size_mb": round(sum(p.stat().st_size for p in weight_files) / 1e6, 3),
        "weight_files": [str(p.relative_to(run)) for p in weight_files],
        "files": _file_hashes(run),
    }
    _write_json(run / "manifest.json", manifest)
    return manifest


def _file_hashes(run: Path) -> dict[str, str]:
    """sha256 of every file of the bundle at `run` (relative path → digest), manifest aside."""
    files = sorted(p for p in run.rglob("*") if p.is_file() and p.name != "manifest.json"
                   and not p.name.startswith(".") and p.suffix != ".tmp"
                   and not p.relative_to(run).parts[0] in ("checkpoints", "report"))
    return {str(p.relative_to(run)): sha256_file(p) for p in files}


def write_file(run_dir: str | Path, path: str | Path, text: str) -> None:
    """Write the text file `path`. When it lies inside the bundle at `run_dir` (e.g. `mmtag
    report RUN` writing RUN/report.html), the bundle is rebuilt beside with the new file and a
    manifest that covers it, and takes the old one's place (`io.staged_dir`;
    its other files are hard links, not copies), so it keeps loading. It holds the run's lock
    meanwhile (`rundir.lock`): a train replacing the run cannot be undone by this swap."""
    run, path = Path(run_dir), Path(path)
    try:
        rel = path.resolve().relative_to(run.resolve()).as_posix()
        manifest = load_json(run / "manifest.json")
        covered = isinstance(manifest.get("files"), dict)
    except (ValueError, OSError, json.JSONDecodeError, AttributeError):
        covered = False  # not inside the run, or no readable manifest: nothing to keep in step
    if not covered:
        atomic_write_text(path, text)
        return
    with rundir.lock(run), staged_dir(run) as stage:
        # read again under the lock: a train may have replaced the run since the check above
        manifest = load_json(run / "manifest.json")
        shutil.copytree(run, stage, copy_function=_link_or_copy, dirs_exist_ok=True)
        atomic_write_text(stage / rel, text)  # a new file: the linked original stays as it is
        manifest["files"] = _file_hashes(stage)
        _write_json(stage / "manifest.json", manifest)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The run's manifest, checked to hold every field, of the right type, that readers use."""
    run = Path(run_dir)
    path = run / "manifest.json"
    if not run.is_dir():
        raise MmtagError(f"{run}: run directory not found")
    if not path.is_file():
        raise MmtagError(f"{run}: not a finished mmtag run (no manifest.json); was training interrupted?")
    try:
        manifest = load_json(path)
    except json.JSONDecodeError as exc:
        raise MmtagError(f"{path}: corrupt manifest ({exc.msg})") from None
    except (OSError, ValueError) as exc:  # ValueError: bytes that are not UTF-8
        raise MmtagError(f"{path}: unreadable manifest ({error_summary(exc)})") from None
    if not isinstance(manifest, dict):
        raise MmtagError(f"{path}: corrupt manifest (a JSON {type(manifest).__name__}, not an object)")
    if manifest.get("format") != FORMAT:
        raise MmtagError(f"{path}: unsupported bundle format {manifest.get('format')!r} (expected {FORMAT})")
    parsed = _validate(_Manifest, manifest, path)
    for rel in [*parsed.files, *parsed.weight_files]:
        if rel in ("", ".") or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise MmtagError(f"{path}: lists {rel!r}, which is not a file inside the run")
    if parsed.head.name not in HEADS:
        raise MmtagError(f"{path}: unknown head {parsed.head.name!r} (known: {', '.join(sorted(HEADS))})")
    return manifest


def manifest_sha256(run_dir: str | Path) -> str:
    """sha256 of a run's manifest: names the exact bundle (it holds every file's hash)."""
    read_manifest(run_dir)
    return sha256_file(Path(run_dir) / "manifest.json")


def load(run_dir: str | Path, *, verify: bool = True, build_encoders: bool = True) -> Bundle:
    """Load a bundle, refusing a damaged one with one line naming the file, before any feature
    is computed.

    With `verify`, every file must match the sha256 in its manifest, and every file the loader
    reads must be listed there. Whatever the hashes say (a manifest can be re-hashed after an
    edit), each file must then hold what the code relies on: a manifest with all its fields,
    labels, thresholds and validation scores counted like the head's outputs, head tensors of
    the shapes its manifest entry and config.yaml imply, encoders whose features have the widths
    the head reads. `build_encoders=False` (for `mmtag info`) skips building the encoders and only
    parses their weight files; `Bundle.encoders` is then empty.
    """
    run = Path(run_dir)
    manifest = read_manifest(run)
    if verify:
        _verify_files(run, manifest)
    config = _read_config(run / "config.yaml")
    labels = _read_labels(run / "labels.json")
    thresholds = _read_thresholds(run / "thresholds.json")
    val_metrics, metrics_raw = _read_metrics(run / "metrics.json")
    head_state = read_safetensors(run / "head.safetensors")
    _check_consistency(run, manifest, config, labels, thresholds, head_state)
    # An export stores the head in fp16 (`model.export.fp16_head`); it computes in fp32.
    head_state = {k: v.float() if v.dtype in STORED_FLOATS else v for k, v in head_state.items()}
    validation = _load_validation(run, len(labels))
    if build_encoders:
        encoders = _load_encoders(run, manifest, config.model)
    else:
        encoders = {}
        for rel in manifest["weight_files"]:
            if rel.endswith(".safetensors") and rel != "head.safetensors":
                read_safetensors(run / rel)  # parses the header and checks the file covers it
    return Bundle(
        config=config, label_space=labels, thresholds=thresholds,
        head_name=manifest["head"]["name"], dims={k: int(v) for k, v in manifest["head"]["dims"].items()},
        head_state=head_state, encoders=encoders, val_metrics=val_metrics,
        history=metrics_raw.get("history", []),
        extra={k: v for k, v in metrics_raw.items() if k not in ("validation", "history")},
        manifest=manifest, validation=validation)


# ------------------------------------------------------------------ what each file must hold
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class _Schema(BaseModel):
    """JSON types exactly (no "3" for 3); keys beyond those read are allowed (newer writers)."""

    model_config = ConfigDict(strict=True, extra="allow")


class _HeadEntry(_Schema):
    name: str
    dims: dict[str, PositiveInt]
    hidden: PositiveInt
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)]


class _EncoderEntry(_Schema):
    name: str
    weights_sha256: Sha256
    source: dict[str, Any] = {}
    image_size: PositiveInt | None = None  # an image encoder's; absent in older bundles


class _Manifest(_Schema):
    format: str
    head: _HeadEntry
    encoders: dict[str, _EncoderEntry]
    num_classes: PositiveInt
    model_size_mb: NonNegativeFloat
    weight_files: list[str]
    files: dict[str, Sha256]


class _Labels(_Schema):
    ids: Annotated[list[NonNegativeInt], Field(min_length=1)]
    names: list[str]
    vocab: list[str] = []  # named labels: the names, in id order; absent: integer labels


class _Thresholds(_Schema):
    mode: str
    values: list[Probability]
    branches: dict[str, list[Probability]] = {}


class _MetricsFile(BaseModel):
    """metrics.json; lax types, since its numbers are reports, not inputs to a computation."""

    model_config = ConfigDict(extra="allow")
    validation: Metrics | None = None
    history: list[dict[str, Any]] = []
    pseudo_rounds: list[dict[str, Any]] = []
    finetune: dict[str, list[dict[str, Any]]] | None = None


class _ValidationItems(_Schema):
    image_ids: list[str]
    captions: list[str]
    image_paths: list[str]


SchemaT = TypeVar("SchemaT", bound=BaseModel)


def _validate(schema: type[SchemaT], raw: Any, path: Path) -> SchemaT:
    """`raw` checked against `schema`; the first problem (of how many) as one line naming `path`."""
    if not isinstance(raw, dict):
        raise MmtagError(f"{path}: expected a JSON object, found a JSON {type(raw).__name__}")
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        raise MmtagError(f"{path}: {where or 'top level'}: {first['msg']}{more}") from None


def _read_json(path: Path, max_bytes: int = RUN_FILE_MAX_BYTES) -> Any:
    try:
        return load_json(path, max_bytes=max_bytes)
    except FileNotFoundError:
        raise MmtagError(f"{path}: missing from the bundle") from None
    except json.JSONDecodeError as exc:
        raise MmtagError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except (OSError, ValueError) as exc:  # ValueError: bytes that are not UTF-8
        raise MmtagError(f"{path}: unreadable ({error_summary(exc)})") from None


def _read_config(path: Path) -> Config:
    try:
        config = Config.from_yaml(path)  # names the file itself for YAML and option problems
    except (OSError, ValueError, TypeError) as exc:
        raise MmtagError(f"{path}: unreadable config ({error_summary(exc)})") from None
    # A trained run saves what it did; `auto` there means a bundle written before these options
    # existed (or defaulted to auto), which trained one head on a split, unstacked.
    config.train.folds = 1 if config.train.folds == "auto" else config.train.folds
    config.train.stack = False if config.train.stack == "auto" else config.train.stack
    return config


def _read_labels(path: Path) -> LabelSpace:
    labels = _validate(_Labels, _read_json(path), path)
    if len(labels.ids) != len(labels.names):
        raise MmtagError(f"{path}: {len(labels.ids)} ids but {len(labels.names)} names")
    if len(set(labels.ids)) != len(labels.ids):
        twice = sorted({i for i in labels.ids if labels.ids.count(i) > 1})
        raise MmtagError(f"{path}: label id(s) {twice} listed more than once")
    if labels.vocab:
        if len(set(labels.vocab)) != len(labels.vocab):
            twice_names = sorted({n for n in labels.vocab if labels.vocab.count(n) > 1})
            raise MmtagError(f"{path}: label name(s) {twice_names} listed more than once in vocab")
        beyond = [i for i in labels.ids if i >= len(labels.vocab)]
        if beyond:
            raise MmtagError(f"{path}: label id(s) {beyond} have no name in vocab "
                             f"({len(labels.vocab)} names)")
    return LabelSpace(ids=tuple(labels.ids), names=tuple(labels.names),
                      vocab=LabelVocab(tuple(labels.vocab)))


def _read_thresholds(path: Path) -> Thresholds:
    raw = _read_json(path)
    _validate(_Thresholds, raw, path)
    return Thresholds.from_dict(raw)


def _read_metrics(path: Path) -> tuple[Metrics | None, dict[str, Any]]:
    raw = _read_json(path)
    _validate(_MetricsFile, raw, path)
    return (Metrics.from_dict(raw["validation"]) if raw.get("validation") else None), raw


def _verify_files(run: Path, manifest: dict[str, Any]) -> None:
    """Every listed file matches its sha256, and every file the loader reads is listed: an
    unlisted file (labels.json dropped from the list, a pytorch_model.bin put beside an
    encoder's files) could otherwise be read unchecked."""
    files = manifest["files"]
    for rel, digest in files.items():
        p = run / rel
        if not p.is_file():
            raise MmtagError(f"{p}: file listed in the manifest is missing")
        if sha256_file(p) != digest:
            raise MmtagError(f"{p}: sha256 does not match the manifest; the bundle was modified "
                             "or corrupted, refusing to load it")
    listed = {Path(rel).as_posix() for rel in files}
    read = {"config.yaml", "labels.json", "thresholds.json", "metrics.json", "head.safetensors",
            *manifest["weight_files"]}
    read |= {name for name in ("validation.safetensors", "validation.json") if (run / name).is_file()}
    if (run / "encoders").is_dir():
        read |= {p.relative_to(run).as_posix() for p in (run / "encoders").rglob("*")
                 if p.is_file() and not p.name.startswith(".") and p.suffix != ".tmp"}
    for rel in sorted(read - listed):
        raise MmtagError(f"{run / rel}: not listed in the manifest, so its integrity cannot be "
                         "checked; the bundle was modified, refusing to load it")


def _head_modalities(head_name: str) -> list[str]:
    """The modalities whose features head `head_name` reads (sorted), each kind routed by
    `features.modality_of`: a kind it does not know is an error naming it."""
    return sorted({modality_of(k) for k in head_needs(head_name)})


def _check_consistency(run: Path, manifest: dict[str, Any], config: Config, labels: LabelSpace,
                       thresholds: Thresholds, head_state: dict[str, torch.Tensor]) -> None:
    """The files must describe one model: as many labels, thresholds and head outputs; the
    features the head reads, the encoders that make them and the config that names them."""
    mpath = run / "manifest.json"
    head = manifest["head"]
    name, dims, hidden = head["name"], head["dims"], head["hidden"]
    n = len(labels)
    if manifest["num_classes"] != n:
        raise MmtagError(f"{run / 'labels.json'}: {n} labels, but {mpath} says the head predicts "
                         f"{manifest['num_classes']} classes")
    tpath = run / "thresholds.json"
    for branch, values in {"": thresholds.values, **thresholds.branches}.items():
        if values.shape != (n,):
            where = f"branch '{branch}' has" if branch else "has"
            raise MmtagError(f"{tpath}: {where} {len(values)} values for {n} labels")
    modalities = _head_modalities(name)
    unknown = sorted(set(thresholds.branches) - set(modalities))
    if unknown:
        raise MmtagError(f"{tpath}: thresholds for branch(es) {unknown}, but head '{name}' has "
                         f"branches {modalities}")
    needs = sorted(head_needs(name))
    if sorted(dims) != needs:
        raise MmtagError(f"{mpath}: head '{name}' reads features {needs}, but head.dims lists {sorted(dims)}")
    if sorted(manifest["encoders"]) != sorted(modalities):
        raise MmtagError(f"{mpath}: head '{name}' reads {' and '.join(modalities)} features, but "
                         f"encoders are listed for {sorted(manifest['encoders'])}")
    cpath, model = run / "config.yaml", config.model
    if model.head_name() != name:
        raise MmtagError(f"{cpath}: model.modalities {model.modalities} with model.fusion "
                         f"'{model.fusion}' select head '{model.head_name()}', but the bundle's head "
                         f"is '{name}' ({mpath})")
    if model.hidden != hidden:
        raise MmtagError(f"{cpath}: model.hidden {model.hidden} disagrees with the bundle's head "
                         f"(hidden {hidden}, {mpath})")
    for modality, entry in manifest["encoders"].items():
        named = getattr(model, f"{modality}_encoder")
        if named != entry["name"]:
            raise MmtagError(f"{cpath}: model.{modality}_encoder '{named}' disagrees with the bundle's "
                             f"{modality} encoder '{entry['name']}' ({mpath})")
    folds = config.train.folds
    _check_head_tensors(run / "head.safetensors", head_state, name, dims, n, model,
                        f"{mpath}'s head ({name}{f' x {folds} folds' if folds > 1 else ''}, "
                        f"inputs {dims}, hidden {hidden}, {n} labels)", folds, config.train.stack)


def _check_head_tensors(path: Path, state: dict[str, torch.Tensor], name: str, dims: dict[str, int],
                        num_classes: int, model: ModelConfig, described: str, folds: int = 1,
                        stack: bool = False) -> None:
    # The meta device gives the expected names and shapes without allocating or drawing random
    # numbers; the head is built from config.yaml's hyper-parameters, as `Tagger.load` builds it.
    with torch.device("meta"):
        want = create_model_head(name, dims, num_classes, model, folds, stack).state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    if missing:
        raise MmtagError(f"{path}: lacks tensor(s) {missing[:3]} that {described} needs")
    if unexpected:
        raise MmtagError(f"{path}: holds tensor(s) {unexpected[:3]} that {described} does not have")
    for key, value in state.items():
        if tuple(value.shape) != tuple(want[key].shape):
            raise MmtagError(f"{path}: tensor '{key}' has shape {tuple(value.shape)}, but {described} "
                             f"needs {tuple(want[key].shape)}")
        if value.is_floating_point() != want[key].is_floating_point() or (
                value.is_floating_point() and value.dtype not in STORED_FLOATS):
            expected = (", ".join(str(t) for t in STORED_FLOATS) if want[key].is_floating_point()
                        else str(want[key].dtype))
            raise MmtagError(f"{path}: tensor '{key}' has dtype {value.dtype}, expected {expected}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise MmtagError(f"{path}: tensor '{key}' holds NaN or infinite values")


def _load_encoders(run: Path, manifest: dict[str, Any], model: ModelConfig) -> dict[str, Encoder]:
    """Rebuild each encoder from its directory (an image encoder for config.yaml's
    `model.image_size`), then check it against the manifest: its weights' hash, its modality,
    the image size it reads, and the width of the features the head reads from it (an image
    encoder's pooled width times the kinds `model.image_pool` joins)."""
    encoders: dict[str, Encoder] = {}
    for modality, info in manifest["encoders"].items():
        directory = run / "encoders" / modality
        try:
            enc = load_encoder(info["name"], directory,
                               image_size=model.image_size if modality == "image" else None)
        except MmtagError as exc:
            if str(run) in str(exc):
                raise
            raise MmtagError(f"{directory}: {exc}") from None  # e.g. an unknown encoder name
        except Exception as exc:  # the encoder's library (transformers, timm, onnxruntime) failed
            raise MmtagError(f"{directory}: the {modality} encoder '{info['name']}' cannot be rebuilt "
                             f"({error_summary(exc)})") from None
        if enc.modality != modality:
            raise MmtagError(f"{directory}: '{info['name']}' is a {enc.modality} encoder, but "
                             f"{run / 'manifest.json'} lists it as the {modality} encoder")
        if enc.weights_sha256 != info["weights_sha256"]:
            raise MmtagError(f"{directory}: weights do not match the manifest")
        size = info.get("image_size")
        if size is not None and getattr(enc, "image_size", None) != size:
            raise MmtagError(f"{run / 'config.yaml'}: model.image_size {model.image_size} gives the "
                             f"{modality} encoder {getattr(enc, 'image_size', None)}-pixel images, "
                             f"but {run / 'manifest.json'} says it read {size}-pixel ones")
        enc.source = info.get("source", {})
        encoders[modality] = enc
    for kind, width in manifest["head"]["dims"].items():
        modality = modality_of(kind)
        enc = encoders.get(modality)
        if enc is None:  # _check_consistency lets no such bundle through; never read it as another
            raise MmtagError(f"{run / 'manifest.json'}: the head reads '{kind}' features, but no "
                             f"{modality} encoder is listed")
        joined = len(IMAGE_POOL_KINDS[model.image_pool]) if kind == "image" else 1
        if enc.dim * joined != width:
            pooled = f" ({model.image_pool} pooled: {enc.dim * joined}-d)" if joined > 1 else ""
            raise MmtagError(f"{run / 'encoders' / modality}: the {modality} encoder gives {enc.dim}-d "
                             f"features{pooled}, but the head in {run / 'manifest.json'} reads "
                             f"{width}-d '{kind}'")
    return encoders


def _load_validation(run: Path, num_classes: int) -> ValidationRecord | None:
    """The validation record, whose arrays must be (items, labels) and whose item lists must
    count the same items."""
    apath, ipath = run / "validation.safetensors", run / "validation.json"
    if not apath.is_file():
        if ipath.is_file():
            raise MmtagError(f"{ipath}: present without the validation.safetensors it describes")
        return None  # runs from before validation records, or exports of them
    try:
        arrays = {k: v.numpy() for k, v in read_safetensors(apath).items()}
    except TypeError as exc:  # a dtype numpy lacks (bfloat16)
        raise MmtagError(f"{apath}: {error_summary(exc)}") from None
    for key in ("probs", "y_true"):
        if key not in arrays:
            raise MmtagError(f"{apath}: lacks '{key}'")
    n = len(arrays["probs"])
    for key, a in arrays.items():
        if key not in ("probs", "y_true", "decided", "fold") and not key.startswith("branch."):
            raise MmtagError(f"{apath}: unexpected array '{key}'")
        if key == "fold":
            if a.shape != (n,) or a.dtype.kind not in "iu" or (n and a.min() < 0):
                raise MmtagError(f"{apath}: 'fold' must be one fold number >= 0 per item ({n}), "
                                 f"got shape {a.shape} of {a.dtype}")
        elif a.shape != (n, num_classes):
            raise MmtagError(f"{apath}: '{key}' has shape {a.shape}, expected ({n}, {num_classes}) for "
                             f"{num_classes} labels")
    items = _validate(_ValidationItems, _read_json(ipath, RECORD_MAX_BYTES), ipath)
    for key in ("image_ids", "captions", "image_paths"):
        if len(getattr(items, key)) != n:
            raise MmtagError(f"{ipath}: {len(getattr(items, key))} {key} for {n} scored items in {apath.name}")
    return ValidationRecord(
        probs=arrays["probs"], y_true=arrays["y_true"], image_ids=items.image_ids,
        captions=items.captions, image_paths=items.image_paths,
        branches={k.removeprefix("branch."): v for k, v in arrays.items() if k.startswith("branch.")},
        decided=arrays["decided"].astype(bool) if "decided" in arrays else None,
        fold=arrays["fold"].astype(np.int64) if "fold" in arrays else None)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
