import numpy as np
import pytest

from mmtag.features import extract as features_mod
from mmtag.api import read_dataset
from mmtag.encoders import create_encoder
from mmtag.errors import DataError
from mmtag.features import FeatureCache, extract


@pytest.fixture(scope="module")
def encoders():
    return create_encoder("efficientnet-lite0"), create_encoder("minilm-l6")


def _extract(data, cache, encoders, kinds=("image", "text"), **kw):
    img, txt = encoders
    return extract(data, kinds, image_encoder=img, text_encoder=txt, cache=cache, workers=0,
                   progress=False, **kw)


def test_second_extraction_is_served_from_cache(tiny, tmp_path, encoders, monkeypatch):
    data, _ = read_dataset(tiny.holdout_csv, tiny.images, labelled=True)
    cache = FeatureCache(tmp_path / "c")
    first = _extract(data, cache, encoders)
    assert first.features["image"].shape == (len(data), 1280) and first.features["text"].shape == (len(data), 384)
    assert first.features["image"].dtype == np.float16

    def boom(*a, **k):
        raise AssertionError("recomputed despite cache")

    monkeypatch.setattr(features_mod, "encode_images", boom)
    monkeypatch.setattr(features_mod, "encode_captions", boom)
    again = _extract(data, FeatureCache(tmp_path / "c"), encoders)  # fresh index, read from disk
    assert np.array_equal(first.features["image"], again.features["image"])
    assert np.array_equal(first.features["text"], again.features["text"])
    # a subset in another order is also fully cached
    sub = data.subset([5, 1, 3])
    part = _extract(sub, FeatureCache(tmp_path / "c"), encoders)
    assert np.array_equal(part.features["image"], first.features["image"][[5, 1, 3]])


def test_cache_disabled_still_works_and_matches(tiny, tmp_path, encoders):
    data, _ = read_dataset(tiny.test_csv, tiny.images, labelled=False)
    a = _extract(data, FeatureCache(None), encoders, kinds=("image_tokens", "image"))
    b = _extract(data, FeatureCache(tmp_path / "c2"), encoders, kinds=("image_tokens", "image"))
    assert a.features["image_tokens"].shape == (len(data), 49, 1280)
    assert np.array_equal(a.features["image_tokens"], b.features["image_tokens"])
    assert np.allclose(a.features["image"].astype(np.float32),
                       a.features["image_tokens"].astype(np.float32).mean(1), atol=2e-2)


def test_undecodable_image_strict_and_skip(tiny, tmp_path, encoders):
    data, _ = read_dataset(tiny.test_csv, tiny.images, labelled=False)
    bad_dir = tmp_path / "imgs"
    bad_dir.mkdir()
    for i in range(len(data)):
        (bad_dir / data.image_ids[i]).write_bytes(data.image_path(i).read_bytes())
    (bad_dir / data.image_ids[2]).write_bytes(b"not a jpeg")
    data.images_dir = bad_dir
    cache = FeatureCache(tmp_path / "c3")
    with pytest.raises(DataError, match=r"row 3.*cannot decode"):
        _extract(data, cache, encoders, kinds=("image",))
    fs = _extract(data, cache, encoders, kinds=("image",), skip_bad=True)
    assert len(fs.dataset) == len(data) - 1 and len(fs.skipped) == 1
    assert data.image_ids[2] not in fs.dataset.image_ids
    assert fs.features["image"].shape[0] == len(data) - 1


def test_interrupted_extraction_resumes_where_it_stopped(tiny, tmp_path, encoders, monkeypatch):
    data, _ = read_dataset(tiny.holdout_csv, tiny.images, labelled=True)  # 40 items
    monkeypatch.setattr(features_mod, "SHARD_ITEMS", 8)
    real = features_mod.encode_images
    seen: list[int] = []

    def killed_after_three_batches(enc, arrays):
        if len(seen) == 3:
            raise KeyboardInterrupt  # what Ctrl-C (or a kill between shards) leaves behind
        seen.append(len(arrays))
        return real(enc, arrays)

    monkeypatch.setattr(features_mod, "encode_images", killed_after_three_batches)
    with pytest.raises(KeyboardInterrupt):
        _extract(data, FeatureCache(tmp_path / "c"), encoders, kinds=("image",), batch_size=8)
    done = sum(seen)
    assert done == 24

    counted: list[int] = []

    def counting(enc, arrays):
        counted.append(len(arrays))
        return real(enc, arrays)

    monkeypatch.setattr(features_mod, "encode_images", counting)
    resumed = _extract(data, FeatureCache(tmp_path / "c"), encoders, kinds=("image",), batch_size=8)
    assert sum(counted) == len(data) - done  # only what was missing
    full = _extract(data, FeatureCache(tmp_path / "fresh"), encoders, kinds=("image",), batch_size=8)
    assert np.array_equal(resumed.features["image"], full.features["image"])


@pytest.mark.parametrize("damage", ["flip-bit", "truncate", "no-checksum"])
def test_corrupt_shard_is_detected_and_recomputed(tiny, tmp_path, encoders, monkeypatch, damage):
    data, _ = read_dataset(tiny.holdout_csv, tiny.images, labelled=True)  # 40 items
    monkeypatch.setattr(features_mod, "SHARD_ITEMS", 16)
    first = _extract(data, FeatureCache(tmp_path / "c"), encoders, kinds=("image",), batch_size=8)
    shards = sorted((tmp_path / "c").rglob("*.safetensors"))
    assert len(shards) == 3
    victim = shards[1]
    raw = bytearray(victim.read_bytes())
    if damage == "flip-bit":
        raw[-7] ^= 0x10  # inside the fp16 payload: the file still parses, only the checksum knows
    elif damage == "truncate":
        raw = raw[: len(raw) - 40]
    else:  # a shard written without a checksum (older mmtag, or a foreign tool)
        from safetensors import safe_open
        from safetensors.numpy import save_file
        with safe_open(str(victim), "np") as fh:
            keys, arr = fh.metadata()["keys"], fh.get_tensor("x")
        save_file({"x": arr}, str(victim), metadata={"keys": keys})
        raw = bytearray(victim.read_bytes())
    victim.write_bytes(bytes(raw))

    counted: list[int] = []
    real = features_mod.encode_images

    def counting(enc, arrays):
        counted.append(len(arrays))
        return real(enc, arrays)

    monkeypatch.setattr(features_mod, "encode_images", counting)
    again = _extract(data, FeatureCache(tmp_path / "c"), encoders, kinds=("image",), batch_size=8)
    assert sum(counted) == 16  # exactly the damaged shard's items, nothing else
    assert np.array_equal(again.features["image"], first.features["image"])
    counted.clear()
    _extract(data, FeatureCache(tmp_path / "c"), encoders, kinds=("image",), batch_size=8)
    assert counted == []  # the recomputed items were cached again, with a good checksum
