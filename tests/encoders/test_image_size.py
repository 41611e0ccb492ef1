"""`model.image_size`: an image encoder reading another size than its own. The size reaches the
backbone (built again for it), the encoder id (only when it is not the encoder's own), the
composites' parts, the ONNX graphs traced from it and their runtime twins; a bad size is one line.

Sizes are small (64, 96, 100 px) and weights random where what the features are does not matter."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmtag.encoders import OnnxImageEncoder, create_encoder, runtime_twin
from mmtag.encoders.base import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from mmtag.encoders.onnx_export import export_image_encoder
from mmtag.errors import MmtagError

LITE0 = "efficientnet-lite0"


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.uniform(-1, 1, (n, 3, size, size)).astype(np.float32))


def _run(enc, x):
    with torch.inference_mode():
        return enc(x)


@pytest.fixture(scope="module")
def lite0():
    return create_encoder(LITE0, "image")


@pytest.fixture(scope="module")
def lite0_64():
    return create_encoder(LITE0, "image", image_size=64)


def test_each_encoder_keeps_its_own_size_and_id_by_default(lite0):
    assert (lite0.image_size, lite0.native_image_size, lite0.resized) == (224, 224, False)
    name, digest = lite0.encoder_id.rsplit("-", 1)
    assert name == LITE0 and len(digest) == 16  # the id of every existing cache and bundle
    for variant, own in (("efficientnet-lite1", 240), ("efficientnet-lite2", 260)):
        torch.manual_seed(0)
        enc = create_encoder(variant, "image", random_init=True)
        assert enc.image_size == enc.native_image_size == own
        torch.manual_seed(0)
        assert create_encoder(variant, "image", random_init=True, image_size=own).encoder_id == \
            enc.encoder_id  # its own size, said out loud, is the same encoder


def test_another_size_reaches_the_backbone_and_the_id(lite0, lite0_64):
    assert (lite0_64.image_size, lite0_64.native_image_size) == (64, 224)
    assert lite0_64.weights_sha256 == lite0.weights_sha256  # the same weights ...
    assert lite0_64.encoder_id == f"{lite0.encoder_id}-64px"  # ... keyed apart in the cache
    pooled, tokens = _run(lite0_64, _images(2, 64))
    assert pooled.shape == (2, 1280) and tokens.shape == (2, 4, 1280)  # a 2x2 grid at 64 px
    enc = create_encoder(LITE0, "image", random_init=True, image_size=96)
    enc.set_image_size(None)  # back to its own size: its own id again
    assert enc.image_size == 224 and not enc.resized and not enc.encoder_id.endswith("px")


def test_the_backbone_is_built_for_the_size_it_reads():
    """The package fixes its "SAME" padding for one size when it builds the net: read at 100 px
    (odd sides after three halvings), only the rebuilt net pads as TensorFlow would, i.e. as
    the package's dynamic padding computes for any size."""
    from efficientnet_lite_pytorch import EfficientNet

    enc = create_encoder(LITE0, "image", random_init=True, image_size=100)
    dynamic = EfficientNet.from_name(LITE0, image_size=None)  # pads for whatever comes in
    dynamic._fc = torch.nn.Identity()
    dynamic.load_state_dict(enc.net.state_dict())
    dynamic.set_swish(memory_efficient=False)
    dynamic.eval()
    x = _images(1, 100)
    with torch.inference_mode():
        want = dynamic.extract_features(x)
    got = _run(enc, x)[1]
    assert torch.allclose(got, want.flatten(2).transpose(1, 2), atol=1e-5)
    stale = create_encoder(LITE0, "image", random_init=True)  # padded for 224 px
    assert _run(stale, x)[1].shape != got.shape or not torch.allclose(_run(stale, x)[1], got)


def test_bad_sizes_are_one_line():
    assert (MIN_IMAGE_SIZE, MAX_IMAGE_SIZE) == (32, 1024)  # config's model.image_size says the same
    enc = create_encoder(LITE0, "image", random_init=True)
    for bad in (16, 2048, 64.0, True, "64"):
        with pytest.raises(MmtagError, match=r"image size must be an integer in \[32, 1024\]") as e:
            enc.set_image_size(bad)
        assert "\n" not in str(e.value)
    assert enc.image_size == 224
    with pytest.raises(MmtagError, match="reads no images, so it takes no image size"):
        create_encoder("minilm-l6", "text", random_init=True, image_size=64)


def test_composites_scale_their_parts():
    flip = create_encoder(f"flip:{LITE0}", "image", random_init=True, image_size=64)
    assert flip.image_size == flip.inner.image_size == 64 and flip.encoder_id.endswith("-64px")
    assert _run(flip, _images(2, 64))[1].shape == (2, 4, 1280)
    concat = create_encoder(f"concat:{LITE0}+efficientnet-lite2", "image", random_init=True)
    own = concat.encoder_id
    concat.set_image_size(130)  # half of lite2's 260: lite0 at half of its 224
    assert [p.image_size for p in concat.parts.values()] == [112, 130]
    assert concat.image_size == 130 and concat.encoder_id == f"{own}-130px"
    assert _run(concat, _images(1, 130))[0].shape == (1, 2560)
    concat.set_image_size(0)
    assert [p.image_size for p in concat.parts.values()] == [224, 260] and concat.encoder_id == own


def test_onnx_graphs_read_the_size_they_were_traced_at(lite0, lite0_64, tmp_path):
    graph = export_image_encoder(lite0_64, tmp_path / "export")
    assert graph.image_size == graph.meta["image_size"] == 64
    x = _images(3, 64, seed=2)
    for got, want in zip(graph(x), _run(lite0_64, x)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-3, atol=1e-4)
    with pytest.raises(MmtagError, match=r"ONNX graph reads 64x64 images .*not 96x96"):
        graph.set_image_size(96)
    graph.set_image_size(64)  # what it reads: nothing to do
    # a runtime twin keeps its source's id, size included: it shares that size's cache entries
    twin = runtime_twin(lite0_64, tmp_path / "cache")
    assert isinstance(twin, OnnxImageEncoder) and twin.image_size == 64
    assert twin.encoder_id == lite0_64.encoder_id != lite0.encoder_id
    assert (tmp_path / "cache" / "onnx-twins" / lite0_64.encoder_id).is_dir()
