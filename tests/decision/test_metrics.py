import numpy as np
import pytest
from sklearn.metrics import f1_score

from mmtag.decision.metrics import Metrics, compute, samples_f1


def test_hand_computed_values():
    # item 1: tp=1 fp=1 fn=0 → F1 2/3; item 2: tp=1, exact → 1; item 3: tp=0 → 0
    y = np.array([[1, 0, 0], [0, 1, 1], [1, 0, 0]])
    p = np.array([[1, 1, 0], [0, 1, 1], [0, 0, 1]])
    m = compute(y, p, (1, 2, 3), ("a", "b", "c"))
    assert m.samples_f1 == pytest.approx((2 / 3 + 1 + 0) / 3)
    # micro: tp=3, fp=2, fn=1 → 2*3/(2*3+2+1) = 6/9
    assert m.micro_f1 == pytest.approx(6 / 9)
    # per class: a: tp1 fn1 → p1 r.5 f 2/3; b: tp1 fp1 → p.5 r1 f 2/3; c: tp1 fp1 → 2/3
    assert [c.f1 for c in m.per_class] == pytest.approx([2 / 3, 2 / 3, 2 / 3])
    assert m.macro_f1 == pytest.approx(2 / 3)
    assert [c.support for c in m.per_class] == [2, 1, 1]
    assert m.per_class[0].precision == 1.0 and m.per_class[0].recall == 0.5


def test_numpy_samples_f1_matches_sklearn():
    rng = np.random.default_rng(3)
    y = rng.random((300, 7)) < 0.3
    p = rng.random((300, 7)) < 0.3
    ref = f1_score(y.astype(int), p.astype(int), average="samples", zero_division=0)
    assert samples_f1(y, p) == pytest.approx(ref)


def test_macro_ignores_classes_absent_and_never_predicted():
    y = np.array([[1, 0], [1, 0]])
    p = np.array([[1, 0], [1, 0]])
    assert compute(y, p, (1, 2), ("a", "b")).macro_f1 == 1.0


def test_table_and_round_trip():
    y = np.array([[1, 0], [0, 1]])
    m = compute(y, y, (1, 19), ("person", "horse"))
    text = m.table()
    assert "person" in text and "horse" in text and "samples F1" in text
    assert Metrics.from_dict(m.to_dict()) == m


@pytest.mark.parametrize("seed", range(8))
def test_the_metrics_are_scikit_learns_on_the_dense_matrices_to_the_last_bit(seed):
    # compute() hands scikit-learn sparse matrices (issue 29: a dense 2,000 × 10,000 matrix
    # cost it minutes); the figures must be those of the dense call
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    n, c = [(40, 2), (300, 18), (7, 30), (120, 1)][seed % 4]
    y = (rng.random((n, c)) < rng.uniform(0.05, 0.5)).astype(int)
    p = (rng.random((n, c)) < rng.uniform(0.05, 0.5)).astype(int)
    p[:, -1] = 0 if seed % 2 else p[:, -1]  # a class never predicted
    m = compute(y, p, tuple(range(c)), tuple(f"l{i}" for i in range(c)))
    yd, pd = (np.hstack([a, np.zeros_like(a)]) for a in (y, p)) if c == 1 else (y, p)
    pr, rc, f, s = precision_recall_fscore_support(yd, pd, average=None, zero_division=0,
                                                   labels=list(range(yd.shape[1])))
    assert [(k.precision, k.recall, k.f1, k.support) for k in m.per_class] == \
        list(zip(pr[:c].tolist(), rc[:c].tolist(), f[:c].tolist(), s[:c].tolist()))
    assert m.samples_f1 == f1_score(yd, pd, average="samples", zero_division=0)
    assert m.micro_f1 == f1_score(yd, pd, average="micro", zero_division=0)
    occurring = np.flatnonzero(yd.any(0) | pd.any(0)).tolist()
    assert m.macro_f1 == f1_score(yd, pd, average="macro", zero_division=0, labels=occurring)


def test_ten_thousand_labels_are_scored_quickly():
    import time

    rng = np.random.default_rng(0)
    y = rng.random((2000, 10_000)) < 7e-4
    t0 = time.perf_counter()
    m = compute(y, y, tuple(range(10_000)), tuple(map(str, range(10_000))))
    assert m.samples_f1 == 1.0 and len(m.per_class) == 10_000
    assert time.perf_counter() - t0 < 60  # the dense call took minutes


# --- `--metric`: the figures the decision rules, early stopping and rankings optimise
@pytest.mark.parametrize("seed", range(30))
def test_numpy_micro_and_macro_f1_are_sklearn_s_to_the_last_bit(seed):
    from mmtag.decision.metrics import macro_f1, micro_f1

    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 60)), int(rng.integers(1, 9))
    y = rng.random((n, c)) < rng.uniform(0, 0.5)
    p = rng.random((n, c)) < rng.uniform(0, 0.5)
    if seed == 0:
        p[:] = False  # nothing predicted, and below: nothing true, nothing at all
    if seed == 1:
        y[:] = False
    if seed == 2:
        y[:], p[:] = False, False
    m = compute(y, p, tuple(range(c)), tuple(map(str, range(c))))  # scikit-learn's figures
    assert micro_f1(y, p) == m.micro_f1 and macro_f1(y, p) == m.macro_f1
    if c > 1:  # (sklearn reads one column as a binary target; compute handles it, see above)
        assert micro_f1(y, p) == f1_score(y, p, average="micro", zero_division=0)
        occurring = np.flatnonzero(y.any(0) | p.any(0))
        if len(occurring):
            assert macro_f1(y, p) == f1_score(y, p, average="macro", zero_division=0,
                                              labels=occurring)


def test_the_metric_registry_names_the_three_figures_of_metrics():
    from mmtag import registries
    from mmtag.decision.metrics import macro_f1, metric_title, micro_f1

    assert list(registries.METRICS) == ["samples", "micro", "macro"]
    assert [registries.METRICS[n] for n in registries.METRICS] == [samples_f1, micro_f1, macro_f1]
    y = np.array([[1, 0], [0, 1], [1, 1]])
    p = np.array([[1, 1], [0, 0], [1, 1]])
    m = compute(y, p, (1, 2), ("a", "b"))
    for name in registries.METRICS:  # each name's figure of Metrics is its function's value
        assert m.figure(name) == pytest.approx(registries.METRICS[name](y, p))
    assert [metric_title(n) for n in registries.METRICS] == ["sample-F1", "micro-F1", "macro-F1"]
