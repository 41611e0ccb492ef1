"""A run's decision as its config asks: the configured rule tuned on validation scores, and a
cross-fitted run's decisions and figures out of fold.

Training makes these choices; a trained model makes them again when it re-scores its
validation rows (`Tagger.recalibrate`, after an export), shows what its figures are of
(`Tagger.validation_decisions`) or decides for one branch alone (`Tagger.branch_decision`):
one procedure for all, which none of the latter needs `mmtag.training` for.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from ..config import Config
from ..data import LabelSpace
from .metrics import Metrics, compute, metric_title, samples_f1
from .thresholds import SAMPLES, Scores, Thresholds, decide, report_part, reporting, tune_decisions

# (training rows, validation rows) of each fold of a cross-fitted run
Folds = list[tuple[np.ndarray, np.ndarray]]


def decision_of(config: Config, scores: Scores, y_val: np.ndarray,
                skip: dict[str, str] | None = None) -> Thresholds:
    """The configured decision rule tuned on validation scores for the configured metric
    (`train.metric`; `skip`: see `tune_auto`)."""
    ranges = {name: (float(r[0]), float(r[1])) for name, r in
              (("image", config.train.union_image_range), ("text", config.train.union_text_range)) if r}
    return tune_decisions(config.train.thresholds, scores, y_val, ranges, skip,
                          metric=config.train.metric)


def deciding_label(config: Config, y: np.ndarray) -> str:
    """What the decision step's progress lines say it does."""
    metric = config.train.metric
    aim = "" if metric == SAMPLES else f" for {metric_title(metric)}"
    return f"{config.train.thresholds}{aim} over {y.shape[1]} labels and {len(y)} rows"


def tune(config: Config, scores: Scores, y_val: np.ndarray,
         label_space: LabelSpace) -> tuple[Thresholds, Metrics]:
    """Thresholds tuned on validation scores, and the validation metrics they give."""
    thresholds = decision_of(config, scores, y_val)
    return thresholds, compute(y_val, decide(scores, thresholds), label_space.ids, label_space.names)


def cross_fitted_decisions(cfg: Config, scores: Scores, y: np.ndarray, folds: Folds,
                           model: Thresholds | None = None) -> np.ndarray:
    """A cross-fitted run's decisions of its own rows, the decision out of fold as well: each
    fold's rows decided by the rule tuned (and for `auto`, chosen) on the other folds' scores.
    Scored at the decision tuned on every row, per-class thresholds fit the rows they score,
    enough to rank the heads wrongly (docs/results.md, "Split figures against out-of-fold
    figures"). With the `model`'s rule, `auto` leaves out the candidates it left out,
    so the figures are of the procedure the model went through."""
    pred = np.zeros(y.shape, dtype=bool)
    skip = model.skipped if model is not None else None
    chooser = logging.getLogger(tune_decisions.__module__)  # where `auto` logs
    level = chooser.level
    chooser.setLevel(logging.WARNING)  # `auto` says which rule it chose: of the model's, once
    try:
        for i, (rest, va_idx) in enumerate(folds, 1):
            report_part(f"fold {i}/{len(folds)}'s rule")
            pred[va_idx] = decide(scores.subset(va_idx), decision_of(cfg, scores.subset(rest), y[rest], skip))
    finally:
        chooser.setLevel(level)
    return pred


def figures_of(pred: np.ndarray, y: np.ndarray, folds: Folds,
               label_space: LabelSpace) -> tuple[Metrics, list[float]]:
    """The metrics of cross-fitted decisions over all rows, and each fold's sample-F1."""
    metrics = compute(y, pred, label_space.ids, label_space.names)
    return metrics, [samples_f1(y[va_idx], pred[va_idx]) for _, va_idx in folds]


@dataclass
class OutOfFold:
    """A cross-fitted run's decision and figures, from its rows' out-of-fold scores."""

    thresholds: Thresholds  # the model's rule: tuned on every row's scores, or the one kept
    decided: np.ndarray  # (N, C) bool: each fold's rows decided by the rule tuned on the others
    metrics: Metrics  # of `decided`, over every row: the run's figures
    fold_samples_f1: list[float]  # each fold's sample-F1 of `decided`


def decide_out_of_fold(config: Config, scores: Scores, y: np.ndarray, folds: Folds,
                       label_space: LabelSpace, thresholds: Thresholds | None = None, *,
                       progress: bool | None = None) -> OutOfFold:
    """What a cross-fitted run decides from its rows' out-of-fold `scores` (training does this
    once the fold heads are trained; re-scoring the run's rows replays it): the model's rule,
    tuned on every row's scores unless `thresholds` gives the one to keep; each fold's rows
    decided by the rule tuned on the other folds' (`cross_fitted_decisions`); and the figures
    of those decisions (`figures_of`).

    `progress`: None, the rules run outside `reporting` (as a re-scoring does); True or False,
    they report as training's decision step does (False: not on the console)."""
    step = reporting(deciding_label(config, y), show=progress) if progress is not None else nullcontext()
    with step:
        if thresholds is None:
            report_part("the model's rule")
            thresholds = decision_of(config, scores, y)  # the model's: chosen on every row's scores
        decided = cross_fitted_decisions(config, scores, y, folds, thresholds)
    metrics, per_fold = figures_of(decided, y, folds, label_space)
    return OutOfFold(thresholds=thresholds, decided=decided, metrics=metrics, fold_samples_f1=per_fold)
