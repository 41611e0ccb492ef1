"""The feature cache: optional, and checksummed shards that are recomputed when damaged."""
import numpy as np
import pytest

from feature_helpers import encoders, extract_mod, run_extract  # noqa: F401  (encoders: fixture)
from mmtag.api import read_dataset
from mmtag.features import FeatureCache


def test_cache_disabled_still_works_and_matches(tiny, tmp_path, encoders):
    data, _ = read_dataset(tiny.test_csv, tiny.images, labelled=False)
    a = run_extract(data, FeatureCache(None), encoders, kinds=("image_tokens", "image"))
    b = run_extract(data, FeatureCache(tmp_path / "c2"), encoders, kinds=("image_tokens", "image"))
    assert a.features["image_tokens"].shape == (len(data), 49, 1280)
    assert np.array_equal(a.features["image_tokens"], b.features["image_tokens"])
    assert np.allclose(a.features["image"].astype(np.float32),
                       a.features["image_tokens"].astype(np.float32).mean(1), atol=2e-2)


@pytest.mark.parametrize("damage", ["flip-bit", "truncate", "no-checksum"])
def test_corrupt_shard_is_detected_and_recomputed(tiny, tmp_path, encoders, monkeypatch, damage):
    data, _ = read_dataset(tiny.holdout_csv, tiny.images, labelled=True)  # 40 items
    monkeypatch.setattr(extract_mod, "SHARD_ITEMS", 16)
    first = run_extract(data, FeatureCache(tmp_path / "c"), encoders, kinds=("image",), batch_size=8)
    shards = sorted((tmp_path / "c").rglob("*.safetensors"))
    assert len(shards) == 3  # 16 + 16 + 8 items
    victim = max(shards, key=lambda p: p.stat().st_size)  # a full shard: 16 items
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
    real = extract_mod.encode_images

    def counting(enc, arrays):
        counted.append(len(arrays))
        return real(enc, arrays)

    monkeypatch.setattr(extract_mod, "encode_images", counting)
    again = run_extract(data, FeatureCache(tmp_path / "c"), encoders, kinds=("image",), batch_size=8)
    assert sum(counted) == 16  # exactly the damaged shard's items, nothing else
    assert np.array_equal(again.features["image"], first.features["image"])
    counted.clear()
    run_extract(data, FeatureCache(tmp_path / "c"), encoders, kinds=("image",), batch_size=8)
    assert counted == []  # the recomputed items were cached again, with a good checksum
