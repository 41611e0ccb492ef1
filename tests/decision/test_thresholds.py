import numpy as np
import pytest

from mmtag.errors import MmtagError
from mmtag.decision.metrics import compute, samples_f1
from mmtag.decision.thresholds import FEW_VALIDATION_ROWS, GRID, Scores, Thresholds, decide, tune, tune_global


def test_decide_applies_threshold_per_class():
    probs = np.array([[0.9, 0.6, 0.1], [0.2, 0.7, 0.8]])
    out = decide(probs, Thresholds("per-class", np.array([0.5, 0.65, 0.5])))
    assert out.tolist() == [[True, False, False], [False, True, True]]


def test_decide_top1_fallback_never_empty():
    probs = np.array([[0.1, 0.3, 0.2], [0.05, 0.01, 0.04], [0.9, 0.1, 0.1]])
    out = decide(probs, 0.5)
    assert out.tolist() == [[False, True, False], [True, False, False], [True, False, False]]
    assert out.any(axis=1).all()


def test_top_k_keeps_the_best_scoring_of_the_chosen_labels():
    probs = np.array([[0.9, 0.6, 0.7, 0.8], [0.2, 0.1, 0.3, 0.6], [0.7, 0.7, 0.1, 0.95]])
    thr = Thresholds("per-class", np.array([0.5, 0.5, 0.5, 0.99]))  # column 3 is never chosen
    chosen = decide(probs, thr)
    assert chosen.tolist() == [[True, True, True, False], [False, False, False, True],
                               [True, True, False, False]]
    capped = decide(probs, thr, top_k=2)
    # row 0: 0.9 and 0.7 of the three chosen; row 1: the top-1 fallback, untouched; row 2: the
    # 0.95 of column 3 was not chosen, so it is not added: a cap, never an addition; the tie
    # (0.7, 0.7) keeps both since two fit
    assert capped.tolist() == [[True, False, True, False], [False, False, False, True],
                               [True, True, False, False]]
    assert decide(probs, thr, top_k=1).tolist() == [[True, False, False, False],
                                                    [False, False, False, True],
                                                    [True, False, False, False]]  # tie: lower column
    assert np.array_equal(decide(probs, thr, top_k=4), decide(probs, thr))
    assert (decide(probs, thr, top_k=2) <= decide(probs, thr)).all()


def test_top_k_caps_union_and_expected_f1_decisions_too():
    a = np.array([[0.9, 0.8, 0.1]])
    b = np.array([[0.1, 0.2, 0.9]])
    scores = Scores(probs=np.array([[0.6, 0.3, 0.7]]), branches={"image": a, "text": b}, union=True)
    thr = Thresholds("union/global", np.full(3, 0.5), branches={"image": np.full(3, 0.5),
                                                                  "text": np.full(3, 0.5)})
    assert decide(scores, thr).sum() == 3
    assert decide(scores, thr, top_k=2).tolist() == [[True, False, True]]  # by fused score
    gfm = Thresholds("gfm", np.full(3, 0.5))
    many = np.array([[0.95, 0.9, 0.85]])
    assert decide(many, gfm).sum() == 3 and decide(many, gfm, top_k=1).tolist() == [[True, False, False]]


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "2"])
def test_top_k_must_be_a_positive_integer(k):
    with pytest.raises(MmtagError, match="top_k must be an integer >= 1"):
        decide(np.array([[0.9, 0.1]]), 0.5, top_k=k)


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


def _two_scale_case() -> tuple[np.ndarray, np.ndarray]:
    """Class 0 positives ~0.8 / negatives ~0.6, class 1 positives ~0.3 / negatives ~0.1: no one
    threshold separates both classes, per-class thresholds do."""
    rng = np.random.default_rng(1)
    y = np.array([[1, 0], [0, 1], [1, 1]] * 30, dtype=float)
    jitter = 0.04 * rng.random(y.shape)
    probs = np.where(y == 1, [0.78, 0.28], [0.58, 0.08]) + jitter
    return probs, y


