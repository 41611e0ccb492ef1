"""The encoder registry: built-in names, lookup errors, listing, save/load by name, families."""
import subprocess
import sys

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


def test_a_bare_registry_import_sees_the_builtin_families():
    """The family modules register themselves and only the package imports them; importing the
    registry module alone still runs the package first, so nothing is missing from it."""
    script = """
import sys
from mmtag.encoders.registry import ENCODERS, FAMILIES, encoder_entry
assert list(ENCODERS) == ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2",
                          "minilm-l6", "mpnet-base"], list(ENCODERS)
assert list(FAMILIES) == ["hf", "timm", "flip", "concat", "onnx"], list(FAMILIES)
assert encoder_entry("onnx:minilm-l6").modality == "text"
assert "onnxruntime" not in sys.modules and "timm" not in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_unknown_or_wrong_modality_is_a_clear_error():
    with pytest.raises(MmtagError, match="available"):
        create_encoder("resnet-9000")
    with pytest.raises(MmtagError, match="minilm-l6"):
        create_encoder("efficientnet-lite0", "text")


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


def test_list_encoders_reports_parameters():
    from mmtag.encoders import list_encoders

    rows = {e.name: e for e in list_encoders()}
    assert rows["minilm-l6"].weights_present and 20 < rows["minilm-l6"].params_m < 25
    assert 3 < rows["efficientnet-lite0"].params_m < 4


def test_a_family_registered_from_outside_resolves_and_validates(monkeypatch, lite0):
    """`register_prefix` is the one way to add a "<prefix>:<what>" family: a toy one registered
    here resolves, is listed in errors, and passes config validation, editing no other file."""
    from mmtag.encoders import registry as encoders
    from mmtag.config import Config
    from mmtag.encoders import EncoderEntry, encoder_entry, register_prefix

    monkeypatch.setitem(encoders.FAMILIES, "toy", None)  # the entry below, removed afterwards
    register_prefix("toy", lambda what: EncoderEntry(f"toy:{what}", "image", lambda _: lite0,
                                                     lambda _: lite0, lambda: True, "a toy"),
                    modality="image")
    assert encoder_entry("toy:x", "image").name == "toy:x"
    assert "toy:NAME" in encoders.encoder_names("image") and "toy:NAME" not in encoders.encoder_names("text")
    assert not any(n.startswith("onnx:") for n in encoders.encoder_names())  # a wrapping family
    with pytest.raises(MmtagError, match="timm:NAME, flip:IMAGE_ENCODER, concat:A\\+B, toy:NAME"):
        encoder_entry("nothing", "image")
    assert Config().override({"model.image_encoder": "toy:x"}).model.image_encoder == "toy:x"
    with pytest.raises(ValueError, match="without ':'"):
        register_prefix("a:b", lambda what: encoder_entry(what), modality=None)
