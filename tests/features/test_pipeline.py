"""The feature pipeline shared by training and prediction: which encoders a head's kinds need,
encoders replaced (fine-tuned or exported), and in-memory inputs checked before any encoding."""
import numpy as np
import pytest

from mmtag.errors import MmtagError
from mmtag.features import FeatureCache
from mmtag.features.pipeline import Featurizer


def _featurizer(kinds: tuple[str, ...], tmp_path) -> Featurizer:
    return Featurizer(kinds, {"image": "efficientnet-lite0", "text": "minilm-l6"},
                      FeatureCache(str(tmp_path)), workers=0)


def test_modalities_follow_the_kinds_in_order(tmp_path):
    assert _featurizer(("image", "image_tokens", "text"), tmp_path).modalities == ["image", "text"]
    assert _featurizer(("text",), tmp_path).modalities == ["text"]
    assert _featurizer(("image_tokens",), tmp_path).modalities == ["image"]


def test_each_kind_has_one_modality_and_an_unknown_kind_is_an_error(tmp_path):
    from mmtag.features import FEATURE_KINDS, KIND_MODALITY, modality_of

    assert FEATURE_KINDS == tuple(KIND_MODALITY)
    assert {k: modality_of(k) for k in FEATURE_KINDS} == {"image": "image", "image_tokens": "image",
                                                          "text": "text", "image_max": "image"}
    for kind in ("audio", "text_tokens", "", None):  # never guessed from the name
        with pytest.raises(MmtagError, match=f"unknown feature kind {kind!r}"):
            modality_of(kind)
    with pytest.raises(MmtagError, match="unknown feature kind 'audio'"):
        _featurizer(("image", "audio"), tmp_path).modalities


def test_in_memory_inputs_are_checked_before_any_encoder_is_built(tmp_path):
    fz = _featurizer(("image", "text"), tmp_path)
    with pytest.raises(MmtagError, match="needs images"):
        fz.encode(None, ["a cat"])
    with pytest.raises(MmtagError, match="needs captions"):
        fz.encode(["a.jpg"], None)
    with pytest.raises(MmtagError, match="2 images but 1 captions"):
        fz.encode(["a.jpg", "b.jpg"], ["x"])
    with pytest.raises(MmtagError, match="nothing to predict"):
        fz.encode([], [])
    assert fz.encoders == {}  # refused before anything was loaded


def test_text_features_of_the_encoder_in_use(tmp_path):
    fz = _featurizer(("text",), tmp_path)
    a = fz.encode(None, ["a dog on a sofa", "two trains"])
    assert a.kinds == ("text",) and len(a) == 2 and a["text"].dtype == np.float32
    other = Featurizer(("text",), {"text": "minilm-l6"}, FeatureCache(str(tmp_path)), workers=0,
                       random_init=True)
    fz.replace_encoder("text", other.encoder("text"))  # e.g. a fine-tuned copy
    b = fz.encode(None, ["a dog on a sofa", "two trains"])
    assert not np.allclose(a["text"], b["text"])
    assert fz.dims(b) == {"text": b["text"].shape[-1]}


# ------------------------------------------------------- which runtime computes the features
def _runtime_featurizer(tmp_path, runtime: str) -> Featurizer:
    return Featurizer(("image",), {"image": "efficientnet-lite0"}, FeatureCache(str(tmp_path)),
                      workers=0, runtime=runtime)


def test_auto_traces_a_twin_only_where_the_work_repays_it(tmp_path):
    from mmtag.encoders import OnnxImageEncoder
    from mmtag.features.pipeline import TWIN_MIN_ITEMS

    fz = _runtime_featurizer(tmp_path, "auto")
    enc = fz.encoder("image")
    assert fz.runner(enc, TWIN_MIN_ITEMS["image"] - 1) is enc  # a few items: eager is quicker
    twin = fz.runner(enc, TWIN_MIN_ITEMS["image"])
    assert isinstance(twin, OnnxImageEncoder) and twin.encoder_id == enc.encoder_id
    # once traced into the cache, any number of items uses it, in this process or the next
    again = _runtime_featurizer(tmp_path, "auto")
    assert isinstance(again.runner(again.encoder("image"), 1), OnnxImageEncoder)
    assert _runtime_featurizer(tmp_path, "torch").runner(enc, 10**6) is enc
    assert isinstance(_runtime_featurizer(tmp_path / "b", "onnx").runner(enc, 1), OnnxImageEncoder)


def test_a_failed_twin_falls_back_to_pytorch_under_auto_only(tmp_path, monkeypatch, caplog):
    from mmtag.features import pipeline

    def broken(enc, root):
        raise RuntimeError("tracer says no")

    monkeypatch.setattr(pipeline, "runtime_twin", broken)
    monkeypatch.setattr(pipeline, "TWIN_MIN_ITEMS", {"image": 0})
    fz = _runtime_featurizer(tmp_path, "auto")
    enc = fz.encoder("image")
    with caplog.at_level("WARNING", logger="mmtag"):
        assert fz.runner(enc, 5) is enc
    assert "ONNX Runtime twin failed (RuntimeError: tracer says no)" in caplog.text
    with pytest.raises(MmtagError, match="--feature-runtime onnx: cannot run 'efficientnet-lite0'"):
        _runtime_featurizer(tmp_path, "onnx").runner(enc, 5)


def test_twin_features_share_the_cache_with_eager_ones(tiny, tmp_path):
    """Features computed by the twin land under the encoder's own id: an eager run afterwards
    reads them instead of computing, and they agree with eager features to fp16 rounding."""
    from mmtag.data import read_dataset

    data, _ = read_dataset(tiny.train_csv, tiny.images, labelled=True)
    data = data.subset(list(range(6)))
    fast = _runtime_featurizer(tmp_path / "cache", "onnx").features(data, progress=False)
    eager = _runtime_featurizer(tmp_path / "fresh", "torch").features(data, progress=False)
    np.testing.assert_allclose(fast.features["image"], eager.features["image"], atol=2e-2, rtol=1e-2)
    reused = _runtime_featurizer(tmp_path / "cache", "torch")

    def no_compute(encoder, n):
        raise AssertionError("computed again")

    reused.runner = no_compute  # type: ignore[method-assign]
    np.testing.assert_array_equal(reused.features(data, progress=False).features["image"],
                                  fast.features["image"])
