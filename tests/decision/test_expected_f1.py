"""The expected-F1 decision against brute force: every outcome of every label set enumerated."""
import itertools

import numpy as np

from mmtag.decision.expected_f1 import decide_expected_f1, expected_f1_by_k, poisson_binomial


def _expected_f1(pred: np.ndarray, p: np.ndarray) -> float:
    """E[F1] of a decision by enumerating all 2^C outcomes of independent labels."""
    total = 0.0
    for y in itertools.product([0, 1], repeat=len(p)):
        y = np.array(y, dtype=bool)
        prob = float(np.prod(np.where(y, p, 1 - p)))
        tp, denom = (y & pred).sum(), y.sum() + pred.sum()
        total += prob * (1.0 if denom == 0 else 2.0 * tp / denom)
    return total


def test_poisson_binomial_is_a_distribution_with_the_right_mean():
    p = np.random.default_rng(0).random((4, 6))
    d = poisson_binomial(p)
    assert np.allclose(d.sum(1), 1) and np.allclose(d @ np.arange(7), p.sum(1))


def test_expected_f1_and_the_decision_match_brute_force_over_every_label_set():
    rng = np.random.default_rng(1)
    probs = np.concatenate([rng.random((20, 5)), rng.random((10, 5)) ** 4])  # some near-empty rows
    by_k = expected_f1_by_k(probs)
    decisions = decide_expected_f1(probs)
    for p, row, pred in zip(probs, by_k, decisions):
        order = np.argsort(-p)
        for k in range(1, 6):
            top = np.zeros(5, dtype=bool)
            top[order[:k]] = True
            assert np.isclose(row[k - 1], _expected_f1(top, p))
        best = max(_expected_f1(np.array(s, dtype=bool), p)
                   for s in itertools.product([0, 1], repeat=5) if any(s))
        assert pred.any() and np.isclose(_expected_f1(pred, p), best)  # no non-empty set does better


def test_confident_items_get_their_confident_labels():
    probs = np.array([[0.99, 0.98, 0.01, 0.02], [0.4, 0.05, 0.03, 0.01], [0.6, 0.55, 0.5, 0.02]])
    assert decide_expected_f1(probs).tolist() == [[True, True, False, False],
                                                  [True, False, False, False],
                                                  [True, True, True, False]]


def test_gfm_is_a_decision_rule_that_tunes_nothing():
    from mmtag.decision import Scores, decide, tune_decisions

    rng = np.random.default_rng(2)
    probs = rng.random((30, 4))
    rule = tune_decisions("gfm", Scores(probs=probs, branches={"image": probs, "text": probs},
                                        union=True), (rng.random((30, 4)) > 0.5).astype(np.float32))
    assert rule.mode == "gfm" and not rule.branches
    assert np.array_equal(decide(Scores(probs=probs), rule), decide_expected_f1(probs))
    assert np.array_equal(decide(probs, rule), decide_expected_f1(probs))


def test_a_run_with_the_gfm_decision_saves_loads_and_predicts(tiny, cache_dir, tmp_path, capsys):
    from mmtag import api, cli

    run = tmp_path / "gfm"
    assert cli.main(["-q", "train", str(tiny.train_csv), "--modalities", "text", "--decision", "gfm",
                     "--epochs", "3", "--hidden", "32", "--cache-dir", cache_dir, "--out", str(run)]) == 0
    tagger = api.Tagger.load(run)
    assert tagger.thresholds.mode == "gfm"
    data, _ = api.read_dataset(tiny.holdout_csv, None, labelled=True)
    preds = tagger.predict_proba_dataset(data, progress=False)
    assert np.array_equal(preds.mask, decide_expected_f1(preds.probs))
    capsys.readouterr()
    assert cli.main(["train", str(tiny.train_csv), "--decision", "gfm", "--thresholds", "global",
                     "--out", str(tmp_path / "x")]) == 2
    assert "name two decision rules" in capsys.readouterr().err
