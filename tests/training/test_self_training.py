import numpy as np
import pytest

from mmtag import Tagger, api
from mmtag.training.strategies import base as strategy_base
from mmtag.training.strategies import select_pseudo_labels


def test_select_keeps_only_rows_confident_on_every_class():
    probs = np.array([[0.95, 0.02, 0.01],   # confident everywhere, one positive → kept
                      [0.95, 0.50, 0.01],   # unsure about class 1 → dropped
                      [0.05, 0.02, 0.01],   # confident but no positive label → dropped
                      [0.91, 0.97, 0.08]])  # two positives → kept
    keep, y = select_pseudo_labels(probs, 0.9)
    assert keep.tolist() == [0, 3]
    assert y.tolist() == [[1, 0, 0], [1, 1, 0]]
    with pytest.raises(ValueError):
        select_pseudo_labels(probs, 0.4)


def test_pseudo_rounds_never_touch_validation(tiny, make_config, monkeypatch):
    cfg = make_config(**{"model.modalities": ["text"], "pseudo.rounds": 2, "pseudo.confidence": 0.6})
    tagger = Tagger(cfg)
    calls = []
    original = strategy_base.fit_head

    def spy(head, tr, y_tr, va, y_va, *args, **kwargs):
        calls.append((len(y_tr), va["text"].copy(), y_va.copy()))
        return original(head, tr, y_tr, va, y_va, *args, **kwargs)

    monkeypatch.setattr(strategy_base, "fit_head", spy)
    train, _ = api.read_dataset(tiny.train_csv, None, labelled=True)
    pool, _ = api.read_dataset(tiny.test_csv, None, labelled=False)
    report = tagger.fit(train, unlabeled=pool, progress=False)
    assert len(calls) >= 2  # round 0 plus at least one pseudo round
    n0, va0, yva0 = calls[0]
    for n, va, yva in calls[1:]:
        assert np.array_equal(va, va0) and np.array_equal(yva, yva0)  # validation untouched
        assert n0 < n <= n0 + len(pool)  # pseudo rows join training only
    rounds = report.pseudo_rounds
    assert [r.round for r in rounds] == list(range(len(rounds))) and rounds[0].n_pseudo == 0
    assert report.n_val == len(yva0)
