"""The self-training strategy (`--unlabeled CSV --pseudo-rounds N`): pseudo-labels of the
unlabelled rows the model is confident about join the training rows, round by round.

Each round labels the unlabelled rows with the current head, keeps the confident ones, and trains
a fresh head on training + pseudo rows; rounds stop when validation F1 (of the run's metric,
`--metric`) stops improving.
Validation rows are never pseudo-labelled or trained on.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from ...config import Config
from ...decision.metrics import metric_title
from ...decision.scoring import head_scores
from ...features import concat_features
from ..loop import FitResult
from .base import Strategy, TrainInputs, TrainState, register_strategy

log = logging.getLogger("mmtag")


@dataclass
class PseudoRound:
    """One self-training round: how many pseudo-labelled rows joined, and validation sample-F1
    of the head trained with them (round 0 = the head trained on labelled rows only), and the
    F1 of the run's metric (`--metric`) the rounds are compared by (a record written before it
    was kept compared sample-F1: a missing one reads as val_samples_f1)."""

    round: int
    n_pseudo: int
    val_samples_f1: float
    val_metric: float | None = None

    def __post_init__(self) -> None:
        if self.val_metric is None:
            self.val_metric = self.val_samples_f1


def select_pseudo_labels(probs: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose every label score is confidently on one side (>= c or <= 1 - c) and that have
    at least one positive label → (row indices, their 0/1 label matrix).

    Requiring confidence on every class, not just the predicted ones, keeps rows where a missed
    label would silently become a negative training example out of the pseudo set.
    """
    if not 0.5 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence}")
    positive = probs >= confidence
    sure = positive | (probs <= 1.0 - confidence)
    keep = np.flatnonzero(sure.all(axis=1) & positive.any(axis=1))
    return keep, positive[keep].astype(np.float32)


@register_strategy("self-training")
class SelfTraining(Strategy):
    phase = "refine"

    @classmethod
    def active(cls, config: Config, inputs: TrainInputs) -> bool:
        if config.pseudo.rounds > 0 and inputs.unlabeled is None:
            log.warning("pseudo.rounds is %d but no unlabelled rows were given (--unlabeled CSV); "
                        "training without self-training", config.pseudo.rounds)
        return config.pseudo.rounds > 0 and inputs.unlabeled is not None

    def run(self, state: TrainState) -> None:
        cfg = state.config
        assert state.result is not None and state.inputs.unlabeled is not None
        assert state.train is not None and state.y_train is not None
        pool = state.featurizer.features(state.inputs.unlabeled, skip_bad=cfg.data.skip_bad,
                                         progress=state.progress).features
        best = state.result
        best_f1 = val_f1(best)
        rounds = [PseudoRound(0, 0, val_samples_f1(best), best_f1)]
        for r in range(1, cfg.pseudo.rounds + 1):
            keep, y_pseudo = select_pseudo_labels(head_scores(best.head, pool).probs,
                                                  cfg.pseudo.confidence)
            candidate = state.fit(concat_features(state.train, pool.subset(keep)),
                                  np.concatenate([state.y_train, y_pseudo]), stage=f"pseudo-{r}")
            f1 = val_f1(candidate)
            rounds.append(PseudoRound(r, int(len(keep)), val_samples_f1(candidate), f1))
            log.info("pseudo-label round %d: %d rows, val %s %.4f", r, len(keep),
                     metric_title(cfg.train.metric), f1)
            if f1 <= best_f1:
                break
            best, best_f1 = candidate, f1
        state.result = best
        state.log["pseudo_rounds"] = [asdict(x) for x in rounds]


def val_f1(result: FitResult) -> float:
    """Validation F1 of the run's metric (`val_metric`) at a trained head's best epoch."""
    best = result.history[result.best_epoch - 1] if result.history else None
    return float(best.val_metric) if best is not None and best.val_metric is not None else 0.0


def val_samples_f1(result: FitResult) -> float:
    """Validation sample-F1 of a trained head's best epoch."""
    return result.history[result.best_epoch - 1].val_samples_f1 if result.history else 0.0
