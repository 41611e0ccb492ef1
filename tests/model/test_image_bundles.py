"""Bundles under `model.image_size` and `model.image_pool`: a bundle records the size its image
encoder read (config.yaml, and the manifest's encoder entry and id) and predicts at it after a
reload; a model on mean+max pooled image vectors trains, saves, reloads and predicts the same."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmtag import Tagger, api
from mmtag.config import Config
from mmtag.errors import MmtagError


def _tagger_passes_image_options() -> bool:
    """Whether `Tagger` hands the config's image size and pooling to its Featurizer."""
    fz = Tagger(Config().override({"model.image_size": 64, "model.image_pool": "mean+max"})).featurizer
    return getattr(fz, "image_size", None) == 64 and getattr(fz, "image_pool", None) == "mean+max"


needs_tagger = pytest.mark.skipif(
    not _tagger_passes_image_options(),
    reason="model/tagger.py does not pass image_size=m.image_size, image_pool=m.image_pool to "
           "its Featurizer yet")


def _rehash(run: Path) -> None:
    from mmtag.encoders import sha256_file

    path = run / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"] = {rel: sha256_file(run / rel) for rel in manifest["files"]}
    path.write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="module")
def bundle_64(tmp_path_factory) -> Path:
    """An image-only bundle written by `bundle.save` whose Lite0 (random weights) read 64 px."""
    import torch

    from mmtag.data import LabelSpace
    from mmtag.decision.thresholds import Thresholds
    from mmtag.encoders import create_encoder
    from mmtag.heads import create_head
    from mmtag.model import bundle

    config = Config().override({"model.modalities": "image", "model.hidden": 16,
                                "model.image_size": 64, "train.folds": 1, "train.stack": False})
    encoders = {"image": create_encoder("efficientnet-lite0", "image", random_init=True,
                                        image_size=64)}
    dims = {"image": encoders["image"].dim}
    torch.manual_seed(0)
    head = create_head("image", dims, 3, hidden=16)
    run = tmp_path_factory.mktemp("bundle-64") / "run"
    bundle.save(run, bundle.Bundle(
        config=config, label_space=LabelSpace(ids=(1, 2, 3), names=("a", "b", "c")),
        thresholds=Thresholds.constant(0.4, 3), head_name="image", dims=dims,
        head_state=head.state_dict(), encoders=encoders))
    return run


def test_a_bundle_records_its_image_size_and_predicts_at_it(bundle_64, monkeypatch):
    from PIL import Image

    import mmtag.features.pipeline as pipeline

    entry = json.loads((bundle_64 / "manifest.json").read_text())["encoders"]["image"]
    assert entry["image_size"] == 64 and entry["encoder_id"].endswith("-64px")
    tagger = Tagger.load(bundle_64)
    assert tagger.encoders["image"].image_size == 64
    assert tagger.encoders["image"].encoder_id == entry["encoder_id"]
    sizes = []
    real = pipeline.decode_image
    monkeypatch.setattr(pipeline, "decode_image", lambda img, size: sizes.append(size) or real(img, size))
    assert len(tagger.predict([Image.new("RGB", (40, 30), "red")])) == 1
    assert sizes == [64]


def test_a_bundle_whose_config_and_manifest_disagree_on_the_size_is_refused(bundle_64, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(bundle_64, run)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("image_size: 64", "image_size: 96"))
    _rehash(run)
    with pytest.raises(MmtagError) as e:
        Tagger.load(run)
    assert "model.image_size 96 gives the image encoder 96-pixel images" in str(e.value)
    assert "says it read 64-pixel ones" in str(e.value) and "\n" not in str(e.value)


def test_a_head_reading_mean_max_vectors_needs_a_config_that_pools_them(bundle_64, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(bundle_64, run)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("image_pool: mean", "image_pool: mean+max"))
    _rehash(run)
    with pytest.raises(MmtagError, match=r"gives 1280-d features \(mean\+max pooled: 2560-d\), "
                                         r"but the head .* reads 1280-d 'image'"):
        Tagger.load(run)


def test_a_bundle_that_would_not_load_is_not_written(bundle_64, tmp_path):
    from mmtag.model import bundle

    b = bundle.load(bundle_64)
    b.config = b.config.override({"model.image_size": 96})
    with pytest.raises(MmtagError, match="model.image_size is 96, but the image encoder "
                                         "'efficientnet-lite0' reads 64-pixel images"):
        bundle.save(tmp_path / "a", b)
    b.config = b.config.override({"model.image_size": 64, "model.image_pool": "mean+max"})
    with pytest.raises(MmtagError, match=r"model.image_pool mean\+max makes 2560-d image vectors "
                                         r"of 'efficientnet-lite0', but the head reads 1280-d"):
        bundle.save(tmp_path / "b", b)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------- trained end to end
@pytest.fixture(scope="module")
def run_64_meanmax(tiny, make_config, tmp_path_factory):
    """A late-fusion (mean) run over images read at 64 px, pooled mean+max."""
    out = tmp_path_factory.mktemp("runs") / "meanmax-64"
    cfg = make_config(**{"model.image_size": 64, "model.image_pool": "mean+max",
                         "model.fusion": "mean", "train.epochs": 8, "train.patience": 4,
                         "model.hidden": 32})
    tagger, _, _ = api.train(tiny.train_csv, tiny.images, out, cfg, progress=False)
    return out, tagger


@needs_tagger
def test_a_run_at_another_size_saves_reloads_and_predicts_at_it(tiny, run_64_meanmax):
    out, trained = run_64_meanmax
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["encoders"]["image"]["image_size"] == 64
    assert manifest["encoders"]["image"]["encoder_id"].endswith("-64px")
    loaded = Tagger.load(out)
    assert loaded.config.model.image_size == 64
    assert loaded.encoders["image"].encoder_id == trained.encoders["image"].encoder_id
    data, _ = api.read_dataset(tiny.holdout_csv, tiny.images, labelled=True)
    data = data.subset(range(8))
    want = trained.predict_proba_dataset(data, progress=False).probs
    assert np.array_equal(loaded.predict_proba_dataset(data, progress=False).probs, want)
    # in memory, decoded afresh at 64 px (fp32 features there, fp16 in the cache)
    images = [data.image_path(i) for i in range(len(data))]
    got = loaded.predict_proba(images, data.captions)
    assert np.allclose(got, want, atol=2e-2)


@needs_tagger
def test_a_mean_max_head_trains_saves_reloads_and_predicts_the_same(tiny, run_64_meanmax):
    out, trained = run_64_meanmax
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["head"]["dims"] == {"image": 2 * 1280, "text": 384}
    loaded = Tagger.load(out)
    assert loaded.config.model.image_pool == "mean+max" and loaded.needs == ("image", "text")
    data, _ = api.read_dataset(tiny.holdout_csv, tiny.images, labelled=True)
    data = data.subset(range(8))
    first = loaded.predict_proba_dataset(data, progress=False).probs
    again = Tagger.load(out).predict_proba_dataset(data, progress=False).probs
    assert np.array_equal(first, again)
    # the image branch answers alone from the same mean+max vectors
    images = [data.image_path(i) for i in range(len(data))]
    preds = loaded.predict(images)
    assert all(p.modalities_used == ["image"] for p in preds)
