"""The expected-F1 decision against brute force: every outcome of every label set enumerated."""
import itertools

import numpy as np
import pytest

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


# --- Issue 29: thousands of labels. With more labels than FIRST_SET_SIZES only the top sets are
# scored, the rest entering through their count, and a set size is kept only when no larger
# set can beat it: the decisions must be those of scoring every k (`expected_f1_by_k`).
def _textbook_decision(probs: np.ndarray) -> np.ndarray:
    best_k = expected_f1_by_k(probs).argmax(axis=1) + 1
    order = np.argsort(-probs, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(probs.shape[1])[None, :].repeat(len(probs), 0), axis=1)
    return rank < best_k[:, None]


def _many_labels(seed: int, n: int, c: int) -> np.ndarray:
    """Rows of three kinds: a few confident labels and a long low tail; flat and unsure (their
    best sets are large); probabilities rounded to two decimals (ties)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(-6, 2, (n, c))
    logits[:, :4] += rng.normal(7, 2, (n, 4))
    logits[n // 3: 2 * n // 3] = rng.normal(-0.5, 0.6, (2 * n // 3 - n // 3, c))
    probs = 1 / (1 + np.exp(-logits))
    probs[2 * n // 3:] = np.round(probs[2 * n // 3:], 2)
    return probs[:, rng.permutation(c)].astype(np.float32)


@pytest.mark.parametrize("c", [18, 32, 33, 70, 140])
def test_many_labels_get_the_decision_of_scoring_every_set_size(c):
    probs = _many_labels(c, 45, c)
    assert np.array_equal(decide_expected_f1(probs), _textbook_decision(probs))


def test_with_few_labels_the_decision_is_the_textbook_one_to_the_last_bit():
    probs = np.random.default_rng(4).random((60, 18))
    from mmtag.decision.expected_f1 import best_set_sizes

    assert np.array_equal(best_set_sizes(probs), expected_f1_by_k(probs).argmax(axis=1) + 1)


def test_the_count_of_many_small_probabilities_is_exact():
    from mmtag.decision.expected_f1 import count_distribution

    rng = np.random.default_rng(5)
    for scale in (1e-6, 1e-3, 0.05):  # power sums (all small) ...
        p = rng.random((20, 2500)) * scale * 2 * rng.random((20, 1))
        dist = count_distribution(p)
        assert np.allclose(dist, poisson_binomial(p)[:, :dist.shape[1]], rtol=0, atol=1e-13)
        assert (1 - dist.sum(axis=1)).max() <= 1e-12  # the width cut drops no mass that counts
    p[:, 0] = 0.9  # ... and one large probability: the direct convolution
    dist = count_distribution(p)
    assert np.allclose(dist, poisson_binomial(p)[:, :dist.shape[1]], rtol=0, atol=1e-13)


def test_ten_thousand_labels_are_decided_in_bounded_time_and_memory():
    rng = np.random.default_rng(6)
    n, c = 200, 10_000
    logits = rng.normal(-9, 2, (n, c))
    logits[np.arange(n)[:, None], rng.integers(0, c, (n, 3))] += 11
    probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
    pred = decide_expected_f1(probs)
    assert pred.any(axis=1).all()
    # each row's set is its top k
    for row, chosen in zip(probs, pred):
        assert row[chosen].min() >= row[~chosen].max()
