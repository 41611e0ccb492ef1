"""The feature pipeline under `model.image_size` and `model.image_pool`: images decoded at the
size the encoder reads and cached under that size's id (the default's id unchanged), and the
"image" vector heads read made of the mean- and max-pooled spatial tokens, cached as kinds of
their own, with nothing else loaded under the default mean pooling."""
from __future__ import annotations

import numpy as np
import pytest

from feature_helpers import extract_mod
from mmtag.api import read_dataset
from mmtag.data import parse_image_aug
from mmtag.encoders import create_encoder
from mmtag.errors import MmtagError
from mmtag.features import IMAGE_POOL_KINDS, FeatureCache, extract, modality_of
from mmtag.features.pipeline import Featurizer


@pytest.fixture(scope="module")
def lite0():
    return create_encoder("efficientnet-lite0", "image")


@pytest.fixture(scope="module")
def rows(tiny):
    data, _ = read_dataset(tiny.holdout_csv, tiny.images, labelled=True)
    return data.subset(range(6))


def _featurizer(tmp_path, *, image_size=None, pool="mean", kinds=("image",), encoders=None):
    return Featurizer(kinds, {"image": "efficientnet-lite0", "text": "minilm-l6"},
                      FeatureCache(tmp_path), encoders=encoders, workers=0, runtime="torch",
                      image_size=image_size, image_pool=pool)


def test_the_pooling_names_agree_with_the_config():
    from mmtag.config import IMAGE_POOLS

    assert tuple(IMAGE_POOL_KINDS) == IMAGE_POOLS
    assert all(modality_of(k) == "image" for kinds in IMAGE_POOL_KINDS.values() for k in kinds)


def test_the_size_reaches_the_decoded_images_and_keys_the_cache(rows, lite0, tmp_path, monkeypatch):
    sides = []
    real = extract_mod.encode_images

    def spy(encoder, images):
        sides.append(int(images.shape[-1]))
        return real(encoder, images)

    monkeypatch.setattr(extract_mod, "encode_images", spy)
    cache = FeatureCache(tmp_path)
    feats = {}
    for size in (64, 96):
        enc = create_encoder("efficientnet-lite0", "image", image_size=size)
        fs = extract(rows, ["image"], image_encoder=enc, text_encoder=None, cache=cache,
                     workers=0, progress=False)
        assert sides[-1] == size  # the loader decoded the images at the size the encoder reads
        feats[size] = fs.features["image"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{lite0.encoder_id}-{s}px" for s in (64, 96))  # the default's id is untouched
    assert not np.allclose(feats[64], feats[96], atol=1e-3)


def test_the_featurizer_builds_and_sizes_encoders_for_the_config(lite0, tmp_path):
    built = _featurizer(tmp_path, image_size=64).encoder("image")
    assert built.image_size == 64 and built.encoder_id == f"{lite0.encoder_id}-64px"
    assert _featurizer(tmp_path, image_size=0).encoder("image").image_size == 224
    # a given encoder of another size is replaced by a copy, never changed (sweep shares it)
    given = _featurizer(tmp_path, image_size=96, encoders={"image": lite0}).encoders["image"]
    assert given is not lite0 and given.image_size == 96 and lite0.image_size == 224
    assert _featurizer(tmp_path, image_size=0, encoders={"image": lite0}).encoders["image"] is lite0
    # not said (None): a given encoder reads what it reads (a bundle's, loaded at its size)
    assert _featurizer(tmp_path, encoders={"image": given}).encoders["image"] is given
    with pytest.raises(MmtagError, match="unknown image pooling 'max'; available: mean, mean\\+max"):
        _featurizer(tmp_path, pool="max")


def test_mean_pooling_loads_what_it_always_did(rows, lite0, tmp_path):
    fz = _featurizer(tmp_path, kinds=("image", "text"))
    assert fz.cached_kinds == ("image", "text")
    assert _featurizer(tmp_path, kinds=("image", "image_tokens", "text"), pool="mean+max").cached_kinds \
        == ("image", "image_max", "image_tokens", "text")
    fs = _featurizer(tmp_path).features(rows, progress=False)
    assert fs.features.kinds == ("image",) and fs.features["image"].shape == (len(rows), 1280)
    assert [p.name for p in (tmp_path / lite0.encoder_id).iterdir()] == ["image"]


def test_mean_max_pooling_joins_the_max_of_the_tokens_to_the_mean(rows, lite0, tmp_path):
    mean = _featurizer(tmp_path / "a").features(rows, progress=False).features["image"]
    fz = _featurizer(tmp_path / "b", pool="mean+max", encoders={"image": lite0})
    fs = fz.features(rows, progress=False)
    assert fs.features.kinds == ("image",) and fz.dims(fs.features) == {"image": 2560}
    joined = fs.features["image"]
    assert np.array_equal(joined[:, :1280], mean)  # the mean half: the default's features
    tokens = extract(rows, ["image_tokens"], image_encoder=lite0, text_encoder=None,
                     cache=FeatureCache(tmp_path / "c"), workers=0, progress=False)
    peak = tokens.features["image_tokens"].astype(np.float32).max(axis=1)
    np.testing.assert_allclose(joined[:, 1280:].astype(np.float32), peak, rtol=1e-3, atol=1e-3)
    # cached as a kind of its own beside the mean, so a mean run reads its half again
    assert sorted(p.name for p in (tmp_path / "b" / lite0.encoder_id).iterdir()) == ["image", "image_max"]
    # in-memory inputs (prediction) are pooled the same way (fp32 there, fp16 in the cache)
    memory = fz.encode([rows.image_path(i) for i in range(len(rows))], None)
    assert memory.kinds == ("image",)
    np.testing.assert_allclose(memory["image"], joined.astype(np.float32), rtol=2e-2, atol=2e-2)
    # augmented views too (a view without image augmentation carries no image kinds)
    fz.encoder("image")
    (view,) = fz.views(rows, 1, image_augment=parse_image_aug("flip"), text_augment=None, seed=0,
                       progress=False)
    assert view.kinds == ("image",) and view["image"].shape == (len(rows), 2560)
    assert fz.views(rows, 1, image_augment=None, text_augment=None, seed=0,
                    progress=False)[0].kinds == ()
