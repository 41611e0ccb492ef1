"""The optional `timm:NAME` image encoders (`pip install mmtag[timm]`).

timm is imported only when a `timm:` encoder is built or asked about, never when this module is:
it pulls torchvision, which the default install leaves out. (`import timm` in here is absolute, so
it reaches the third-party package, not this module.)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import MmtagError
from ..io import atomic_write_text, atomic_write_with
from .base import Encoder, EncoderEntry, EncoderFamily, ImageEncoder, load_weights, read_safetensors


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


TIMM = EncoderFamily("timm", lambda what, lookup: _timm_entry(what), "image")
