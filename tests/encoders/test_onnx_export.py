"""Runtime twins: a frozen encoder traced once into the feature cache and run by ONNX Runtime,
computing the same features under the same encoder id."""
import json

import numpy as np
import pytest
import torch

from mmtag.encoders import (OnnxImageEncoder, OnnxTextEncoder, TWIN_DIR, create_encoder,
                            runtime_twin, twin_traced)
from mmtag.encoders import onnx_export
from mmtag.errors import MmtagError

import onnxruntime  # noqa: E402,F401  (a hard dependency: missing, these fail)


@pytest.fixture(scope="module")
def lite0():
    return create_encoder("efficientnet-lite0")


def test_image_twin_computes_the_eager_features_under_the_same_id(lite0, tmp_path):
    twin = runtime_twin(lite0, tmp_path)
    assert isinstance(twin, OnnxImageEncoder)
    assert twin.encoder_id == lite0.encoder_id and twin.name == lite0.name
    assert twin_traced(lite0, tmp_path) and (tmp_path / TWIN_DIR / lite0.encoder_id).is_dir()
    x = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (5, 3, 224, 224)).astype(np.float32))
    with torch.inference_mode():
        want = lite0(x)
    got = twin(x)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-3, atol=1e-4)


def test_text_twin_matches_eager(tiny_bert_dir, tmp_path):
    enc = create_encoder(f"hf:{tiny_bert_dir}", "text")
    twin = runtime_twin(enc, tmp_path)
    assert isinstance(twin, OnnxTextEncoder) and twin.encoder_id == enc.encoder_id
    captions = ["a dog", "the cat of the horse photo", "a photo of a dog a cat and a horse"]
    with torch.inference_mode():
        want = enc(**enc.tokenize(captions)).numpy()
    np.testing.assert_allclose(twin(**twin.tokenize(captions)).numpy(), want, rtol=1e-3, atol=1e-4)


def test_a_traced_twin_is_reused_not_traced_again(lite0, tmp_path, monkeypatch):
    runtime_twin(lite0, tmp_path)

    def no_tracing(*args, **kwargs):
        raise AssertionError("traced again")

    monkeypatch.setattr(onnx_export, "export_encoder", no_tracing)
    assert runtime_twin(lite0, tmp_path).encoder_id == lite0.encoder_id
    # nothing but the finished twin is left behind (tracing works in a temporary sibling)
    assert [p.name for p in (tmp_path / TWIN_DIR).iterdir()] == [lite0.encoder_id]


def test_a_twin_of_other_weights_is_refused(lite0, tmp_path):
    runtime_twin(lite0, tmp_path)
    done = tmp_path / TWIN_DIR / lite0.encoder_id / "done.json"
    meta = json.loads(done.read_text())
    done.write_text(json.dumps({**meta, "source_sha256": "0" * 64}))
    with pytest.raises(MmtagError, match="traced from other weights"):
        runtime_twin(lite0, tmp_path)


def test_a_failed_trace_leaves_nothing_behind(lite0, tmp_path, monkeypatch):
    def broken(enc, workdir, **kwargs):
        (workdir / "image").mkdir(parents=True)
        raise MmtagError("export of 'x' (fp32) disagrees with the eager encoder")

    monkeypatch.setattr(onnx_export, "export_encoder", broken)
    with pytest.raises(MmtagError, match="disagrees"):
        runtime_twin(lite0, tmp_path)
    assert not twin_traced(lite0, tmp_path) and list((tmp_path / TWIN_DIR).iterdir()) == []
