"""The opt-in `mpnet-base` text encoder: registration, the missing-weights message, loading a tiny
random MPNet through the same lookup, and (when `make mpnet` has run) the real weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmtag.config import Config
from mmtag.encoders import (ENCODERS, MPNET_DIR_ENV, create_encoder, encoder_entry, load_encoder,
                            mpnet_present, sha256_file)
from mmtag.encoders import registry
from mmtag.errors import MmtagError

WORDS = ["a", "dog", "cat", "runs", "photo", "of", "the", "horse", "in", "field"]


def save_tiny_mpnet(directory: Path) -> Path:
    """A 2-layer random MPNet + its tokenizer, saved as a Hugging Face directory (what `make
    mpnet` unpacks, at a few kB instead of 440 MB)."""
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    # MPNet's special tokens in the order of the real vocabulary (<s> 0, <pad> 1, </s> 2).
    specials = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    MPNetTokenizer(vocab=vocab).save_pretrained(str(directory))
    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=160,
                      pad_token_id=1, bos_token_id=0, eos_token_id=2)
    MPNetModel(cfg).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def tiny_mpnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_mpnet(tmp_path_factory.mktemp("tiny-mpnet"))


def test_registered_and_listed_for_text(monkeypatch, tmp_path):
    assert ENCODERS["mpnet-base"].modality == "text"
    assert encoder_entry("mpnet-base", "text").name == "mpnet-base"
    assert Config().override({"model.text_encoder": "mpnet-base"}).model.text_encoder == "mpnet-base"
    with pytest.raises(MmtagError, match="mpnet-base"):
        encoder_entry("no-such-text-encoder", "text")
    with pytest.raises(MmtagError, match="unknown image encoder"):
        encoder_entry("mpnet-base", "image")
    # `mmtag encoders` lists it even without its weights (only this entry, to keep it fast)
    monkeypatch.setenv(MPNET_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(registry, "ENCODERS", {"mpnet-base": ENCODERS["mpnet-base"]})
    (row,) = registry.list_encoders()
    assert (row.name, row.modality, row.weights_present, row.params_m) == ("mpnet-base", "text", False, None)
    assert "make mpnet" in row.description


def test_absent_weights_say_to_run_make_mpnet(monkeypatch, tmp_path):
    monkeypatch.setenv(MPNET_DIR_ENV, str(tmp_path))
    assert not mpnet_present() and not ENCODERS["mpnet-base"].weights_present()
    with pytest.raises(MmtagError, match="make mpnet") as info:
        create_encoder("mpnet-base", "text")
    message = str(info.value)
    assert "\n" not in message and MPNET_DIR_ENV in message and str(tmp_path) in message


def test_present_weights_load_save_and_reload(monkeypatch, tiny_mpnet_dir, tmp_path):
    from safetensors.torch import load_file

    monkeypatch.setenv(MPNET_DIR_ENV, str(tiny_mpnet_dir))
    assert ENCODERS["mpnet-base"].weights_present()
    enc = create_encoder("mpnet-base", "text")
    assert enc.name == "mpnet-base" and enc.dim == 32
    weights = tiny_mpnet_dir / "model.safetensors"
    assert enc.source["file_sha256"] == sha256_file(weights)
    # the saved weights were loaded (rounded to fp16 precision), not a fresh random init
    saved = load_file(str(weights))["embeddings.word_embeddings.weight"]
    assert torch.equal(enc.model.embeddings.word_embeddings.weight, saved.half().float())
    batch = enc.tokenize(["a dog runs in the field", "the cat"])
    assert batch["input_ids"][0, 0] == 0 and batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()
    with torch.inference_mode():
        out = enc(**batch)
    assert out.shape == (2, 32)
    enc.save(tmp_path / "bundle")
    back = load_encoder("mpnet-base", tmp_path / "bundle")
    assert back.weights_sha256 == enc.weights_sha256
    with torch.inference_mode():
        assert torch.equal(back(**batch), out)


def test_random_init_needs_only_the_config(monkeypatch, tiny_mpnet_dir, tmp_path):
    import shutil

    d = tmp_path / "no-weights"
    shutil.copytree(tiny_mpnet_dir, d)
    (d / "model.safetensors").unlink()
    monkeypatch.setenv(MPNET_DIR_ENV, str(d))
    assert not mpnet_present()
    with pytest.raises(MmtagError, match="model.safetensors"):
        create_encoder("mpnet-base", "text")
    assert create_encoder("mpnet-base", "text", random_init=True).dim == 32


def test_real_weights_pool_to_768_and_rank_paraphrases(monkeypatch):
    monkeypatch.delenv(MPNET_DIR_ENV, raising=False)
    if not mpnet_present():
        pytest.skip("all-mpnet-base-v2 is not installed: run `make mpnet`")
    enc = create_encoder("mpnet-base", "text")
    captions = ["a dog runs across the grass", "a puppy is running on a lawn",
                "a plate of pasta on a table", "two men play tennis"]
    with torch.inference_mode():
        v = torch.nn.functional.normalize(enc(**enc.tokenize(captions)), dim=1)
    assert v.shape == (4, 768)
    sim = v @ v.T
    assert float(sim[0, 1]) > max(float(sim[0, 2]), float(sim[0, 3]), float(sim[1, 2])) + 0.2