def _random_case(seed: int = 0, n: int = 150, c: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random((n, c)) < np.linspace(0.1, 0.5, c)
    logits = rng.normal(0, 1, (n, c)) + 2 * y - np.linspace(0, 2, c)
    return 1 / (1 + np.exp(-logits)), y.astype(float)


def test_tune_records_mode_and_dispatches():
    probs, y = _random_case()
    for mode in ("global", "per-class", "balanced"):
        t = tune(mode, probs, y)
        assert t.mode == mode and t.values.shape == (probs.shape[1],)
    assert np.array_equal(tune("global", probs, y).values, tune_global(probs, y).values)


def test_tune_unknown_mode_lists_modes():
    probs, y = _random_case()
    with pytest.raises(MmtagError, match="global, per-class, balanced"):
        tune("median", probs, y)


def test_per_class_separates_classes_global_cannot():
    probs, y = _two_scale_case()
    f1_global = samples_f1(y, decide(probs, tune("global", probs, y)))
    per_class = tune("per-class", probs, y)
    assert f1_global < 1.0
    assert samples_f1(y, decide(probs, per_class)) == 1.0
    for c in range(2):  # each threshold lies between its class's top negative and lowest positive
        assert probs[y[:, c] == 0, c].max() < per_class.values[c] <= probs[y[:, c] == 1, c].min()


def test_per_class_never_worse_than_global_and_coordinatewise_optimal():
    probs, y = _random_case()
    per_class = tune("per-class", probs, y)
    best = samples_f1(y, decide(probs, per_class))
    assert best >= samples_f1(y, decide(probs, tune_global(probs, y)))
    # no single class's threshold can be moved on the grid to score better
    for c in range(probs.shape[1]):
        for g in GRID:
            values = per_class.values.copy()
            values[c] = g
            assert samples_f1(y, decide(probs, values)) <= best + 1e-12


def test_balanced_equalises_false_positives_and_negatives():
    # class 0: one negative (0.45) above one positive (0.35): FP = FN = 1 for t in (0.35, 0.45]
    # class 1: separable, FP = FN = 0 for t in (0.12, 0.25]; ties go to the value nearest 0.5
    probs = np.array([[0.90, 0.30], [0.80, 0.25], [0.70, 0.05], [0.35, 0.10],
                      [0.10, 0.12], [0.20, 0.05], [0.45, 0.10], [0.30, 0.05]])
    y = np.array([[1, 1], [1, 1], [1, 0], [1, 0], [0, 0], [0, 0], [0, 0], [0, 0]], dtype=float)
    t = tune("balanced", probs, y)
    assert t.values.tolist() == pytest.approx([0.45, 0.25])
    pred = probs >= t.values
    fp = (pred & (y == 0)).sum(axis=0)
    fn = (~pred & (y == 1)).sum(axis=0)
    assert fp.tolist() == fn.tolist() == [1, 0]


def test_balanced_minimises_error_imbalance_over_grid():
    probs, y = _random_case(seed=3)
    t = tune("balanced", probs, y)
    truth = y.astype(bool)

    def gap(c: int, value: float) -> int:
        pred = probs[:, c] >= np.float32(value)
        return abs(int((pred & ~truth[:, c]).sum()) - int((~pred & truth[:, c]).sum()))

    for c in range(probs.shape[1]):
        assert gap(c, t.values[c]) == min(gap(c, g) for g in GRID)


def test_every_mode_keeps_top1_fallback():
    probs, y = _random_case(seed=5)
    probs[:20] *= 0.05  # rows with every score far below any threshold
    for mode in ("global", "per-class", "balanced"):
        pred = decide(probs, tune(mode, probs, y))
        assert pred.any(axis=1).all()
        assert (pred[:20].sum(axis=1) == 1).all()
        assert pred[np.arange(20), probs[:20].argmax(axis=1)].all()


def test_union_decision_is_the_union_of_branch_sets():
    from mmtag.decision.thresholds import Scores

    img = np.array([[0.9, 0.1, 0.2], [0.2, 0.3, 0.1]])
    txt = np.array([[0.1, 0.1, 0.7], [0.1, 0.2, 0.3]])
    scores = Scores(probs=np.maximum(img, txt), branches={"image": img, "text": txt}, union=True)
    thr = Thresholds("union/global", np.full(3, 0.8),
                     branches={"image": np.full(3, 0.8, np.float32), "text": np.full(3, 0.6, np.float32)})
    out = decide(scores, thr)
    # CV says label 0, text says label 2 → {0, 2}; row 2 has nothing above → top-1 of the max scores
    assert out.tolist() == [[True, False, True], [False, True, False]]
    back = Thresholds.from_dict(thr.to_dict())
    assert np.array_equal(decide(scores, back), out)


def test_tune_decisions_union_learns_per_branch_thresholds():
    from mmtag.decision.thresholds import Scores, tune_decisions

    rng = np.random.default_rng(0)
    y = np.zeros((120, 2))
    y[:60, 0] = 1
    y[40:, 1] = 1
    # the image branch sees class 0 (scores ~0.9 vs ~0.4), the text branch class 1 (~0.35 vs ~0.1)
    img = np.stack([np.where(y[:, 0] > 0, 0.9, 0.4), np.full(120, 0.05)], 1) + 0.02 * rng.random((120, 2))
    txt = np.stack([np.full(120, 0.05), np.where(y[:, 1] > 0, 0.35, 0.1)], 1) + 0.02 * rng.random((120, 2))
    scores = Scores(np.maximum(img, txt), {"image": img, "text": txt}, union=True)
    thr = tune_decisions("global", scores, y)
    assert thr.mode == "union/global" and set(thr.branches) == {"image", "text"}
    assert 0.42 < thr.branches["image"][0] <= 0.9 and 0.12 < thr.branches["text"][0] <= 0.35
    assert (decide(scores, thr) == y.astype(bool)).all()
    # a single global threshold on the max scores cannot do this
    assert not (decide(scores.probs, tune_global(scores.probs, y)) == y.astype(bool)).all()


# --- Fuzzing the decision logic (hypothesis, seeded): any scores, any thresholds.
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402


_unit = st.floats(0.0, 1.0, allow_nan=False, width=32)


@st.composite
def _scores_and_thresholds(draw):
    n, c = draw(st.integers(1, 12)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    probs = draw(arrays(dtype, (n, c), elements=_unit))
    t = draw(st.one_of(_unit, arrays(np.float32, (c,), elements=_unit)))
    return probs, t


@settings(max_examples=300, derandomize=True, deadline=None)
@given(_scores_and_thresholds())
def test_fuzz_decide_thresholds_then_top1(case) -> None:
    probs, t = case
    before = probs.copy()
    out = decide(probs, t)
    passed = probs >= np.asarray(t, dtype=probs.dtype)
    assert out.dtype == bool and out.shape == probs.shape
    assert np.array_equal(probs, before)  # inputs are never modified
    assert out.any(axis=1).all()  # every item gets a label
    assert (out >= passed).all()  # everything above threshold is kept
    for row in np.flatnonzero(~passed.any(axis=1)):  # and only empty rows get their top-1
        assert out[row].sum() == 1 and probs[row, out[row]].max() == probs[row].max()
    assert np.array_equal(out[passed.any(axis=1)], passed[passed.any(axis=1)])


@settings(max_examples=150, derandomize=True, deadline=None)
@given(_scores_and_thresholds(), _scores_and_thresholds())
def test_fuzz_union_is_the_union_of_branch_sets(a, b) -> None:
    (pi, ti), (pt, tt) = a, b
    n, c = min(len(pi), len(pt)), min(pi.shape[1], pt.shape[1])
    pi, pt = pi[:n, :c].astype(np.float32), pt[:n, :c].astype(np.float32)
    ti, tt = (np.full(c, t, np.float32) if np.ndim(t) == 0 else np.asarray(t, np.float32)[:c]
              for t in (ti, tt))
    fused = (pi + pt) / 2
    thr = Thresholds("global", np.full(c, 0.5, np.float32), branches={"image": ti, "text": tt})
    out = decide(Scores(probs=fused, branches={"image": pi, "text": pt}, union=True), thr)
    union = (pi >= ti) | (pt >= tt)
    assert out.any(axis=1).all() and (out >= union).all()
    assert np.array_equal(out[union.any(axis=1)], union[union.any(axis=1)])


@settings(max_examples=60, derandomize=True, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["global", "per-class", "balanced"]))
def test_fuzz_tuning_gives_valid_thresholds(seed: int, mode: str) -> None:
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(2, 40)), int(rng.integers(1, 6))
    y = rng.random((n, c)) < rng.random(c)
    y[np.arange(n), rng.integers(0, c, n)] = True  # every item has a label, as in the task
    probs = np.clip(y * rng.random() + rng.normal(0, rng.random(), (n, c)), 0, 1).astype(np.float32)
    t = tune(mode, probs, y.astype(float))
    assert t.mode == mode and t.values.shape == (c,) and np.isfinite(t.values).all()
    assert ((t.values >= GRID.min()) & (t.values <= GRID.max())).all()
    f1 = samples_f1(y.astype(float), decide(probs, t))
    assert 0.0 <= f1 <= 1.0
    if mode == "per-class":  # coordinate ascent starts from the global optimum
        assert f1 >= samples_f1(y.astype(float), decide(probs, tune("global", probs, y.astype(float)))) - 1e-9


