"""flip: and concat: image encoders: names, sizes, what their features are, ids, bundles, export.

Names and sizes are checked on random-init encoders (cheap to build). What the features are is
checked on the shipped pretrained weights: a random-init EfficientNet-Lite gives features of
about 1e-11 (they even round to 0 in the fp16 cache), next to which any two outputs are "close".
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmtag import Tagger, api
from mmtag.config import Config
from mmtag.data.synthetic import SyntheticPaths, make_dataset
from mmtag.encoders import (ENCODERS, EncoderEntry, create_encoder, encoder_entry, load_encoder)
from mmtag.encoders.combined import resize_matrix
from mmtag.errors import MmtagError

LITE0, LITE1, LITE2 = "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.uniform(-1, 1, (n, 3, size, size)).astype(np.float32))


def _run(enc, x):
    with torch.inference_mode():
        return enc(x)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # features of the same image in batches of other sizes differ by float noise only
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def lite0():
    return create_encoder(LITE0, "image")


@pytest.fixture(scope="module")
def flip0():
    return create_encoder(f"flip:{LITE0}", "image")


@pytest.fixture(scope="module")
def concat02():
    return create_encoder(f"concat:{LITE0}+{LITE2}", "image")


@pytest.mark.parametrize("name, dim, size", [
    (f"flip:{LITE0}", 1280, 224),
    (f"concat:{LITE0}+{LITE2}", 2560, 260),
    (f"flip:concat:{LITE0}+{LITE2}", 2560, 260),
    (f"concat:flip:{LITE0}+{LITE1}+{LITE2}", 3840, 260),
])
def test_names_resolve_to_image_encoders_of_the_parts_dims(name, dim, size):
    assert encoder_entry(name, "image").modality == "image"
    enc = create_encoder(name, "image", random_init=True)
    assert (enc.name, enc.dim, enc.image_size, enc.modality) == (name, dim, size, "image")
    # every backbone's source is kept, under the folder path its weights are saved in
    assert len([k for k, v in enc.source.items() if k.endswith(".random_init") and v == "true"]) \
        == name.count("efficientnet")


@pytest.mark.parametrize("name, says", [
    ("flip:resnet-9000", "unknown image encoder 'resnet-9000'"),
    (f"concat:{LITE0}+resnet-9000", "unknown image encoder 'resnet-9000'"),
    ("flip:minilm-l6", "unknown image encoder 'minilm-l6'"),  # a text encoder is no part
    (f"concat:{LITE0}", "two or more image encoders"),
    (f"concat:{LITE0}+", "two or more image encoders"),
])
def test_a_bad_part_is_a_one_line_error_listing_what_is_available(name, says):
    with pytest.raises(MmtagError) as err:
        create_encoder(name, "image", random_init=True)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"encoder '{name}': ") and says in msg
    if "unknown" in says:
        assert f"available: {LITE0}, {LITE1}, {LITE2}" in msg and "flip:IMAGE_ENCODER" in msg


def test_flip_of_a_mirror_symmetric_image_is_the_plain_feature(lite0, flip0):
    x = _images(2, 224)
    symmetric = (x + x.flip(-1)) / 2
    assert _close(_run(flip0, symmetric)[0], _run(lite0, symmetric)[0])
    # ... and only there: the network is not mirror-invariant, so elsewhere the views differ
    assert not _close(_run(flip0, x)[0], _run(lite0, x)[0])


def test_flip_features_are_invariant_to_mirroring_the_input(flip0):
    x = _images(2, 224, seed=1)
    pooled, tokens = _run(flip0, x)
    pooled_m, tokens_m = _run(flip0, x.flip(-1))
    assert tokens.shape == (2, 49, 1280) and torch.allclose(pooled, tokens.mean(1), atol=1e-5)
    assert _close(pooled, pooled_m)
    # tokens keep their places: the mirror's grid is this grid mirrored
    mirrored = tokens.reshape(2, 7, 7, 1280).flip(2).reshape(2, 49, 1280)
    assert _close(tokens_m, mirrored) and not _close(tokens_m, tokens)


def test_concat_puts_the_parts_features_side_by_side(concat02):
    x = _images(2, 260, seed=2)
    pooled, tokens = _run(concat02, x)
    p0, t0 = _run(concat02.parts["part0"], F.interpolate(x, size=(224, 224), mode="bilinear",
                                                         antialias=True, align_corners=False))
    p2, t2 = _run(concat02.parts["part1"], x)
    assert pooled.shape == (2, 2560) and tokens.shape == (2, 81, 2560)  # Lite2's 9x9 grid
    assert _close(pooled[:, :1280], p0) and _close(pooled[:, 1280:], p2)
    assert _close(tokens[..., 1280:], t2)
    # Lite0's 7x7 grid, upsampled to 9x9 (bilinear, half-pixel centres), keeps its corners
    grid = tokens[..., :1280].reshape(2, 9, 9, 1280)
    assert _close(grid[:, 0, 0], t0[:, 0]) and _close(grid[:, -1, -1], t0[:, -1])


def test_the_export_resize_is_the_eager_resize():
    x = _images(2, 260, seed=3)
    a = resize_matrix(260, 224)
    eager = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    assert a.shape == (224, 260) and torch.allclose(a @ x @ a.T, eager, atol=2e-4)
    assert torch.equal(resize_matrix(7, 7), torch.eye(7))


def test_ids_name_the_family_and_hash_every_part(lite0, flip0, concat02):
    assert flip0.encoder_id.startswith(f"flip:{LITE0}-") and flip0.encoder_id != lite0.encoder_id
    assert flip0.weights_sha256 != lite0.weights_sha256
    swapped = create_encoder(f"concat:{LITE2}+{LITE0}", "image")
    assert swapped.weights_sha256 != concat02.weights_sha256
    assert concat02.parts["part0"].weights_sha256 == lite0.weights_sha256  # parts are finalized too
    for t in concat02.state_dict().values():
        assert torch.equal(t, t.half().float())


@pytest.mark.parametrize("fixture", ["flip0", "concat02"])
def test_save_and_load_give_identical_features(fixture, request, tmp_path):
    enc = request.getfixturevalue(fixture)
    files = enc.save(tmp_path / "enc")
    meta = json.loads((tmp_path / "enc" / "encoder.json").read_text())
    assert meta["name"] == enc.name and set(meta["parts"]) == set(enc.parts)
    assert all(f.is_file() and f.parent.parent == tmp_path / "enc" for f in files)
    back = load_encoder(enc.name, tmp_path / "enc")
    assert back.weights_sha256 == enc.weights_sha256 and back.encoder_id == enc.encoder_id
    x = _images(1, enc.image_size, seed=4)
    for a, b in zip(_run(enc, x), _run(back, x)):
        assert torch.equal(a, b)


def test_a_nested_encoder_round_trips_and_checks_its_parts(tmp_path):
    name = f"flip:concat:{LITE0}+{LITE1}"
    enc = create_encoder(name, "image", random_init=True)
    enc.save(tmp_path / "enc")
    assert (tmp_path / "enc" / "inner" / "part1" / "weights.safetensors").is_file()
    assert load_encoder(name, tmp_path / "enc").weights_sha256 == enc.weights_sha256
    meta = tmp_path / "enc" / "inner" / "encoder.json"
    meta.write_text(json.dumps({"name": "x", "parts": {"part0": LITE1, "part1": LITE0}}))
    with pytest.raises(MmtagError, match="encoder.json: lists parts"):
        load_encoder(name, tmp_path / "enc")
    meta.unlink()
    with pytest.raises(MmtagError, match="cannot read the encoder metadata"):
        load_encoder(name, tmp_path / "enc")


def test_weights_are_present_only_when_every_part_is(monkeypatch):
    assert encoder_entry(f"concat:{LITE0}+{LITE2}").weights_present()
    gone = EncoderEntry("gone", "image", lambda _: None, lambda _: None, lambda: False, "absent")
    monkeypatch.setitem(ENCODERS, "gone", gone)
    assert not encoder_entry(f"concat:{LITE0}+gone").weights_present()
    assert not encoder_entry("flip:gone").weights_present()


def test_composites_are_frozen_extractors():
    enc = create_encoder(f"flip:{LITE0}", "image", random_init=True)
    with pytest.raises(MmtagError, match="cannot be fine-tuned"):
        enc.trainable_groups(2)
    assert not any(p.requires_grad for p in enc.parameters())


def test_config_accepts_composite_image_encoders():
    for name in (f"flip:{LITE0}", f"concat:{LITE0}+{LITE2}", f"flip:concat:{LITE0}+{LITE2}"):
        assert Config().override({"model.image_encoder": name}).model.image_encoder == name
    with pytest.raises(MmtagError, match="unknown image encoder 'flip:nope'"):
        Config().override({"model.image_encoder": "flip:nope"})
    with pytest.raises(MmtagError, match="unknown text encoder"):
        Config().override({"model.text_encoder": f"flip:{LITE0}"})


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SyntheticPaths:
    return make_dataset(tmp_path_factory.mktemp("small"), n_train=48, n_holdout=12, n_test=4,
                        size=64, seed=3)


def test_a_flip_tagger_trains_saves_reloads_and_exports(small, make_config, tmp_path):
    cfg = make_config(**{"model.image_encoder": f"flip:{LITE0}", "model.modalities": ["image"],
                         "train.folds": 1, "train.epochs": 5})
    train, _ = api.read_dataset(small.train_csv, small.images, labelled=True)
    holdout, _ = api.read_dataset(small.holdout_csv, small.images, labelled=True)
    tagger = Tagger(cfg)
    tagger.fit(train, progress=False)
    probs = tagger.predict_proba_dataset(holdout, progress=False).probs
    tagger.save(tmp_path / "run")
    assert (tmp_path / "run" / "encoders" / "image" / "inner" / "weights.safetensors").is_file()
    back = Tagger.load(tmp_path / "run")
    assert back.encoders["image"].name == f"flip:{LITE0}"
    assert np.array_equal(back.predict_proba_dataset(holdout, progress=False).probs, probs)
    # `mmtag export`: the composite traces as one ONNX graph and predicts like the eager one
    api.export(tmp_path / "run", tmp_path / "onnx")
    exported = Tagger.load(tmp_path / "onnx")
    assert exported.encoders["image"].name == f"onnx:flip:{LITE0}"
    paths = [holdout.image_path(i) for i in range(len(holdout))]
    assert np.abs(exported.predict_proba(paths) - back.predict_proba(paths)).max() < 1e-3


def test_a_concat_encoder_exports_with_its_resize(tmp_path):
    from mmtag.encoders import export_image_encoder

    enc = create_encoder(f"concat:{LITE0}+{LITE1}", "image")  # 224 and 240: one part is resized
    out = export_image_encoder(enc, tmp_path)  # checks agreement with eager on an unseen batch
    assert out.meta["probe_cosine"] >= 0.9999 and out.image_size == 240 and out.dim == 2560
