"""Training a model: split → (encoder strategies) → features → head strategy → (refine
strategies) → thresholds tuned on validation. Returns everything a fitted Tagger holds.

Which strategies run is decided by `strategies.plan` from the config and the data given; the
trainer itself knows none of them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .. import dist
from ..config import Config
from ..data import (Dataset, LabelSpace, check_images_decode, check_images_exist, label_words,
                    parse_image_aug, parse_text_aug, train_val_split)
from ..decision import (Metrics, Scores, Thresholds, ValidationRecord, compute, decide,
                        tune_decisions)
from ..errors import DataError, MmtagError
from ..features import Features, FeatureSet
from ..features.pipeline import Featurizer
from ..heads import Head
from .checkpoint import RunLog
from .loop import predict_outputs
from .strategies import PseudoRound, TrainInputs, TrainState, plan

log = logging.getLogger("mmtag")


@dataclass
class FitReport:
    """What training did: sizes, skipped rows and validation metrics."""

    n_train: int
    n_val: int
    val_dataset: Dataset | None = None
    skipped: list[DataError] = field(default_factory=list)
    val_metrics: Metrics | None = None
    best_epoch: int = 0
    pseudo_rounds: list[PseudoRound] = field(default_factory=list)


@dataclass
class Fitted:
    """The learned state of a model, complete: a Tagger holds one of these or none."""

    label_space: LabelSpace
    head: Head
    dims: dict[str, int]
    thresholds: Thresholds
    val_metrics: Metrics | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    validation: ValidationRecord | None = None
    extra: dict[str, object] = field(default_factory=dict)  # what strategies logged

    @property
    def finetune_history(self) -> dict[str, list[dict[str, float]]]:
        return self.extra.get("finetune") or {}  # type: ignore[return-value]


def head_scores(head: Head, feats: Features) -> Scores:
    """The head's probabilities (and each branch's, for late fusion) on features."""
    logits, branches = predict_outputs(head, feats)
    return Scores(probs=sigmoid(logits), branches={k: sigmoid(v) for k, v in branches.items()},
                  union=head.decision == "union")


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def tune(config: Config, scores: Scores, y_val: np.ndarray,
         label_space: LabelSpace) -> tuple[Thresholds, Metrics]:
    """Thresholds tuned on validation scores, and the validation metrics they give."""
    ranges = {name: (float(r[0]), float(r[1])) for name, r in
              (("image", config.train.union_image_range), ("text", config.train.union_text_range)) if r}
    thresholds = tune_decisions(config.train.thresholds, scores, y_val, ranges)
    return thresholds, compute(y_val, decide(scores, thresholds), label_space.ids, label_space.names)


def fit(config: Config, featurizer: Featurizer, inputs: TrainInputs, *,
        run_log: RunLog | None = None, progress: bool = True) -> tuple[Fitted, FitReport]:
    """Train on `inputs.train`; validate on `inputs.val`, or on a seeded `val_frac` split."""
    train, val, extra_text = inputs.train, inputs.val, inputs.extra_text
    if not train.labelled:
        raise DataError(train.path, "training data needs a Labels column")
    if extra_text is not None and not extra_text.labelled:
        raise DataError(extra_text.path, "--extra-text needs a Labels column")
    cfg = config.validate()  # a Config built in Python gets the checks files and flags get
    strategies = plan(cfg, inputs)
    skip_bad = cfg.data.skip_bad
    skipped: list[DataError] = []
    # Missing images go first (--skip-bad), so the data check below counts the usable rows.
    if "image" in featurizer.modalities:
        train, skipped = check_images_exist(train, skip_bad=skip_bad)
    check_trainable(train, val, extra_text, dropped=len(skipped))
    encoder_stage = [s for s in strategies if s.phase == "encoders"]
    if encoder_stage:
        # Features depend on the replaced encoders, so they come after the split and stage one.
        if cfg.finetune.modalities and "image" in cfg.finetune.modalities \
                and "image" in featurizer.modalities:
            # Fine-tuning reads images outside the cache, epoch after epoch: an undecodable one
            # is found (and under --skip-bad, dropped) before the first epoch.
            train, undecodable = check_images_decode(train, skip_bad=skip_bad, progress=progress)
            skipped += undecodable
            check_trainable(train, val, extra_text, dropped=len(skipped))
        tr_data, va_data = split(cfg, train, val)
        state = TrainState(cfg, featurizer, inputs, LabelSpace.from_labels(tr_data.label_rows()),
                           tr_data, va_data, run_log=run_log, progress=progress)
        for strategy in encoder_stage:
            strategy().run(state)
        tr = featurizer.features(tr_data, skip_bad=skip_bad, progress=progress)
        va = featurizer.features(va_data, skip_bad=skip_bad, progress=progress)
        skipped += tr.skipped + va.skipped
        log = state.log
    else:
        full = featurizer.features(train, skip_bad=skip_bad, progress=progress)
        if val is None:
            # undecodable images dropped under --skip-bad may leave too few rows to split
            check_trainable(full.dataset, None, extra_text, dropped=len(skipped) + len(full.skipped))
            tr_idx, va_idx = train_val_split(len(full.dataset), cfg.data.val_frac, cfg.train.seed)
            tr = FeatureSet(full.features.subset(tr_idx), full.dataset.subset(tr_idx))
            va = FeatureSet(full.features.subset(va_idx), full.dataset.subset(va_idx))
        else:
            tr, va = full, featurizer.features(val, skip_bad=skip_bad, progress=progress)
        skipped += list(full.skipped) + (va.skipped if val is not None else [])
        log = {}
    tr_data, va_data = tr.dataset, va.dataset
    warn_if_few(len(va_data), user_val=val is not None)
    extra_labels = extra_text.label_rows() if extra_text is not None else []
    label_space = LabelSpace.from_labels(tr_data.label_rows() + extra_labels)
    state = TrainState(cfg, featurizer, inputs, label_space, tr_data, va_data, run_log=run_log,
                       progress=progress, dims=featurizer.dims(tr.features), train=tr.features,
                       val=va.features, y_train=label_space.encode(tr_data.label_rows()),
                       y_val=label_space.encode(va_data.label_rows()), log=dict(log))
    if cfg.augment.views > 0 and extra_text is None:
        state.views = augmented_views(state)
    for strategy in strategies:
        if strategy.phase != "encoders":
            strategy().run(state)
    result = state.result
    assert result is not None, "the head strategy left no result"
    y_va = state.y_val
    assert y_va is not None
    scores = head_scores(result.head, va.features)
    thresholds, val_metrics = tune(cfg, scores, y_va, label_space)
    validation = ValidationRecord(
        probs=scores.probs, y_true=y_va, branches=scores.branches,
        image_ids=list(va_data.image_ids), captions=list(va_data.captions),
        image_paths=[str(va_data.image_path(i)) if "image" in featurizer.modalities else ""
                     for i in range(len(va_data))])
    extra = {"pseudo_rounds": state.log.get("pseudo_rounds", []),
             "finetune": state.log.get("finetune", {})}
    fitted = Fitted(label_space=label_space, head=result.head, dims=state.dims,
                    thresholds=thresholds, val_metrics=val_metrics,
                    history=result.history_dicts(), validation=validation, extra=extra)
    rounds = [PseudoRound(**r) for r in extra["pseudo_rounds"]]  # type: ignore[arg-type, attr-defined]
    report = FitReport(n_train=len(tr_data), n_val=len(va_data), val_dataset=va_data,
                       skipped=skipped, val_metrics=val_metrics, best_epoch=result.best_epoch,
                       pseudo_rounds=rounds)
    return fitted, report


# Below this many validation rows, the epoch and threshold chosen on them are noise: on coco-real,
# a 195-row split overstated held-out sample-F1 by 1-3 points and ranked the heads wrongly.
FEW_VALIDATION_ROWS = 1000


def warn_if_few(n_val: int, *, user_val: bool) -> None:
    """Say it when the run's choices rest on few validation rows, and how many."""
    if n_val < FEW_VALIDATION_ROWS and dist.context().is_main:
        source = "your --val set" if user_val else "the --val-frac split"
        log.warning("the best epoch and the thresholds are chosen on %d validation row(s) (%s); "
                    "below %d they are noisy and the validation figures optimistic: give a larger "
                    "--val CSV", n_val, source, FEW_VALIDATION_ROWS)


