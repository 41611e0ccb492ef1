"""Feature extraction: served from the cache when it can be, resumable after an interruption,
strict about an undecodable image or skipping it."""
import numpy as np
import pytest

from feature_helpers import encoders, extract_mod, run_extract  # noqa: F401  (encoders: fixture)
from mmtag.api import read_dataset
from mmtag.errors import DataError
from mmtag.features import FeatureCache


def test_second_extraction_is_served_from_cache(tiny, tmp_path, encoders, monkeypatch):
    data, _ = read_dataset(tiny.holdout_csv, tiny.images, labelled=True)
    cache = FeatureCache(tmp_path / "c")
    first = run_extract(data, cache, encoders)
    assert first.features["image"].shape == (len(data), 1280) and first.features["text"].shape == (len(data), 384)
    assert first.features["image"].dtype == np.float16

    def boom(*a, **k):
        raise AssertionError("recomputed despite cache")

    monkeypatch.setattr(extract_mod, "encode_images", boom)
    monkeypatch.setattr(extract_mod, "encode_captions", boom)
    again = run_extract(data, FeatureCache(tmp_path / "c"), encoders)  # fresh index, read from disk
    assert np.array_equal(first.features["image"], again.features["image"])
    assert np.array_equal(first.features["text"], again.features["text"])
    # a subset in another order is also fully cached
    sub = data.subset([5, 1, 3])
    part = run_extract(sub, FeatureCache(tmp_path / "c"), encoders)
    assert np.array_equal(part.features["image"], first.features["image"][[5, 1, 3]])


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
        run_extract(data, cache, encoders, kinds=("image",))
    fs = run_extract(data, cache, encoders, kinds=("image",), skip_bad=True)
    assert len(fs.dataset) == len(data) - 1 and len(fs.skipped) == 1
    assert data.image_ids[2] not in fs.dataset.image_ids
    assert fs.features["image"].shape[0] == len(data) - 1


def test_interrupted_extraction_resumes_where_it_stopped(tiny, tmp_path, encoders, monkeypatch):
    data, _ = read_dataset(tiny.holdout_csv, tiny.images, labelled=True)  # 40 items
    monkeypatch.setattr(extract_mod, "SHARD_ITEMS", 8)
    real = extract_mod.encode_images
    seen: list[int] = []

    def killed_after_three_batches(enc, arrays):
        if len(seen) == 3:
            raise KeyboardInterrupt  # what Ctrl-C (or a kill between shards) leaves behind
        seen.append(len(arrays))
        return real(enc, arrays)

    monkeypatch.setattr(extract_mod, "encode_images", killed_after_three_batches)
    with pytest.raises(KeyboardInterrupt):
        run_extract(data, FeatureCache(tmp_path / "c"), encoders, kinds=("image",), batch_size=8)
    done = sum(seen)
    assert done == 24

    counted: list[int] = []

    def counting(enc, arrays):
        counted.append(len(arrays))
        return real(enc, arrays)

    monkeypatch.setattr(extract_mod, "encode_images", counting)
    resumed = run_extract(data, FeatureCache(tmp_path / "c"), encoders, kinds=("image",), batch_size=8)
    assert sum(counted) == len(data) - done  # only what was missing
    full = run_extract(data, FeatureCache(tmp_path / "fresh"), encoders, kinds=("image",), batch_size=8)
    assert np.array_equal(resumed.features["image"], full.features["image"])


def test_an_image_listed_with_several_captions_is_encoded_once(tiny, tmp_path, encoders, monkeypatch):
    # a COCO-style CSV: one row per caption, three per image
    data, _ = read_dataset(tiny.holdout_csv, tiny.images, labelled=True)
    data = data.subset([i for i in range(10) for _ in range(3)])
    data.captions = [f"{c} ({k})" for c, k in zip(data.captions, [0, 1, 2] * 10)]
    real_images, real_text = extract_mod.encode_images, extract_mod.encode_captions
    images: list[int] = []
    captions: list[int] = []
    monkeypatch.setattr(extract_mod, "encode_images",
                        lambda enc, a: images.append(len(a)) or real_images(enc, a))
    monkeypatch.setattr(extract_mod, "encode_captions",
                        lambda enc, c: captions.append(len(c)) or real_text(enc, c))
    fs = run_extract(data, FeatureCache(tmp_path / "c"), encoders)
    assert sum(images) == 10 and sum(captions) == 30  # each image once, each caption once
    img = fs.features["image"]
    assert img.shape[0] == 30 and all(np.array_equal(img[3 * i], img[3 * i + k])
                                      for i in range(10) for k in (1, 2))
    assert not np.array_equal(fs.features["text"][0], fs.features["text"][1])
