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


# ------------------------------------------------ split at a layer (top-layer fine-tuning)
def test_upper_of_lower_states_is_the_forward(minilm):
    b = minilm.tokenize(["a dog", "a man riding a horse on the beach at sunset with a dog", "bus"])
    with torch.no_grad():
        full = minilm(**b)
        for top in range(1, minilm.layer_count() + 1):
            lower = minilm.lower_states(b["input_ids"], b["attention_mask"], top)
            assert lower.shape == (3, b["input_ids"].shape[1], 384)
            up = minilm.upper_pooled(lower, b["attention_mask"], top)
            assert torch.allclose(up, full, atol=1e-6), (top, (up - full).abs().max())


def _tiny_model(model_type):
    from transformers import AutoModel, BertConfig, MPNetConfig, RobertaConfig, XLMRobertaConfig

    kind = {"bert": BertConfig, "roberta": RobertaConfig, "xlm-roberta": XLMRobertaConfig,
            "mpnet": MPNetConfig}[model_type]
    torch.manual_seed(0)
    cfg = kind(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
               intermediate_size=32, max_position_embeddings=40, pad_token_id=1)
    return AutoModel.from_config(cfg, add_pooling_layer=False).eval()


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "mpnet"])
def test_every_split_of_each_splittable_architecture(model_type):
    from mmtag.encoders import HFTextEncoder

    enc = HFTextEncoder("tiny", _tiny_model(model_type), tokenizer=None)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (4, 9), generator=g)
    mask = torch.ones(4, 9, dtype=torch.long)
    for row, n in enumerate([9, 3, 6, 1]):  # right padding, as the tokenizers pad
        ids[row, n:], mask[row, n:] = 1, 0
    assert enc.layer_count() == 3
    with torch.no_grad():
        full = enc(ids, mask)
    for top in (1, 2, 3):
        lower = enc.lower_states(ids, mask, top)
        up = enc.upper_pooled(lower, mask, top)
        assert torch.allclose(up, full, atol=1e-6), (model_type, top)
        # LowerStates re-pads each caption to its batch's longest: the short rows alone, cut to
        # 6 positions, must give the same output (MPNet's position bias follows the length).
        short = [1, 2, 3]
        cut = enc.upper_pooled(lower[short, :6], mask[short, :6], top)
        assert torch.allclose(cut, full[short], atol=1e-6), (model_type, top)


def test_trainable_groups_are_the_top_layers_and_lower_states_have_no_grad():
    from mmtag.encoders import HFTextEncoder

    enc = HFTextEncoder("tiny", _tiny_model("bert"), tokenizer=None)
    assert enc.trainable_groups() == [enc]  # whole-encoder fine-tuning, as before
    assert enc.trainable_groups(2) == list(enc.model.encoder.layer[1:])
    for p in enc.parameters():
        p.requires_grad_(True)
    ids, mask = torch.randint(5, 50, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    lower = enc.lower_states(ids, mask, 1)
    assert not lower.requires_grad
    enc.upper_pooled(lower, mask, 1).sum().backward()
    assert enc.model.encoder.layer[2].output.dense.weight.grad is not None
    assert enc.model.encoder.layer[1].output.dense.weight.grad is None
    assert enc.model.embeddings.word_embeddings.weight.grad is None


def test_bad_splits_are_one_line_errors_naming_the_option(minilm):
    from transformers import DistilBertConfig, DistilBertModel

    from mmtag.encoders import HFTextEncoder

    b = minilm.tokenize(["a dog"])
    for top in (0, 7, -1):
        with pytest.raises(MmtagError, match=rf"^--ft-top-layers {top}: text encoder 'minilm-l6' "
                                              r"has 6 transformer layers; use 1 to 6") as info:
            minilm.lower_states(b["input_ids"], b["attention_mask"], top)
        assert "\n" not in str(info.value)
    with pytest.raises(MmtagError, match="has 6 transformer layers"):
        minilm.trainable_groups(9)
    other = HFTextEncoder("distil", DistilBertModel(DistilBertConfig(
        vocab_size=20, dim=8, n_layers=1, n_heads=2, hidden_dim=16)), tokenizer=None)
    assert other.layer_count() == 0
    with pytest.raises(MmtagError, match=r"^--ft-top-layers 1: text encoder 'distil' \(model type "
                                         r"distilbert\) cannot run its lower layers apart"):
        other.trainable_groups(1)
