"""Shared fixtures: a tiny generated dataset and one trained fused run, built once per session."""
from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core: each gets one intra-op thread (inherited by
    # the trainings the tests start in subprocesses), so the workers do not fight over the
    # cores they share. Set before torch is imported, which reads it once.
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import pytest

from mmtag import api
from mmtag.config import Config
from mmtag.data.synthetic import SyntheticPaths, make_dataset

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _wordnet_missing() -> str | None:
    """Why tests marked `wordnet` cannot run here, or None when WordNet is installed."""
    from mmtag.data.augment import find_wordnet
    from mmtag.errors import MmtagError

    try:
        find_wordnet()
    except MmtagError as exc:
        return f"needs WordNet: {exc}"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Markers for optional system data (registered in pyproject.toml): skip, saying what to install.
    if item.get_closest_marker("wordnet") is not None:
        reason = _wordnet_missing()
        if reason is not None:
            pytest.skip(reason)


def save_tiny_bert(directory: Path, *, layers: int = 2) -> Path:
    """A tiny randomly initialised BERT + WordPiece tokenizer, saved like a local HF model."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat", "horse", "photo", "of", "the"]
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(str(directory))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random BERT saved as a Hugging Face directory (for `hf:` encoders)."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), layers=2)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SyntheticPaths:
    # one row under the size at which a cold cache traces an ONNX twin of the image encoder
    # (features.pipeline.TWIN_MIN_ITEMS): every test with its own cache would trace one, and the
    # twins have their own tests
    return make_dataset(tmp_path_factory.mktemp("tiny"), n_train=199, n_holdout=40, n_test=12,
                        size=96, seed=1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def small_config(cache_dir: str, **overrides: object) -> Config:
    # One split and the concat head, as the defaults were when most tests were written: a test
    # that needs neither says so, and five folds would make every training test five times
    # slower. The defaults themselves (auto folds, stacked mean) have their own tests.
    cfg = Config().override({"cache_dir": cache_dir, "train.epochs": 40, "train.patience": 10,
                             "model.hidden": 128, "data.workers": 0, "train.folds": 1,
                             "model.fusion": "concat"})
    return cfg.override(dict(overrides))


@pytest.fixture(scope="session")
def make_config(cache_dir: str):
    """Small, fast training settings on the session's feature cache; kwargs are dotted overrides."""
    return lambda **overrides: small_config(cache_dir, **overrides)


@pytest.fixture(scope="session")
def fused_run(tiny: SyntheticPaths, cache_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "fused"
    api.train(tiny.train_csv, tiny.images, out, small_config(cache_dir), progress=False)
    return out
