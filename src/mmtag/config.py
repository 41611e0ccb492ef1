"""The one configuration tree of a run: dataclasses, loadable from YAML, overridable from the CLI.

Every option of `mmtag train` is a field here, so a saved `config.yaml` reproduces a run.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import MmtagError


@dataclass
class DataConfig:
    """How the input is read and split."""

    train_csv: str = ""  # labelled CSV (the TRAIN_CSV argument); saved so a run can be re-run
    images: str = ""  # images directory (--images)
    val_frac: float = 0.1
    skip_bad: bool = False
    workers: int = 2  # DataLoader workers that decode JPEGs while the encoder computes
    extra_text: str = ""  # labelled captions without images: the text branch learns from them too
    unlabeled: str = ""  # unlabelled CSV for pseudo-label self-training


@dataclass
class ModelConfig:
    """Which encoders feed which fusion head."""

    modalities: list[str] = field(default_factory=lambda: ["image", "text"])
    image_encoder: str = "efficientnet-lite0"
    text_encoder: str = "minilm-l6"
    fusion: str = "concat"
    random_init: bool = False  # allow encoders without pretrained weights (never silently)
    hidden: int = 512
    dropout: float = 0.5

    def head_name(self) -> str:
        """The registered head that these modalities and this fusion choice select."""
        mods = set(self.modalities)
        if mods == {"image"}:
            return "image"
        if mods == {"text"}:
            return "text"
        return self.fusion


@dataclass
class TrainConfig:
    """Optimisation of the head on cached features."""

    seed: int = 0
    epochs: int = 100
    patience: int = 15  # epochs without a better validation sample-F1 before stopping
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"  # adam | adamw
    loss: str = "bce"  # bce | weighted-bce | asl | focal
    thresholds: str = "global"  # global | per-class | balanced
    oversample: bool = False  # repeat rows that carry rare labels
    # union fusion: restrict each branch's threshold search to [lo, hi] (empty = the full grid)
    union_image_range: list[float] = field(default_factory=list)
    union_text_range: list[float] = field(default_factory=list)


@dataclass
class FinetuneConfig:
    """Stage one of two-stage training: fine-tune encoders on the task before fitting the head."""

    modalities: list[str] = field(default_factory=list)  # [], ["text"], ["image"] or both
    epochs: int = 4
    lr: float = 5e-5  # encoder learning rate; the task head gets head_lr
    head_lr: float = 1e-3
    batch_size: int = 32
    warmup_frac: float = 0.06  # linear warm-up, then linear decay to zero
    weight_decay: float = 0.01
    optimizer: str = "adamw"
    unfreeze_blocks: int = 2  # image encoder: how many of the last MBConv blocks are trained


@dataclass
class AugmentConfig:
    """Training-time augmentation (validation and test always see the plain input)."""

    image: str = "auto"  # "crop,flip", "none"; auto = crop,flip whenever augmented views are used
    text: str = ""  # e.g. "synonyms:2" (WordNet synonym replacement of 2 words)
    views: int = 0  # frozen encoders: K augmented views per training item cached, one drawn per epoch

    def image_spec(self, finetuning_image: bool) -> str:
        if self.image != "auto":
            return self.image
        return "crop,flip" if finetuning_image or self.views > 0 else ""


@dataclass
class PseudoConfig:
    """Pseudo-label self-training on an unlabelled CSV (`--unlabeled`)."""

    rounds: int = 0
    confidence: float = 0.9  # a label is kept when its score is >= this, or <= 1 - this for all


@dataclass
class Config:
    """A whole run's configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    # Empty: $MMTAG_CACHE or ~/.cache/mmtag, looked up when used, so a bundle carried to another
    # machine or user does not point at the trainer's cache.
    cache_dir: str = ""
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun, "cuda" = this rank's GPU)
    amp: bool = False  # mixed precision (fp16 autocast + grad scaling) on CUDA
    preset: str = ""  # the preset this config started from, if any
    substitutions: list[str] = field(default_factory=list)  # "wanted -> used" backbone swaps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config") -> "Config":
        """Build a Config from nested dicts, rejecting unknown keys by name."""
        return _build(cls, raw or {}, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Config":
        return cls.from_dict(read_yaml_mapping(path, "config file"), source=str(path))

    def save_yaml(self, path: str | Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def override(self, dotted: dict[str, Any]) -> "Config":
        """Return a copy with `{"train.lr": 1e-3, ...}` applied; None values are ignored."""
        raw = self.to_dict()
        for key, value in dotted.items():
            if value is None:
                continue
            node = raw
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            if leaf not in node:
                raise MmtagError(f"unknown config option '{key}'")
            node[leaf] = value
        return Config.from_dict(raw)


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file → {}), or a one-line MmtagError."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MmtagError(f"{path}: {what} not found") from None
    except yaml.YAMLError as exc:
        raise MmtagError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if raw is not None and not isinstance(raw, dict):
        raise MmtagError(f"{path}: expected a mapping at the top level")
    return raw or {}


def default_cache_dir() -> str:
    """Feature cache shared by all runs of a user: $MMTAG_CACHE or ~/.cache/mmtag."""
    env = os.environ.get("MMTAG_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "mmtag")


def _build(cls: type, raw: dict[str, Any], source: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise MmtagError(f"{source}: unknown option(s) {sorted(unknown)} in {cls.__name__}")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise MmtagError(f"{source}: '{name}' must be a mapping")
            kwargs[name] = _build(type(default), value, source)
        else:
            kwargs[name] = _coerce(value, default, f"{cls.__name__}.{name}", source)
    return cls(**kwargs)


def _coerce(value: Any, default: Any, name: str, source: str) -> Any:
    """Coerce YAML/CLI scalars to the default's type so `lr: 1e-3` (a str in YAML 1.1) works."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, list):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return list(value)
        if isinstance(default, str):
            return str(value)
    except (TypeError, ValueError):
        raise MmtagError(f"{source}: option {name} cannot be {value!r}") from None
    return value
