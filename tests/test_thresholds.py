import numpy as np

from mmtag.thresholds import Thresholds, decide, tune_global


def test_decide_applies_threshold_per_class():
    probs = np.array([[0.9, 0.6, 0.1], [0.2, 0.7, 0.8]])
    out = decide(probs, Thresholds("per-class", np.array([0.5, 0.65, 0.5])))
    assert out.tolist() == [[True, False, False], [False, True, True]]


def test_decide_top1_fallback_never_empty():
    probs = np.array([[0.1, 0.3, 0.2], [0.05, 0.01, 0.04], [0.9, 0.1, 0.1]])
    out = decide(probs, 0.5)
    assert out.tolist() == [[False, True, False], [True, False, False], [True, False, False]]
    assert out.any(axis=1).all()


def test_tune_global_finds_separating_threshold():
    rng = np.random.default_rng(0)
    y = rng.random((200, 4)) < 0.4
    y[:, 0] = True
    # positives score 0.7-0.8, negatives 0.2-0.3: any threshold in (0.3, 0.7] is perfect
    probs = np.where(y, 0.7 + 0.1 * rng.random(y.shape), 0.2 + 0.1 * rng.random(y.shape))
    t = tune_global(probs, y.astype(float))
    assert 0.3 < t.values[0] <= 0.7
    assert np.all(t.values == t.values[0]) and t.mode == "global"
    assert (decide(probs, t) == y).all()


def test_tune_global_prefers_high_threshold_when_negatives_score_mid():
    y = np.array([[1, 0], [1, 0], [0, 1], [1, 1]], dtype=float)
    probs = np.array([[0.9, 0.6], [0.95, 0.62], [0.61, 0.92], [0.9, 0.93]])
    t = tune_global(probs, y)
    assert t.values[0] > 0.62
    assert (decide(probs, t) == y.astype(bool)).all()


def test_thresholds_round_trip():
    t = Thresholds("global", np.array([0.3, 0.3], dtype=np.float32))
    back = Thresholds.from_dict(t.to_dict())
    assert back.mode == "global" and np.allclose(back.values, t.values)
