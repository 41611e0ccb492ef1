"""EfficientNet-Lite: spatial tokens, fp16-exact hashed weights, explicit random init, and the
blocks fine-tuning trains."""
import pytest
import torch

from mmtag.encoders import create_encoder
from mmtag.errors import MmtagError


@pytest.fixture(scope="module")
def lite0():
    return create_encoder("efficientnet-lite0", "image")


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


def test_random_init_is_explicit_for_builtin_encoders():
    a = create_encoder("efficientnet-lite0", random_init=True)
    b = create_encoder("efficientnet-lite0")
    assert a.weights_sha256 != b.weights_sha256 and a.source == {"random_init": "true"}


def test_encoders_say_what_fine_tuning_trains(tiny_bert_dir):
    """Fine-tuning asks the encoder for its trainable groups instead of reaching into a
    backbone's internals: the whole transformer for text, the last k blocks + head for images."""
    text = create_encoder(f"hf:{tiny_bert_dir}", "text")
    assert text.trainable_groups() == [text]
    image = create_encoder("efficientnet-lite0", "image", random_init=True)
    groups = image.trainable_groups(2)
    assert len(groups) == 4 and groups[-2:] == [image.net._conv_head, image.net._bn1]
    assert len(image.trainable_groups(None)) == len(image.net._blocks) + 2
    assert image.trainable_groups(0) == groups[-2:]
    with pytest.raises(MmtagError, match="unfreeze_blocks must be in"):
        image.trainable_groups(999)
