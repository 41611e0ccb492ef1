"""Shared fixtures: a tiny generated dataset and one trained fused run, built once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from mmtag import api
from mmtag.config import Config
from mmtag.synthetic import SyntheticPaths, make_dataset

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SyntheticPaths:
    return make_dataset(tmp_path_factory.mktemp("tiny"), n_train=200, n_holdout=40, n_test=12,
                        size=96, seed=1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def small_config(cache_dir: str, **overrides: object) -> Config:
    cfg = Config().override({"cache_dir": cache_dir, "train.epochs": 40, "train.patience": 10,
                             "model.hidden": 128, "data.workers": 0})
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
