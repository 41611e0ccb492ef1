"""Training a model: split → (encoder strategies) → features → head strategy → (refine
strategies) → thresholds tuned on validation. Returns everything a fitted Tagger holds.

Which strategies run is decided by `strategies.plan` from the config and the data given; the
trainer itself knows none of them.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .. import dist
from ..config import Config
from ..data import (Dataset, LabelSpace, check_images_decode, check_images_exist, label_names_of,
                    label_words, parse_image_aug, parse_text_aug, row_groups, shared_vocab,
                    train_val_split)
from ..decision import (FEW_VALIDATION_ROWS, Metrics, Scores, Thresholds, ValidationRecord,
                        reporting)
from ..decision.fitted import Fitted
from ..decision.scoring import head_scores
from ..decision.tuning import decide_out_of_fold, deciding_label, tune
from ..errors import DataError, MmtagError
from ..features import Features, FeatureSet
from ..features.pipeline import Featurizer
from ..heads import FoldEnsemble, Head, StackedHead, can_stack, head_class
from .checkpoint import RunLog
from .folds import stratified_folds
from .stacking import fit_stacker, stacked_probs
from .strategies import PseudoRound, Strategy, TrainInputs, TrainState, plan

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
    folds: int = 1  # > 1: cross-fitted; the metrics are out of fold, over every training row
    fold_samples_f1: list[float] = field(default_factory=list)  # each fold's, decided out of fold
    # the decision applied: its rule (`auto` resolved to the one it chose) and, for auto, what
    # each candidate scored (`Thresholds.chosen_from`)
    decision: Thresholds | None = None


def fit(config: Config, featurizer: Featurizer, inputs: TrainInputs, *,
        run_log: RunLog | None = None, progress: bool = True) -> tuple[Fitted, FitReport]:
    """Train on `inputs.train`; validate on `inputs.val`, or on a seeded `val_frac` split."""
    train, val, extra_text = inputs.train, inputs.val, inputs.extra_text
    if not train.labelled:
        raise DataError(train.path, "training data needs a Labels column")
    if extra_text is not None and not extra_text.labelled:
        raise DataError(extra_text.path, "--extra-text needs a Labels column")
    cfg = resolve(config, inputs)
    if val is not None and cfg.train.folds > 1:
        raise MmtagError(f"give a validation set (--val) or --folds {cfg.train.folds}, not both: "
                         "each is a way to choose the epoch and the thresholds")
    if cfg.train.stack and (cfg.train.folds < 2 or not can_stack(head_class(cfg.model.head_name()))):
        raise MmtagError("--stack fits per-label weights of the image and text branches on "
                         "out-of-fold scores: it needs --folds K (K >= 2) and a late-fusion head "
                         f"(mean or gated), not '{cfg.model.head_name()}'")
    if cfg.train.folds > 1 and cfg.finetune.modalities:
        raise MmtagError("--folds with --finetune would fine-tune the encoders once per fold; "
                         "use --folds 1 (a --val-frac split) or --val with --finetune")
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
        state = TrainState(cfg, featurizer, inputs, label_space_of(cfg, tr_data, None),
                           tr_data, va_data, run_log=run_log, progress=progress)
        for strategy in encoder_stage:
            strategy().run(state)
        tr = featurizer.features(tr_data, skip_bad=skip_bad, progress=progress)
        va = featurizer.features(va_data, skip_bad=skip_bad, progress=progress)
        skipped += tr.skipped + va.skipped
        log = state.log
    else:
        full = featurizer.features(train, skip_bad=skip_bad, progress=progress)
        skipped += list(full.skipped)
        if val is None:
            # undecodable images dropped under --skip-bad may leave too few rows to split
            check_trainable(full.dataset, None, extra_text, dropped=len(skipped),
                            folds=cfg.train.folds)
            groups = groups_of(cfg, full.dataset)
            if cfg.train.folds > 1:
                return cross_fit(cfg, featurizer, inputs, strategies, full, skipped, groups,
                                 run_log=run_log, progress=progress)
            tr_idx, va_idx = train_val_split(len(full.dataset), cfg.data.val_frac, cfg.train.seed,
                                             groups)
            tr = FeatureSet(full.features.subset(tr_idx), full.dataset.subset(tr_idx))
            va = FeatureSet(full.features.subset(va_idx), full.dataset.subset(va_idx))
        else:
            tr, va = full, featurizer.features(val, skip_bad=skip_bad, progress=progress)
            skipped += va.skipped
        log = {}
    warn_if_few(len(va.dataset), user_val=val is not None)
    label_space = label_space_of(cfg, tr.dataset, extra_text)
    state = run_head_strategies(cfg, featurizer, inputs, strategies, label_space, tr, va, log,
                                run_log=run_log, progress=progress)
    result = state.result
    assert result is not None and state.y_val is not None
    scores = head_scores(result.head, va.features)
    with reporting(deciding_label(cfg, state.y_val), show=progress):
        thresholds, val_metrics = tune(cfg, scores, state.y_val, label_space)
    fitted = Fitted(label_space=label_space, head=result.head, dims=state.dims,
                    thresholds=thresholds, val_metrics=val_metrics,
                    history=result.history_dicts(),
                    validation=validation_record(scores, state.y_val, va.dataset, featurizer),
                    extra=strategy_extras(state.log))
    report = FitReport(n_train=len(tr.dataset), n_val=len(va.dataset), val_dataset=va.dataset,
                       skipped=skipped, val_metrics=val_metrics, best_epoch=result.best_epoch,
                       pseudo_rounds=pseudo_rounds(fitted.extra), decision=fitted.thresholds)
    return fitted, report


def resolve(config: Config, inputs: TrainInputs) -> Config:
    """The validated config with `auto` options settled for these inputs (what a run saves, so
    its config.yaml says what it did). A Config built in Python gets the checks files and flags
    get."""
    cfg = config.validate()
    train = cfg.train.resolved(n_rows=len(inputs.train), user_val=inputs.val is not None,
                               finetuning=bool(cfg.finetune.modalities),
                               can_stack=can_stack(head_class(cfg.model.head_name())))
    return dataclasses.replace(cfg, train=train)


def label_space_of(cfg: Config, train: Dataset, extra_text: Dataset | None) -> LabelSpace:
    """The labels a model predicts: those of its training rows and of its extra captions,
    spelled as the CSVs spell them (ids or names), shown by the names `data.label_names` asks for."""
    return LabelSpace.of(train, extra_text, names=label_names_of(cfg.data.label_names))


def run_head_strategies(cfg: Config, featurizer: Featurizer, inputs: TrainInputs,
                        strategies: list[type[Strategy]], label_space: LabelSpace,
                        tr: FeatureSet, va: FeatureSet, log: dict[str, object], *,
                        run_log: RunLog | None, progress: bool, stage_prefix: str = "") -> TrainState:
    """The head and refine phases on training features `tr`, validated on `va`."""
    state = TrainState(cfg, featurizer, inputs, label_space, tr.dataset, va.dataset,
                       run_log=run_log, progress=progress, dims=featurizer.dims(tr.features),
                       train=tr.features, val=va.features,
                       y_train=label_space.encode(tr.dataset.label_rows()),
                       y_val=label_space.encode(va.dataset.label_rows()), log=dict(log),
                       stage_prefix=stage_prefix)
    if cfg.augment.views > 0 and inputs.extra_text is None:
        state.views = augmented_views(state)
    for strategy in strategies:
        if strategy.phase != "encoders":
            strategy().run(state)
    assert state.result is not None, "the head strategy left no result"
    return state


def cross_fit(cfg: Config, featurizer: Featurizer, inputs: TrainInputs,
              strategies: list[type[Strategy]], full: FeatureSet, skipped: list[DataError],
              groups: np.ndarray | None = None, *,
              run_log: RunLog | None, progress: bool) -> tuple[Fitted, FitReport]:
    """K-fold cross-fitting (`--folds K`): a head per fold, trained on the other folds and
    stopped early on its own; every training row is scored once, by the head that did not see
    it. Those out-of-fold scores choose the model's decision (thresholds) and give the run's
    figures, whose decision is itself out of fold (`decision.tuning.decide_out_of_fold`, which
    re-scoring the run replays); the model is the K fold heads averaged (bagging), so no row of
    the data is left out of it. `groups` (each row's, see `groups_of`): rows of one group share
    a fold."""
    label_space = label_space_of(cfg, full.dataset, inputs.extra_text)
    y = label_space.encode(full.dataset.label_rows())
    k = cfg.train.folds
    heads: list[Head] = []
    folds = fold_indices(y, k, cfg.train.seed, groups)
    states = []
    for i, (tr_idx, va_idx) in enumerate(folds, 1):
        tr = FeatureSet(full.features.subset(tr_idx), full.dataset.subset(tr_idx))
        va = FeatureSet(full.features.subset(va_idx), full.dataset.subset(va_idx))
        if dist.context().is_main:
            log.info("fold %d/%d: training on %d rows, validating on %d", i, k, len(tr_idx), len(va_idx))
        state = run_head_strategies(cfg, featurizer, inputs, strategies, label_space, tr, va, {},
                                    run_log=run_log, progress=progress, stage_prefix=f"fold{i}-")
        assert state.result is not None
        heads.append(state.result.head)
        states.append(state)
    model_head: nn.Module = FoldEnsemble(heads)
    scores = out_of_fold_scores(model_head, full.features, y, folds)
    if cfg.train.stack:
        w, b = fit_stacker([scores.branches[n] for n in StackedHead.branches], y)  # every row's
        model_head = StackedHead(model_head, y.shape[1])
        model_head.weight.data = torch.as_tensor(w, dtype=torch.float32)
        model_head.bias.data = torch.as_tensor(b, dtype=torch.float32)
        scores = stacked_out_of_fold(scores, y, folds)
    # the model's rule, chosen on every row's scores; the figures, decided out of fold
    decision = decide_out_of_fold(cfg, scores, y, folds, label_space, progress=progress)
    thresholds, decided = decision.thresholds, decision.decided
    oof_metrics, per_fold = decision.metrics, decision.fold_samples_f1
    best_epochs = [s.result.best_epoch for s in states]  # type: ignore[union-attr]
    extra = strategy_extras(states[0].log)
    extra["folds"] = {"k": k, "samples_f1": per_fold, "best_epochs": best_epochs,
                      "seed": cfg.train.seed,
                      "pseudo_rounds": [s.log.get("pseudo_rounds", []) for s in states]}
    first = states[0].result
    assert first is not None
    fitted = Fitted(label_space=label_space, head=model_head, dims=states[0].dims,  # type: ignore[arg-type]
                    thresholds=thresholds, val_metrics=oof_metrics, history=first.history_dicts(),
                    validation=validation_record(scores, y, full.dataset, featurizer, decided,
                                                 fold_numbers(folds, len(y))),
                    extra=extra)
    report = FitReport(n_train=len(full.dataset), n_val=len(full.dataset), val_dataset=full.dataset,
                       skipped=skipped, val_metrics=oof_metrics,
                       best_epoch=int(round(float(np.mean(best_epochs)))),
                       pseudo_rounds=pseudo_rounds(extra), folds=k, fold_samples_f1=per_fold,
                       decision=thresholds)
    return fitted, report


def fold_indices(y: np.ndarray, k: int, seed: int,
                 groups: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """K seeded folds, stratified on every label at once (iterative stratification), so each
    fold's validation rows hold each label in about the same proportion; with `groups`, each
    group's rows in one fold."""
    try:
        return [(np.sort(a), np.sort(b)) for a, b in stratified_folds(y, k, seed, groups)]
    except ValueError:
        if groups is None:
            raise
        raise MmtagError(f"--folds {k}: the rows form only {int(np.max(groups)) + 1} group(s) of "
                         "rows that share an image or a caption, fewer than the folds; use fewer "
                         "folds, or --no-group-rows to split rows alone (their figures will be "
                         "optimistic)") from None


def fold_numbers(folds: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """Each row's fold (0..K-1), as a run's validation record keeps it."""
    fold = np.zeros(n, dtype=np.int64)
    for i, (_, va_idx) in enumerate(folds):
        fold[va_idx] = i
    return fold


def folds_of(fold: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train rows, validation rows) of each fold, from each row's fold number."""
    return [(np.flatnonzero(fold != i), np.flatnonzero(fold == i)) for i in range(int(fold.max()) + 1)]


def groups_of(cfg: Config, data: Dataset) -> np.ndarray | None:
    """Each row's group of rows sharing an image or a caption, which every split keeps on one
    side (`data.group_rows`); None when each row is alone (or grouping is off)."""
    if not cfg.data.group_rows:
        return None
    groups = row_groups(data)
    if groups.trivial:
        return None
    if dist.context().is_main:
        log.info("%d of %d rows share an image (%d) or a caption (%d) with another row: %d groups, "
                 "each kept on one side of every split (--no-group-rows: split rows alone)",
                 groups.grouped_rows, len(data), groups.by_image, groups.by_caption, groups.n_groups)
    return groups.of


def out_of_fold_scores(head: nn.Module, features: Features, y: np.ndarray,
                       folds: list[tuple[np.ndarray, np.ndarray]]) -> Scores:
    """A cross-fitted head's scores of its own training rows, each row scored by the fold head
    that did not train on it (the bagged model saw four fifths of every row: its scores of them
    are in-sample). A stacked head's rows are combined as training combined them, by weights
    fitted on the other folds' scores. What cross-fitting scores, and what re-scoring a
    cross-fitted run (an export) must replay."""
    inner = head.inner if isinstance(head, StackedHead) else head
    if not isinstance(inner, FoldEnsemble) or len(inner.members) != len(folds):
        raise MmtagError(f"out-of-fold scores need a fold ensemble of {len(folds)} heads")
    probs = np.zeros(y.shape, dtype=np.float64)
    branches: dict[str, np.ndarray] = {}
    for member, (_, va_idx) in zip(inner.members, folds):
        scores = head_scores(member, features.subset(va_idx))
        probs[va_idx] = scores.probs
        for name, p in scores.branches.items():
            branches.setdefault(name, np.zeros(y.shape, dtype=np.float64))[va_idx] = p
    out = Scores(probs=probs, branches=branches, union=inner.decision == "union")
    return stacked_out_of_fold(out, y, folds) if isinstance(head, StackedHead) else out


def stacked_out_of_fold(scores: Scores, y: np.ndarray,
                        folds: list[tuple[np.ndarray, np.ndarray]]) -> Scores:
    """Out-of-fold branch scores stacked out of fold too: each fold's rows combined by weights
    fitted on the other folds' (the saved weights are fitted on every row's, so they saw it)."""
    names = list(StackedHead.branches)
    probs = np.zeros(y.shape, dtype=np.float64)
    for _, va_idx in folds:
        rest = np.setdiff1d(np.arange(len(y)), va_idx)
        w, b = fit_stacker([scores.branches[n][rest] for n in names], y[rest])
        probs[va_idx] = stacked_probs([scores.branches[n][va_idx] for n in names], w, b)
    return Scores(probs=probs, branches=scores.branches, union=scores.union)


def validation_record(scores: Scores, y: np.ndarray, data: Dataset, featurizer: Featurizer,
                      decided: np.ndarray | None = None,
                      fold: np.ndarray | None = None) -> ValidationRecord:
    return ValidationRecord.of(scores.probs, scores.branches, y, data,
                               with_images="image" in featurizer.modalities, decided=decided,
                               fold=fold)


def strategy_extras(log: dict[str, object]) -> dict[str, object]:
    """What the strategies logged that the bundle keeps."""
    return {"pseudo_rounds": log.get("pseudo_rounds", []), "finetune": log.get("finetune", {})}


def pseudo_rounds(extra: dict[str, object]) -> list[PseudoRound]:
    return [PseudoRound(**r) for r in extra.get("pseudo_rounds", [])]  # type: ignore[arg-type, attr-defined]


def warn_if_few(n_val: int, *, user_val: bool) -> None:
    """Say it when the run's choices rest on few validation rows, and how many."""
    if n_val < FEW_VALIDATION_ROWS and dist.context().is_main:
        source = "your --val set" if user_val else "the --val-frac split"
        log.warning("the best epoch and the thresholds are chosen on %d validation row(s) (%s); "
                    "below %d they are noisy and the validation figures optimistic: use --folds 5 "
                    "(every row validates once) or give a larger --val CSV", n_val, source,
                    FEW_VALIDATION_ROWS)


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
    tr_idx, va_idx = train_val_split(len(train), config.data.val_frac, config.train.seed,
                                     groups_of(config, train))
    return train.subset(tr_idx), train.subset(va_idx)


def check_trainable(train: Dataset, val: Dataset | None, extra_text: Dataset | None, *,
                    dropped: int = 0, folds: int = 1) -> None:
    """Refuse, before any feature is computed, data that cannot train a multi-label tagger:
    too few rows for a training and a validation part, or a single label (nothing to tell
    apart; sklearn's multi-label metrics would also fail on it after the training time)."""
    n = len(train)
    left = f" left after --skip-bad dropped {dropped}" if dropped else ""
    rows = f"{n} labelled row{'' if n == 1 else 's'}{left}"
    if val is None and n < 2:
        raise DataError(train.path, f"{rows}; training needs at least 2 (1 to train on, 1 to validate on)")
    if val is None and folds > n:
        raise DataError(train.path, f"{rows}; --folds {folds} needs at least {folds}")
    if n < 1:
        raise DataError(train.path, f"{rows}; training needs at least 1")
    if val is not None and len(val) < 1:
        raise DataError(val.path, "no validation rows; validation needs at least 1")
    shared_vocab(train, val, extra_text)  # named labels: one id per name in every file
    space = LabelSpace.of(train, extra_text)
    if len(space) < 2:
        only = f"{space.tokens[0]}" + (f" ({space.names[0]})" if space.names[0] != space.tokens[0] else "")
        raise DataError(train.path, "a multi-label tagger needs at least 2 distinct labels; "
                                    f"every row has label {only}")
