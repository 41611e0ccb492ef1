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
