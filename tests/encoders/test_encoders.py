import numpy as np
import pytest
import torch

from conftest import save_tiny_bert
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


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), layers=2)


def test_hf_text_encoder_from_local_dir(tiny_bert_dir, tmp_path):
    enc = create_encoder(f"hf:{tiny_bert_dir}", "text")
    assert enc.dim == 32 and enc.name == f"hf:{tiny_bert_dir}"
    b = enc.tokenize(["a photo of a dog", "the cat"])
    with torch.inference_mode():
        out = enc(**b)
    assert out.shape == (2, 32)
    enc.save(tmp_path / "e")
    back = load_encoder(enc.name, tmp_path / "e")
    with torch.inference_mode():
        assert torch.equal(back(**b), out)


def test_hf_missing_weights_needs_random_init(tiny_bert_dir, tmp_path):
    import shutil

    d = tmp_path / "no-weights"
    shutil.copytree(tiny_bert_dir, d)
    for f in d.glob("model.safetensors"):
        f.unlink()
    with pytest.raises(MmtagError, match="--random-init"):
        create_encoder(f"hf:{d}", "text")
    assert create_encoder(f"hf:{d}", "text", random_init=True).dim == 32
    with pytest.raises(MmtagError, match="never downloads"):
        create_encoder("hf:no/such-model-here", "text")


class _RunsCode:
    """Unpickling this writes `marker`: a stand-in for a pickle that runs an attacker's code."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


def test_hf_pickle_weights_are_refused_never_unpickled(tiny_bert_dir, tmp_path):
    import pickle
    import shutil

    from mmtag.encoders import hf_text_from_dir

    d = tmp_path / "pickle-only"
    shutil.copytree(tiny_bert_dir, d)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"embeddings.word_embeddings.weight": _RunsCode(marker)}))
    with pytest.raises(MmtagError, match="pytorch_model.bin") as info:
        create_encoder(f"hf:{d}", "text")
    assert "safetensors" in str(info.value) and "\n" not in str(info.value)
    # below the directory check, transformers itself is told to read safetensors only
    with pytest.raises(MmtagError, match=str(d)):
        hf_text_from_dir(f"hf:{d}", d)
    assert not marker.exists()
    pickle.loads((d / "pytorch_model.bin").read_bytes())  # the trap is real: unpickling runs it
    assert marker.read_text() == "unpickled"


def test_timm_is_optional():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(MmtagError, match=r"mmtag\[timm\]"):
            create_encoder("timm:resnet18", "image")
    else:
        pytest.skip("timm is installed; the missing-extra message cannot be shown")


def test_random_init_is_explicit_for_builtin_encoders():
    a = create_encoder("efficientnet-lite0", random_init=True)
    b = create_encoder("efficientnet-lite0")
    assert a.weights_sha256 != b.weights_sha256 and a.source == {"random_init": "true"}


def test_list_encoders_reports_parameters():
    from mmtag.encoders import list_encoders

    rows = {e.name: e for e in list_encoders()}
    assert rows["minilm-l6"].weights_present and 20 < rows["minilm-l6"].params_m < 25
    assert 3 < rows["efficientnet-lite0"].params_m < 4


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


def test_a_family_registered_from_outside_resolves_and_validates(monkeypatch, lite0):
    """`register_prefix` is the one way to add a "<prefix>:<what>" family: a toy one registered
    here resolves, is listed in errors, and passes config validation, editing no other file."""
    from mmtag.encoders import registry as encoders
    from mmtag.config import Config
    from mmtag.encoders import EncoderEntry, encoder_entry, register_prefix

    monkeypatch.setattr(encoders, "FAMILIES", dict(encoders.FAMILIES))
    monkeypatch.setattr(encoders, "PREFIXES", dict(encoders.PREFIXES))
    register_prefix("toy", lambda what: EncoderEntry(f"toy:{what}", "image", lambda _: lite0,
                                                     lambda _: lite0, lambda: True, "a toy"),
                    modality="image")
    assert encoder_entry("toy:x", "image").name == "toy:x"
    assert encoders.family_modality("toy") == "image" and encoders.family_modality("onnx") is None
    with pytest.raises(MmtagError, match="timm:NAME, toy:NAME"):
        encoder_entry("nothing", "image")
    assert Config().override({"model.image_encoder": "toy:x"}).model.image_encoder == "toy:x"
    with pytest.raises(ValueError, match="without ':'"):
        register_prefix("a:b", lambda what: encoder_entry(what), modality=None)
