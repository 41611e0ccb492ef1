"""Cross-fitting (`--folds K`): folds partition the rows, each row is scored by the one head that
never trained on it, the decision is chosen on those scores, and the model is the K heads."""
import json

import numpy as np
import pytest

from mmtag import Tagger, api
from mmtag.decision import Scores, decide, samples_f1, tune_decisions
from mmtag.decision.scoring import head_scores
from mmtag.errors import MmtagError
from mmtag.heads import FoldEnsemble
from mmtag.data import row_groups
from mmtag.training.trainer import fold_indices, folds_of


def test_folds_partition_the_rows_seeded_and_stratified():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 6)) < [0.5, 0.3, 0.1, 0.05, 0.4, 0.2]).astype(np.float32)
    folds = fold_indices(y, 5, seed=3)
    seen = np.concatenate([va for _, va in folds])
    assert sorted(seen.tolist()) == list(range(300))  # every row validated exactly once
    for tr, va in folds:
        assert not set(tr) & set(va) and len(tr) + len(va) == 300
        # each fold holds each label in about its overall proportion
        assert np.all(np.abs(y[va].mean(0) - y.mean(0)) <= 0.05)
    again = fold_indices(y, 5, seed=3)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, fold_indices(y, 5, seed=4)))


def test_every_row_is_scored_by_the_head_that_never_saw_it(tiny, make_config, tmp_path):
    cfg = make_config(**{"model.modalities": ["text"], "train.folds": 3, "train.epochs": 4})
    train, _ = api.read_dataset(tiny.train_csv, None, labelled=True)
    tagger = Tagger(cfg)
    report = tagger.fit(train, progress=False)
    assert report.folds == 3 and report.n_train == report.n_val == len(train)
    assert len(report.fold_samples_f1) == 3
    head = tagger.head
    assert isinstance(head, FoldEnsemble) and len(head.members) == 3
    rec = tagger.validation
    assert rec is not None and rec.image_ids == train.image_ids  # out of fold: every row
    y = tagger.label_space.encode(train.label_rows())
    feats = tagger.features(train, progress=False).features
    # the tiny data repeats captions: its folds are grouped, and the record keeps them
    assert fold_indices(y, 3, cfg.train.seed, row_groups(train).of)[0][1].tolist() \
        == np.flatnonzero(rec.fold == 0).tolist()
    for member, (_, va) in zip(head.members, folds_of(rec.fold)):
        assert np.allclose(head_scores(member, feats.subset(va)).probs, rec.probs[va], atol=1e-6)
    # the figures are the out-of-fold ones, saved and reloaded with the K heads
    tagger.save(tmp_path / "run")
    back = Tagger.load(tmp_path / "run")
    assert isinstance(back.head, FoldEnsemble) and back.val_metrics.samples_f1 == report.val_metrics.samples_f1
    data, _ = api.read_dataset(tiny.holdout_csv, None, labelled=True)
    assert np.allclose(back.predict_proba_dataset(data, progress=False).probs,
                       tagger.predict_proba_dataset(data, progress=False).probs)
    # the report says what its figures are
    page = api.report(tmp_path / "run").read_text()
    assert f"out of fold over all {len(train)} training rows (3 folds" in page
    # and metrics.json keeps each fold's figure, the ± std of an out-of-fold run
    folds = json.loads((tmp_path / "run" / "metrics.json").read_text())["folds"]
    assert folds["k"] == 3 and folds["samples_f1"] == pytest.approx(report.fold_samples_f1)


def test_folds_refuse_what_they_cannot_do(tiny, make_config):
    train, _ = api.read_dataset(tiny.train_csv, None, labelled=True)
    holdout, _ = api.read_dataset(tiny.holdout_csv, None, labelled=True)
    cfg = make_config(**{"model.modalities": ["text"], "train.folds": 3})
    with pytest.raises(MmtagError, match="--val\\) or --folds 3, not both"):
        Tagger(cfg).fit(train, holdout, progress=False)
    with pytest.raises(MmtagError, match="--folds with --finetune"):
        Tagger(cfg.override({"finetune.modalities": ["text"]})).fit(train, progress=False)
    with pytest.raises(MmtagError, match="--folds 50 needs at least 50"):
        Tagger(cfg.override({"train.folds": 50})).fit(train.subset(list(range(10))), progress=False)


@pytest.mark.parametrize("n_rows, user_val, finetuning, can_stack, want", [
    (2000, False, False, True, (5, True)),    # the default: 5 folds, stacked late fusion
    (2000, False, False, False, (5, False)),  # a head without branches cannot be stacked
    (2000, True, False, True, (1, False)),    # the user's --val set makes the choices
    (2000, False, True, True, (1, False)),    # fine-tuning once per fold would cost 5x
    (99, False, False, True, (1, False)),     # under 20 rows per fold: one split
    (100, False, False, True, (5, True)),
])
def test_auto_folds_and_stacking_settle_from_the_inputs(n_rows, user_val, finetuning, can_stack, want):
    from mmtag.config import TrainConfig

    t = TrainConfig().resolved(n_rows=n_rows, user_val=user_val, finetuning=finetuning,
                               can_stack=can_stack)
    assert (t.folds, t.stack) == want
    # what the user set is kept
    t = TrainConfig(folds=3, stack=False).resolved(n_rows=n_rows, user_val=user_val,
                                                   finetuning=finetuning, can_stack=can_stack)
    assert (t.folds, t.stack) == (3, False)