# --- auto: the rule chosen on validation rows it was not tuned on
def _calibrated_case(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from the probabilities themselves (calibrated), each row's probabilities on
    its own scale: the case the expected-F1 rule is exact for and one threshold is not."""
    rng = np.random.default_rng(seed)
    scale = rng.choice([0.15, 0.9], size=(n, 1))
    probs = (scale * rng.beta(0.5, 0.5, (n, 6))).astype(np.float32)
    return probs, (rng.random((n, 6)) < probs).astype(float)


def test_auto_picks_expected_f1_where_it_wins_and_records_why():
    from mmtag.decision.thresholds import AUTO_CANDIDATES, tune_decisions

    probs, y = _calibrated_case(4000)
    t = tune("auto", probs, y)
    assert t.mode == "gfm" and set(t.chosen_from) == set(AUTO_CANDIDATES)
    assert t.chosen_from["gfm"] > t.chosen_from["global"]
    back = Thresholds.from_dict(t.to_dict())
    assert back.mode == "gfm" and back.chosen_from == pytest.approx(t.chosen_from, abs=1e-6)
    assert np.array_equal(decide(probs, back), decide(probs, tune("gfm", probs, y)))
    assert tune_decisions("auto", Scores(probs=probs), y).mode == "gfm"


def test_auto_keeps_global_unless_another_rule_clearly_wins():
    # one threshold separates the classes exactly, and the scores are far from calibrated
    # (negatives at 0.45): the expected-F1 rule would add many of them
    rng = np.random.default_rng(1)
    y = (rng.random((1500, 4)) < 0.4).astype(float)
    y[np.arange(1500), rng.integers(0, 4, 1500)] = 1  # every item has a label, as in the task
    probs = (np.where(y > 0, 0.6, 0.45) + 0.01 * rng.random(y.shape)).astype(np.float32)
    t = tune("auto", probs, y)
    assert t.mode == "global" and t.chosen_from["gfm"] < t.chosen_from["global"]
    assert samples_f1(y, decide(probs, t)) == pytest.approx(
        samples_f1(y, decide(probs, tune_global(probs, y))))
    # too few rows to tell close rules apart: the plain rule, with no evidence to record, even
    # where another rule would win on more rows
    for few_probs, few_y in ((probs[:6], y[:6]), _calibrated_case(FEW_VALIDATION_ROWS - 1)):
        few = tune("auto", few_probs, few_y)
        assert few.mode == "global" and few.chosen_from == {}


def test_auto_on_a_union_head_searches_the_branch_thresholds_jointly():
    from mmtag.decision.thresholds import tune_decisions

    probs, y = _calibrated_case(FEW_VALIDATION_ROWS, seed=3)
    scores = Scores(probs, {"image": probs * 0.9, "text": probs}, union=True)
    assert tune_decisions("auto", scores, y).mode == "union/global"


def test_a_run_with_the_auto_decision_says_what_it_chose_and_keeps_it(tiny, cache_dir, tmp_path,
                                                                     capsys, monkeypatch):
    import json

    from mmtag import api, cli
    from mmtag.decision import thresholds

    # the tiny data's validation rows are few; let auto choose on them all the same
    monkeypatch.setattr(thresholds, "FEW_VALIDATION_ROWS", 10)
    run = tmp_path / "auto"
    assert cli.main(["train", str(tiny.train_csv), "--modalities", "text", "--decision", "auto",
                     "--epochs", "3", "--hidden", "32", "--cache-dir", cache_dir, "--out", str(run)]) == 0
    saved = json.loads((run / "thresholds.json").read_text())
    assert saved["mode"] in ("global", "per-class", "gfm") and set(saved["chosen_from"]) == {
        "global", "per-class", "gfm"}
    out = capsys.readouterr().out
    assert f"decision: {saved['mode']}, chosen by --decision auto" in out
    assert api.Tagger.load(run).thresholds.mode == saved["mode"]


# --- Issue 29: every rule linear in rows × labels, with the textbook rules' very choices.
# The textbook forms below (one decision matrix per candidate, each class in turn) are the
# references the vectorised rules must reproduce exactly.
def _best_near_half(grid: np.ndarray, scores: np.ndarray, *, maximise: bool = True) -> float:
    best = scores.max() if maximise else scores.min()
    candidates = grid[np.isclose(scores, best, rtol=0, atol=1e-12)]
    return float(candidates[np.argmin(np.abs(candidates - 0.5))])


def _textbook_per_class(probs: np.ndarray, y: np.ndarray, max_sweeps: int = 10) -> np.ndarray:
    grid = GRID.astype(np.float32)
    values = tune_global(probs, y, grid).values.copy()
    truth = y.astype(bool)
    hits = truth[np.arange(len(y)), probs.argmax(axis=1)]
    current = samples_f1(y, decide(probs, values))
    for _ in range(max_sweeps):
        improved = False
        for c in range(probs.shape[1]):
            pred = probs >= values.astype(probs.dtype)
            others = np.arange(probs.shape[1]) != c
            tp_other = (truth[:, others] & pred[:, others]).sum(axis=1)
            n_other = pred[:, others].sum(axis=1)
            col = probs[:, c][None, :] >= grid.astype(probs.dtype)[:, None]
            n_pred = n_other[None, :] + col
            tp = tp_other[None, :] + (col & truth[None, :, c])
            empty = n_pred == 0
            curve = (2.0 * np.where(empty, hits[None, :], tp)
                     / (truth.sum(axis=1)[None, :] + np.where(empty, 1, n_pred))).mean(axis=1)
            if curve.max() > current + 1e-12:
                values[c] = _best_near_half(grid, curve)
                current = float(curve.max())
                improved = True
        if not improved:
            break
    return values


def _textbook_balanced(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    truth, grid = y.astype(bool), GRID.astype(np.float32)
    values = np.empty(probs.shape[1], dtype=np.float32)
    for c in range(probs.shape[1]):
        pred = probs[:, c][None, :] >= grid.astype(probs.dtype)[:, None]
        fp = (pred & ~truth[None, :, c]).sum(axis=1)
        fn = (~pred & truth[None, :, c]).sum(axis=1)
        values[c] = _best_near_half(grid, np.abs(fp - fn).astype(float), maximise=False)
    return values


def _textbook_union_pair(scores: Scores, y: np.ndarray, grid_a: np.ndarray,
                         grid_b: np.ndarray) -> tuple[float, float]:
    a, b = scores.branches["image"], scores.branches["text"]
    best, best_pair = -1.0, (0.5, 0.5)
    for ta in grid_a:
        for tb in grid_b:
            f1 = samples_f1(y, _fallback((a >= ta) | (b >= tb), scores.probs))
            closer = abs(ta - 0.5) + abs(tb - 0.5) < abs(best_pair[0] - 0.5) + abs(best_pair[1] - 0.5)
            if f1 > best + 1e-12 or (abs(f1 - best) <= 1e-12 and closer):
                best, best_pair = f1, (float(ta), float(tb))
    return best_pair


def _fallback(pred: np.ndarray, probs: np.ndarray) -> np.ndarray:
    empty = ~pred.any(axis=1)
    pred[np.flatnonzero(empty), probs[empty].argmax(axis=1)] = True
    return pred


def _scale_case(seed: int, n: int, c: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Scores of a trained-looking model: true labels mostly high, the rest mostly low; every
    third case rounded to two decimals, so scores sit on grid values and curves tie."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < rng.uniform(0.05, 0.4)).astype(float)
    logits = rng.normal(-1.5, 1.5, (n, c)) + y * rng.normal(2.5, 1.5, (n, c))
    probs = (1 / (1 + np.exp(-logits))).astype(dtype)
    return (np.round(probs, 2).astype(dtype) if seed % 3 == 0 else probs), y


@pytest.mark.parametrize("seed", range(12))
def test_the_global_curve_is_the_sample_f1_of_each_threshold_to_the_last_bit(seed):
    from mmtag.decision import f1_by_threshold

    probs, y = _scale_case(seed, n=[5, 60, 300][seed % 3], c=[2, 7, 18, 40][seed % 4],
                           dtype=[np.float32, np.float64][seed % 2])
    probs[:3] *= 0.02  # rows that fall back on their top-1 label
    assert np.array_equal(f1_by_threshold(probs, y),
                          np.array([samples_f1(y, decide(probs, t)) for t in GRID]))


@pytest.mark.parametrize("seed", range(16))
def test_per_class_and_balanced_choose_what_the_textbook_loops_choose(seed):
    probs, y = _scale_case(seed, n=[8, 50, 200, 600][seed % 4], c=[2, 5, 18, 30][(seed // 4) % 4],
                           dtype=[np.float32, np.float64][seed % 2])
    assert np.array_equal(tune("per-class", probs, y).values, _textbook_per_class(probs, y))
    assert np.array_equal(tune("per-class", probs, y).values,
                          tune("per-class", probs, y).values)  # and deterministic
    assert np.array_equal(tune("balanced", probs, y).values, _textbook_balanced(probs, y))


@pytest.mark.parametrize("seed", range(6))
def test_the_union_pair_search_chooses_what_the_textbook_loop_chooses(seed):
    from mmtag.decision.thresholds import tune_decisions

    probs, y = _scale_case(seed, n=[30, 200][seed % 2], c=[3, 18, 25][seed % 3],
                           dtype=[np.float32, np.float64][seed % 2])
    rng = np.random.default_rng(seed)
    image = np.clip(probs + rng.normal(0, 0.2, probs.shape), 0, 1).astype(probs.dtype)
    scores = Scores(probs=(probs + image) / 2, branches={"image": image, "text": probs}, union=True)
    coarse = np.round(np.arange(0.1, 0.951, 0.05), 2)
    for ranges, grid_a, grid_b in ((None, coarse, coarse),
                                   ({"image": (0.8, 0.8), "text": (0.3, 0.6)}, np.array([0.8]),
                                    coarse[(coarse >= 0.3 - 1e-9) & (coarse <= 0.6 + 1e-9)])):
        got = tune_decisions("global", scores, y, ranges)
        want = _textbook_union_pair(scores, y, grid_a, grid_b)
        assert (float(got.branches["image"][0]), float(got.branches["text"][0])) == pytest.approx(want)


def _rare_labels(n: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Thousands of labels, most of them rare: each row 1-5 labels of Zipf-like frequency,
    scored high when true more often than not, the rest low (a rare label's lower)."""
    rng = np.random.default_rng(seed)
    weight = 1.0 / np.arange(1, c + 1)
    y = np.zeros((n, c))
    for i in range(n):
        y[i, rng.choice(c, size=int(rng.integers(1, 6)), replace=False, p=weight / weight.sum())] = 1
    logits = rng.normal(-5.0 - np.log1p(np.arange(c)) / 2, 1.5, (n, c)) + y * rng.normal(6, 2, (n, c))
    return (1 / (1 + np.exp(-logits))).astype(np.float32), y


def test_thousands_of_labels_are_tuned_per_class_to_a_coordinatewise_optimum():
    probs, y = _rare_labels(300, 3000)
    per_class = tune("per-class", probs, y)
    best = samples_f1(y, decide(probs, per_class))
    assert best >= samples_f1(y, decide(probs, tune_global(probs, y)))
    # no single class's threshold moves on the grid to score better (checked for the classes
    # the tuning could move: those with a score between the grid's ends)
    movable = np.flatnonzero(((probs >= GRID[0]) & (probs < GRID[-1])).any(axis=0))
    for c in np.random.default_rng(0).choice(movable, 4, replace=False):
        values = np.repeat(per_class.values[None, :], len(GRID), axis=0)
        values[:, c] = GRID.astype(np.float32)
        assert max(samples_f1(y, decide(probs, v)) for v in values) <= best + 1e-12
    assert tune("balanced", probs, y).values.shape == (3000,)


def test_auto_skips_what_it_cannot_afford_and_says_so(monkeypatch, caplog):
    import logging

    from mmtag.decision import reporting, thresholds

    probs, y = _rare_labels(FEW_VALIDATION_ROWS, 400)
    work = {rule: thresholds.auto_work(rule, probs) for rule in ("per-class", "gfm")}
    monkeypatch.setattr(thresholds, "AUTO_BUDGET", min(work.values()) / 2)
    with caplog.at_level(logging.INFO, logger="mmtag.progress"):
        with reporting("auto over 400 labels", show=True):
            t = tune("auto", probs, y)
            tune("auto", probs, y)  # said once per step, not once per call
    assert t.mode == "global" and set(t.chosen_from) == {"global"}
    assert set(t.skipped) == {"per-class", "gfm"}
    assert f"{work['gfm']:.2g}" in t.skipped["gfm"] and "400 labels" in t.skipped["gfm"]
    said = [r.getMessage() for r in caplog.records if r.name == "mmtag.progress"]
    skips = [m for m in said if "auto skips" in m]
    assert len(skips) == 2 and all(m.startswith("deciding: auto over 400 labels: auto skips ")
                                   for m in skips)
    assert said[-1].startswith("deciding: auto over 400 labels: done, elapsed ")
    back = Thresholds.from_dict(t.to_dict())
    assert back.skipped == t.skipped and t.to_dict()["skipped"] == t.skipped
    # between the two estimates: the cheaper one is tried
    monkeypatch.setattr(thresholds, "AUTO_BUDGET", (min(work.values()) + max(work.values())) / 2)
    assert set(tune("auto", probs, y).skipped) == {max(work, key=work.get)}


def test_the_default_labels_stay_far_inside_auto_s_budget():
    from mmtag.decision import thresholds

    # the project's real data: 18 labels, up to 30,000 rows, a model no better than chance
    rng = np.random.default_rng(0)
    probs = rng.random((30_000, 18)).astype(np.float32)
    for rule in ("per-class", "gfm"):
        assert thresholds.auto_work(rule, probs) < thresholds.AUTO_BUDGET / 2


def test_slow_decision_steps_say_how_they_progress(monkeypatch, caplog):
    import logging

    from mmtag.decision import report_part, reporting, thresholds

    probs, y = _rare_labels(FEW_VALIDATION_ROWS, 50)
    with caplog.at_level(logging.INFO, logger="mmtag.progress"):
        tune("auto", probs, y)  # outside `reporting`: silent
        with reporting("auto over 50 labels", show=True):
            tune("auto", probs, y)  # quicker than PROGRESS_SECONDS: nothing to say
        monkeypatch.setattr(thresholds, "PROGRESS_SECONDS", 0.0)
        with reporting("auto over 50 labels", show=True):
            report_part("fold 2/5's rule")
            tune("auto", probs, y)
    said = [r.getMessage() for r in caplog.records if r.name == "mmtag.progress"]
    assert said[0].startswith("deciding: auto over 50 labels (fold 2/5's rule): auto: global 1/5 held parts")
    assert any("per-class: sweep 1" in m for m in said) and any("auto: gfm 5/5" in m for m in said)
    assert said[-1].startswith("deciding: auto over 50 labels: done, elapsed ")


# --- `--metric micro|macro`: every rule tunes for the metric asked for (sample-F1 by default)
def _figure(metric: str, y: np.ndarray, pred: np.ndarray) -> float:
    """scikit-learn's figure of `metric` for these decisions (through `compute`)."""
    c = y.shape[1]
    return compute(y, pred, tuple(range(c)), tuple(map(str, range(c)))).figure(metric)


@pytest.mark.parametrize("seed", range(8))
def test_the_micro_and_macro_global_curves_are_each_threshold_s_figure_to_the_last_bit(seed):
    from mmtag.decision import f1_by_threshold

    probs, y = _scale_case(seed, n=[5, 60, 200][seed % 3], c=[1, 7, 18, 40][seed % 4],
                           dtype=[np.float32, np.float64][seed % 2])
    probs[:3] *= 0.02  # rows that fall back on their top-1 label
    for metric in ("micro", "macro"):
        curve = f1_by_threshold(probs, y, metric=metric)
        assert np.array_equal(curve, np.array([_figure(metric, y, decide(probs, t)) for t in GRID]))
        best = tune_global(probs, y, metric=metric)
        assert best.metric == metric and best.values[0] == np.float32(_best_near_half(GRID, curve))


@pytest.mark.parametrize("seed", range(4))
def test_the_micro_and_macro_union_pair_figures_are_each_pair_s_to_the_last_bit(seed):
    from mmtag.decision.metrics import macro_f1, micro_f1
    from mmtag.decision.thresholds import tune_decisions, union_metric

    probs, y = _scale_case(seed, n=[30, 120][seed % 2], c=[3, 9][seed // 2],
                           dtype=[np.float32, np.float64][seed % 2])
    rng = np.random.default_rng(seed)
    image = np.clip(probs + rng.normal(0, 0.2, probs.shape), 0, 1).astype(probs.dtype)
    image[:2] *= 0.05  # rows that fall back on their top-1 label
    probs[:2] *= 0.05
    scores = Scores(probs=(probs + image) / 2, branches={"image": image, "text": probs}, union=True)
    coarse = np.round(np.arange(0.1, 0.951, 0.05), 2)
    c = y.shape[1]
    for metric, score in (("micro", micro_f1), ("macro", macro_f1)):
        got = union_metric(image, probs, coarse, coarse, y, scores.probs, metric=metric)
        want = np.array([[score(y, decide(scores, Thresholds("union/global", np.full(c, ta, np.float32), {
            "image": np.full(c, ta, np.float32), "text": np.full(c, tb, np.float32)})))
            for tb in coarse] for ta in coarse])
        assert np.array_equal(got, want)
        for i, j in ((0, 0), (5, 12), (17, 17)):  # and those are scikit-learn's figures
            pred = _fallback((image >= np.float32(coarse[i])) | (probs >= np.float32(coarse[j])),
                             scores.probs)
            assert got[i, j] == _figure(metric, y, pred)
        # the joint search keeps the best pair, ties to the pair nearest (0.5, 0.5)
        tuned = tune_decisions("global", scores, y, metric=metric)
        pair = (float(tuned.branches["image"][0]), float(tuned.branches["text"][0]))
        assert tuned.metric == metric and want[list(coarse).index(round(pair[0], 2)),
                                               list(coarse).index(round(pair[1], 2))] == want.max()


def _rare_needs_low(n: int = 1200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three common labels scored high when true (0.55-1, negatives 0.1-0.6), and three rare
    ones whose positives score low (0.12-0.3) but mostly above their negatives (0-0.15): a
    threshold low enough for the rare labels floods the common ones with false positives, one
    high enough for the common labels misses every rare one, so macro-F1 wants each label's own."""
    rng = np.random.default_rng(seed)
    c = 6
    y = np.zeros((n, c))
    y[:, :3] = rng.random((n, 3)) < 0.5
    for k in range(3, c):
        y[:, k] = rng.random(n) < 0.03
    y[y.sum(axis=1) == 0, 0] = 1
    probs = rng.uniform(0.0, 0.1, (n, c))
    for k in range(3):
        probs[:, k] = np.where(y[:, k] > 0, rng.uniform(0.55, 1.0, n), rng.uniform(0.1, 0.6, n))
    for k in range(3, c):
        probs[:, k] = np.where(y[:, k] > 0, rng.uniform(0.12, 0.3, n), rng.uniform(0.0, 0.15, n))
    return probs.astype(np.float32), y


def test_per_class_for_macro_chooses_each_class_s_own_best_and_beats_global():
    from mmtag.decision.metrics import macro_f1

    probs, y = _rare_needs_low()
    glob = tune("global", probs, y, metric="macro")
    per_class = tune("per-class", probs, y, metric="macro")
    assert per_class.mode == "per-class" and per_class.metric == "macro"
    assert per_class.values[3:].max() < 0.4 < per_class.values[:3].min()  # the rare labels go low
    assert macro_f1(y, decide(probs, per_class)) > macro_f1(y, decide(probs, glob)) + 0.1
    # each class at its own F1-maximising grid value (fallback ignored), ties nearest 0.5
    truth = y.astype(bool)
    grid = GRID.astype(np.float32)
    for k in range(y.shape[1]):
        pred = probs[:, k][None, :] >= grid[:, None]
        tp = (pred & truth[None, :, k]).sum(axis=1)
        f1 = 2.0 * tp / (truth[:, k].sum() + pred.sum(axis=1))
        assert per_class.values[k] == np.float32(_best_near_half(grid, f1))


@pytest.mark.parametrize("seed", range(10))
def test_per_class_for_macro_and_micro_is_never_worse_than_global_on_the_tuning_rows(seed):
    from mmtag.decision.metrics import macro_f1, micro_f1

    probs, y = _scale_case(seed, n=[8, 40, 200][seed % 3], c=[2, 5, 18][(seed // 3) % 3],
                           dtype=[np.float32, np.float64][seed % 2])
    probs[:2] *= 0.05
    for metric, score in (("micro", micro_f1), ("macro", macro_f1)):
        glob = decide(probs, tune("global", probs, y, metric=metric))
        per_class = decide(probs, tune("per-class", probs, y, metric=metric))
        assert score(y, per_class) >= score(y, glob)


def _textbook_micro_per_class(probs: np.ndarray, y: np.ndarray, max_sweeps: int = 10) -> np.ndarray:
    """Coordinate ascent on micro-F1 as written in a textbook: each class in turn tries every
    grid value on the full decision matrix (fallback included)."""
    from mmtag.decision.metrics import micro_f1

    grid = GRID.astype(np.float32)
    values = tune_global(probs, y, grid, metric="micro").values.copy()
    current = micro_f1(y, decide(probs, values))
    for _ in range(max_sweeps):
        moved = False
        for k in range(probs.shape[1]):
            curve = []
            for t in grid:
                trial = values.copy()
                trial[k] = t
                curve.append(micro_f1(y, decide(probs, trial)))
            curve = np.array(curve)
            if curve.max() > current + 1e-12:
                values[k] = _best_near_half(grid, curve)
                current = micro_f1(y, decide(probs, values))
                moved = True
        if not moved:
            break
    return values


@pytest.mark.parametrize("seed", range(6))
def test_per_class_for_micro_chooses_what_the_textbook_coordinate_ascent_chooses(seed):
    probs, y = _scale_case(seed, n=[8, 40, 120][seed % 3], c=[2, 5][seed % 2],
                           dtype=[np.float32, np.float64][seed % 2])
    probs[:2] *= 0.05  # rows whose only label may be the one moving: the fallback decides them
    got = tune("per-class", probs, y, metric="micro")
    assert got.metric == "micro" and np.array_equal(got.values, _textbook_micro_per_class(probs, y))


def test_the_default_metric_is_sample_f1_and_changes_nothing():
    from mmtag.decision.thresholds import tune_decisions

    probs, y = _scale_case(4, n=300, c=7)
    for mode in ("global", "per-class", "balanced", "gfm"):
        default, samples = tune(mode, probs, y), tune(mode, probs, y, metric="samples")
        assert np.array_equal(default.values, samples.values) and default.metric == "samples"
        assert "metric" not in default.to_dict()  # thresholds.json as it was
    assert np.array_equal(tune("per-class", probs, y).values, _textbook_per_class(probs, y))
    scores = Scores(probs, {"image": probs * 0.9, "text": probs}, union=True)
    assert tune_decisions("global", scores, y).to_dict() == \
        tune_decisions("global", scores, y, metric="samples").to_dict()
    # a record written before `--metric` was kept reads as sample-F1's; another round-trips
    assert Thresholds.from_dict({"mode": "global", "values": [0.5]}).metric == "samples"
    macro = tune("per-class", probs, y, metric="macro")
    assert macro.to_dict()["metric"] == "macro" and Thresholds.from_dict(macro.to_dict()).metric == "macro"


def test_a_plugin_rule_without_a_metric_still_tunes_and_an_unknown_metric_is_named(monkeypatch):
    from mmtag.decision import thresholds

    calls = []

    def mine(probs, y_true):  # written before `--metric`: takes no metric
        calls.append(1)
        return thresholds.Thresholds.constant(0.3, probs.shape[1])

    monkeypatch.setitem(thresholds.TUNERS, "mine", mine)
    probs, y = _scale_case(1, n=40, c=3)
    assert tune("mine", probs, y, metric="macro").metric == "macro" and calls == [1]
    with pytest.raises(MmtagError, match="unknown metric 'nope'; available: samples, micro, macro"):
        tune("per-class", probs, y, metric="nope")


def test_auto_for_macro_compares_the_rules_by_macro_f1_and_says_so(caplog):
    import logging

    from mmtag.decision.metrics import macro_f1
    from mmtag.decision.thresholds import AUTO_FOLDS

    probs, y = _rare_needs_low(FEW_VALIDATION_ROWS + 200)
    with caplog.at_level(logging.INFO, logger="mmtag.decision.thresholds"):
        t = tune("auto", probs, y, metric="macro")
    assert t.mode == "per-class" and t.metric == "macro"  # the rare labels need their own
    assert t.chosen_from["per-class"] > t.chosen_from["global"]
    # chosen_from holds each rule's mean held-part macro-F1 (the same seeded parts as auto's)
    n = len(y)
    parts = np.array_split(np.random.default_rng(0).permutation(n), AUTO_FOLDS)
    held = []
    for i, part in enumerate(parts):
        rest = np.concatenate(parts[:i] + parts[i + 1:])
        rule = tune("global", probs[rest], y[rest], metric="macro")
        held.append(macro_f1(y[part], decide(probs[part], rule)))
    assert t.chosen_from["global"] == pytest.approx(float(np.mean(held)), abs=1e-12)
    assert any("macro-F1 on held parts" in r.getMessage() for r in caplog.records)
    # by default the same candidates are compared by sample-F1
    assert tune("auto", probs, y).chosen_from["global"] != pytest.approx(t.chosen_from["global"])
    saved = Thresholds.from_dict(t.to_dict())
    assert saved.metric == "macro" and saved.mode == "per-class"
