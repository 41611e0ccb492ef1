import numpy as np
import pytest
import torch

from mmtag.encoders import ENCODERS, create_encoder, load_encoder
from mmtag.errors import MmtagError


@pytest.fixture(scope="module")
def minilm():
    return create_encoder("minilm-l6", "text")


@pytest.fixture(scope="module")
def lite0():
    return create_encoder("efficientnet-lite0", "image")


def test_registry_has_offline_defaults():
    assert {"efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "minilm-l6"} <= set(ENCODERS)
    assert all(ENCODERS[n].weights_present() for n in ("efficientnet-lite0", "minilm-l6"))


def test_unknown_or_wrong_modality_is_a_clear_error():
    with pytest.raises(MmtagError, match="available"):
        create_encoder("resnet-9000")
    with pytest.raises(MmtagError, match="minilm-l6"):
        create_encoder("efficientnet-lite0", "text")


def test_text_encoder_shapes_and_meaningful_similarity(minilm):
    batch = minilm.tokenize(["a dog runs", "a puppy is running", "stock market report"])
    with torch.inference_mode():
        v = torch.nn.functional.normalize(minilm(**batch), dim=1)
    assert v.shape == (3, 384)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2  # pretrained, not random


def test_image_encoder_keeps_spatial_tokens(lite0):
    x = torch.zeros(2, 3, lite0.image_size, lite0.image_size)
    with torch.inference_mode():
        pooled, tokens = lite0(x)
    assert lite0.image_size == 224
    assert tokens.shape == (2, 49, 1280) and pooled.shape == (2, 1280)
    assert torch.allclose(pooled, tokens.mean(1))


def test_weights_are_fp16_exact_and_hashed(lite0):
    for t in lite0.state_dict().values():
        if t.is_floating_point():
            assert torch.equal(t, t.half().float())
    assert len(lite0.weights_sha256) == 64 and lite0.encoder_id.startswith("efficientnet-lite0-")


@pytest.mark.parametrize("fixture", ["minilm", "lite0"])
def test_save_load_gives_identical_outputs(fixture, request, tmp_path):
    enc = request.getfixturevalue(fixture)
    enc.save(tmp_path / "enc")
    back = load_encoder(enc.name, tmp_path / "enc")
    assert back.weights_sha256 == enc.weights_sha256
    with torch.inference_mode():
        if enc.modality == "text":
            b = enc.tokenize(["two horses in a field"])
            assert torch.equal(enc(**b), back(**b))
        else:
            x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32))
            assert torch.equal(enc(x)[0], back(x)[0])
