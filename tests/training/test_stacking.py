"""Stacking (`--stack`): per-label branch weights fitted on out-of-fold scores."""
import numpy as np
import pytest

from mmtag import Tagger, api
from mmtag.errors import MmtagError
from mmtag.heads import StackedHead
from mmtag.training.stacking import fit_stacker, logit, stacked_probs


def test_each_label_leans_on_the_branch_that_predicts_it():
    rng = np.random.default_rng(0)
    y = (rng.random((400, 3)) < 0.4).astype(np.float32)
    informative = np.where(y > 0, 0.8, 0.2) + rng.normal(0, 0.05, y.shape)
    noise = rng.random(y.shape)
    # label 0 is told by the image branch, labels 1-2 by the text branch
    image = np.clip(np.where([True, False, False], informative, noise), 0.01, 0.99)
    text = np.clip(np.where([True, False, False], noise, informative), 0.01, 0.99)
    w, b = fit_stacker([image, text], y)
    assert w[0, 0] > 5 * abs(w[0, 1]) and all(w[c, 1] > 5 * abs(w[c, 0]) for c in (1, 2))
    p = stacked_probs([image, text], w, b)
    assert ((p > 0.5) == (y > 0)).mean() > 0.95


def test_a_label_of_one_class_keeps_the_mean():
    y = np.zeros((10, 2), dtype=np.float32)
    y[:5, 0] = 1
    probs = np.full((10, 2), 0.3)
    w, b = fit_stacker([probs, probs], y)
    assert np.allclose(w[1], 0.5) and b[1] == 0
    assert np.allclose(stacked_probs([probs, probs], w, b)[:, 1], 1 / (1 + np.exp(-logit(probs[:, 1]))))


def test_a_stacked_cross_fitted_model_saves_loads_and_refuses_what_it_cannot_do(
        tiny, make_config, tmp_path):
    train, _ = api.read_dataset(tiny.train_csv, tiny.images, labelled=True)
    cfg = make_config(**{"model.fusion": "mean", "train.folds": 3, "train.stack": True,
                         "train.epochs": 4})
    tagger = Tagger(cfg)
    report = tagger.fit(train, progress=False)
    assert isinstance(tagger.head, StackedHead) and report.folds == 3
    assert not np.allclose(tagger.head.weight.detach().numpy(), 0.5)  # fitted, not the mean
    tagger.save(tmp_path / "run")
    data, _ = api.read_dataset(tiny.holdout_csv, tiny.images, labelled=True)
    assert np.allclose(Tagger.load(tmp_path / "run").predict_proba_dataset(data, progress=False).probs,
                       tagger.predict_proba_dataset(data, progress=False).probs)
    for bad in ({"train.folds": 1}, {"model.fusion": "concat"}, {"model.fusion": "union"}):
        with pytest.raises(MmtagError, match="--stack fits per-label weights"):
            Tagger(cfg.override(bad)).fit(train, progress=False)