def augmented_views(state: TrainState) -> list[Features] | None:
    """`augment.views` cached augmented feature views of the training rows."""
    cfg, fz = state.config, state.featurizer
    image_aug = parse_image_aug(cfg.augment.image_spec(False)) if "image" in fz.modalities else None
    text_aug = (parse_text_aug(cfg.augment.text, protected=label_words(state.label_space.names))
                if "text" in fz.modalities else None)
    if image_aug is None and text_aug is None:
        raise MmtagError("--aug-views needs --image-aug or --text-aug for a modality the model uses")
    return fz.views(state.train_data, cfg.augment.views, image_augment=image_aug,
                    text_augment=text_aug, seed=cfg.train.seed, progress=state.progress)


def split(config: Config, train: Dataset, val: Dataset | None) -> tuple[Dataset, Dataset]:
    """The user's validation set, or the seeded `val_frac` split every training path uses."""
    if val is not None:
        return train, val
    tr_idx, va_idx = train_val_split(len(train), config.data.val_frac, config.train.seed)
    return train.subset(tr_idx), train.subset(va_idx)


def check_trainable(train: Dataset, val: Dataset | None, extra_text: Dataset | None, *,
                    dropped: int = 0) -> None:
    """Refuse, before any feature is computed, data that cannot train a multi-label tagger:
    too few rows for a training and a validation part, or a single label (nothing to tell
    apart; sklearn's multi-label metrics would also fail on it after the training time)."""
    n = len(train)
    left = f" left after --skip-bad dropped {dropped}" if dropped else ""
    rows = f"{n} labelled row{'' if n == 1 else 's'}{left}"
    if val is None and n < 2:
        raise DataError(train.path, f"{rows}; training needs at least 2 (1 to train on, 1 to validate on)")
    if n < 1:
        raise DataError(train.path, f"{rows}; training needs at least 1")
    if val is not None and len(val) < 1:
        raise DataError(val.path, "no validation rows; validation needs at least 1")
    labels = list(train.labels or []) + list((extra_text.labels or []) if extra_text is not None else [])
    space = LabelSpace.from_labels(labels)
    if len(space) < 2:
        only = f"{space.ids[0]}" + (f" ({space.names[0]})" if space.names[0] != str(space.ids[0]) else "")
        raise DataError(train.path, "a multi-label tagger needs at least 2 distinct labels; "
                                    f"every row has label {only}")
