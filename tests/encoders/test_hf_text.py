"""Hugging Face text encoders: pretrained MiniLM, `hf:` directories, and pickles refused."""
import pytest
import torch

from mmtag.encoders import create_encoder, load_encoder
from mmtag.errors import MmtagError


@pytest.fixture(scope="module")
def minilm():
    return create_encoder("minilm-l6", "text")


def test_text_encoder_shapes_and_meaningful_similarity(minilm):
    batch = minilm.tokenize(["a dog runs", "a puppy is running", "stock market report"])
    with torch.inference_mode():
        v = torch.nn.functional.normalize(minilm(**batch), dim=1)
    assert v.shape == (3, 384)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2  # pretrained, not random


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