def test_the_default_model_is_a_stacked_five_fold_late_fusion_and_says_so(tiny, cache_dir, tmp_path):
    """No option given: mean late fusion, 5 folds (tiny has >= 100 rows), stacked; the saved
    config records what ran, not `auto`."""
    from mmtag import Config
    from mmtag.heads import StackedHead

    cfg = Config().override({"cache_dir": cache_dir, "train.epochs": 3, "model.hidden": 16,
                             "data.workers": 0})
    assert (cfg.model.fusion, cfg.train.folds, cfg.train.stack) == ("mean", "auto", "auto")
    train, _ = api.read_dataset(tiny.train_csv, tiny.images, labelled=True)
    assert len(train) >= 100
    tagger = Tagger(cfg)
    report = tagger.fit(train, progress=False)
    assert report.folds == 5 and isinstance(tagger.head, StackedHead)
    assert (tagger.config.train.folds, tagger.config.train.stack) == (5, True)
    tagger.save(tmp_path / "run")
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "folds: 5" in saved and "stack: true" in saved
    assert isinstance(Tagger.load(tmp_path / "run").head, StackedHead)


def test_the_figures_decide_each_fold_by_the_rule_tuned_on_the_others(tiny, make_config, tmp_path):
    # per-class thresholds tuned on every out-of-fold row and scored on them fit those rows; the
    # run's figures must decide each fold by thresholds tuned on the other folds only
    cfg = make_config(**{"model.modalities": ["text"], "train.folds": 3, "train.epochs": 4,
                         "train.thresholds": "per-class"})
    train, _ = api.read_dataset(tiny.train_csv, None, labelled=True)
    tagger = Tagger(cfg)
    report = tagger.fit(train, progress=False)
    rec = tagger.validation
    y = rec.y_true.astype(np.float32)
    scores = Scores(probs=rec.probs)
    pred = np.zeros(y.shape, dtype=bool)
    for tr, va in folds_of(rec.fold):
        pred[va] = decide(scores.subset(va), tune_decisions("per-class", scores.subset(tr), y[tr]))
    assert report.val_metrics.samples_f1 == pytest.approx(samples_f1(y, pred))
    assert report.fold_samples_f1 == pytest.approx(
        [samples_f1(y[va], pred[va]) for _, va in folds_of(rec.fold)])
    # the model's own decision is the rule tuned on every row's scores
    assert tagger.thresholds.to_dict() == tune_decisions("per-class", scores, y).to_dict()
    # and the report shows the figures the run reports, of the same decisions
    assert np.array_equal(tagger.validation_decisions(), pred)
    tagger.save(tmp_path / "run")
    assert np.array_equal(Tagger.load(tmp_path / "run").validation.decided, pred)  # saved with the run
    page = api.report(tmp_path / "run").read_text()
    assert f"sample-F1 <b>{report.val_metrics.samples_f1:.4f}</b>" in page


def test_the_folds_try_the_auto_candidates_the_model_s_rule_tried(monkeypatch):
    # a budget four fifths of the rows fit and all of them do not: the model's rule skips gfm,
    # and so must each fold's rule, or the figures would be of another procedure
    from mmtag.config import Config
    from mmtag.decision import thresholds
    from mmtag.decision.tuning import cross_fitted_decisions, decision_of

    rng = np.random.default_rng(0)
    n, c = 1500, 30
    y = (rng.random((n, c)) < 0.1).astype(np.float32)
    probs = np.clip(y * 0.6 + rng.random((n, c)) * 0.5, 0, 1).astype(np.float32)
    scores = Scores(probs=probs)
    cfg = Config().override({"train.thresholds": "auto"})
    whole = thresholds.auto_work("gfm", probs)
    monkeypatch.setattr(thresholds, "AUTO_BUDGET", 0.9 * whole)
    assert thresholds.auto_work("gfm", probs[: n * 4 // 5]) < thresholds.AUTO_BUDGET
    tried = []
    real = thresholds.TUNERS["gfm"]
    monkeypatch.setitem(thresholds.TUNERS, "gfm", lambda p, t: tried.append(len(p)) or real(p, t))
    model = decision_of(cfg, scores, y)
    assert "gfm" in model.skipped and not tried
    folds = fold_indices(y, 5, 0)
    cross_fitted_decisions(cfg, scores, y, folds, model)
    assert not tried  # the folds replayed the model's candidates
    cross_fitted_decisions(cfg, scores, y, folds)  # without the model's rule: each fold estimates
    assert tried
