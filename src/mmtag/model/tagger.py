"""The `Tagger`: a model of encoders → features → head → decision, with its labels and thresholds.

    from mmtag import Tagger
    tagger = Tagger.load("runs/fused")
    preds = tagger.predict(["a.jpg"], ["a man riding a horse"])
    preds[0].labels, preds[0].scores

Like a scikit-learn estimator, `Tagger(config)` is a specification and `fit` learns; what it
learns is one complete `Fitted` (label space, head, dims, thresholds, validation record) held
whole or not at all, so a Tagger is never half-built. Training itself lives in
`mmtag.training.trainer`; this module predicts, evaluates, saves and loads. Only what trains
or replays training (`fit`, `recalibrate`, and the folds of a cross-fitted run whose record
kept no decisions) imports `mmtag.training`, when called: importing this module, loading a
bundle and predicting load none of it (heads score in `mmtag.heads.scoring`, decisions are
tuned in `mmtag.decision.tuning`).
"""
from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import dist
from ..config import GROUP_BY, Config, default_cache_dir
from ..data import Dataset, LabelSpace, LabelVocab
from ..decision import Metrics, Scores, Thresholds, ValidationRecord, compute, decide
from ..decision.fitted import Fitted
from ..decision.scoring import head_scores, mean_scores_by
from ..decision.tuning import cross_fitted_decisions, decide_out_of_fold, tune
from ..encoders import Encoder
from ..errors import DataError, MmtagError
from ..features import FeatureCache, Features, FeatureSet
from ..features.pipeline import Featurizer
from ..heads import Head, create_model_head, head_needs, heads_with_branches
from ..heads.scoring import branch_only_logits, sigmoid
from . import bundle as bundle_io

if TYPE_CHECKING:  # training is imported by the methods that train, when they are called
    from ..training.checkpoint import RunLog
    from ..training.trainer import FitReport

log = logging.getLogger("mmtag")


@dataclass
class Prediction:
    """One item's predicted label ids, their names, and the score of every label.
    `modalities_used`: the inputs the answer read ("image", "text"); a late-fusion model given
    one input answers from that branch alone, and `note` then says so (None otherwise)."""

    labels: list[int]
    names: list[str]
    scores: dict[int, float]
    modalities_used: list[str] = field(default_factory=list)
    note: str | None = None


@dataclass
class BranchDecision:
    """How one branch of a late-fusion model decides when it answers alone. `source` says where
    its thresholds come from: "validation" — tuned, with the run's threshold mode, on that
    branch's own scores in the run's validation record (out of fold for a cross-fitted run), the
    principled choice, since the fused thresholds were tuned for fused scores; "union" — the
    union rule's thresholds of that branch (a union run without a record); "fused" — the fused
    thresholds, when the run kept no branch scores. `val_metrics`: the branch alone on the
    validation record (source "validation" only)."""

    branch: str
    thresholds: Thresholds
    source: str
    val_metrics: Metrics | None = None


@dataclass
class InputScores:
    """Scores of in-memory inputs, the thresholds that decide them, and what they were read from."""

    scores: Scores
    thresholds: Thresholds
    modalities_used: list[str]
    note: str | None = None


# What an input is called by the people who send it, per modality.
INPUT_NAMES = {"image": "image", "text": "caption"}


@dataclass
class DatasetPredictions:
    """Predictions for every row of a dataset, in input order."""

    dataset: Dataset
    probs: np.ndarray  # (N, C)
    mask: np.ndarray  # (N, C) bool
    labels: list[list[int]]


class Tagger:
    """A multi-label image+caption tagger: frozen encoders → cached features → fusion head."""

    def __init__(self, config: Config | None = None, *,
                 encoders: dict[str, Encoder] | None = None) -> None:
        """`encoders` (modality → encoder) replace the ones the config names, e.g. encoders
        already loaded for another run (`mmtag sweep`) or exported ones (`mmtag export`)."""
        self.config = config or Config()
        m = self.config.model
        self.featurizer = Featurizer(
            head_needs(m.head_name()), {"image": m.image_encoder, "text": m.text_encoder},
            FeatureCache(self.config.cache_dir or default_cache_dir()), encoders=encoders,
            workers=self.config.data.workers, random_init=m.random_init,
            runtime=self.config.feature_runtime, image_size=m.image_size, image_pool=m.image_pool)
        self.fitted: Fitted | None = None
        # branch → (validation record, thresholds, its decision): tuned once per learned state
        self._branch_decisions: dict[str, tuple[Any, Any, BranchDecision]] = {}
        # Set by `jobs.train`: per-epoch checkpoints and metrics.csv in the run directory.
        self.run_log: RunLog | None = None

    # ------------------------------------------------------------------ structure
    @property
    def head_name(self) -> str:
        return self.config.model.head_name()

    @property
    def needs(self) -> tuple[str, ...]:
        """Feature kinds the configured head reads."""
        return self.featurizer.kinds

    @property
    def modalities(self) -> list[str]:
        return self.featurizer.modalities

    @property
    def encoders(self) -> dict[str, Encoder]:
        return self.featurizer.encoders

    def state(self) -> Fitted:
        """The learned state; a one-line error when this Tagger was never fitted or loaded."""
        if self.fitted is None:
            raise MmtagError("this Tagger is not trained: call fit() or Tagger.load(run)")
        return self.fitted

    @property
    def label_space(self) -> LabelSpace:
        return self.state().label_space

    @property
    def thresholds(self) -> Thresholds:
        return self.state().thresholds

    @property
    def head(self) -> Head:
        return self.state().head

    @property
    def val_metrics(self) -> Metrics | None:
        return self.state().val_metrics

    @property
    def history(self) -> list[dict[str, float]]:
        return self.state().history

    @property
    def validation(self) -> ValidationRecord | None:
        return self.state().validation

    @property
    def finetune_history(self) -> dict[str, list[dict[str, float]]]:
        return self.state().finetune_history

    # ------------------------------------------------------------------ training
    def fit(self, train: Dataset, val: Dataset | None = None, *, unlabeled: Dataset | None = None,
            extra_text: Dataset | None = None, progress: bool = True) -> FitReport:
        """Train on `train`; validate on `val`, or on a seeded `val_frac` split of `train`.

        The data given decides the training strategies (see `mmtag.training.strategies`): with
        `config.finetune.modalities`, encoders are first fine-tuned on the training rows; with
        `unlabeled` and `config.pseudo.rounds`, confident pseudo-labels of those rows join the
        training rows round by round (never validation); with `extra_text` (labelled captions
        without images) the text branch learns from those rows as well, which needs a text-only
        model or a late-fusion head (mean, union, gated).
        """
        from ..training.trainer import TrainInputs, fit, resolve

        inputs = TrainInputs(train=train, val=val, unlabeled=unlabeled, extra_text=extra_text)
        self.config = resolve(self.config, inputs)  # `auto` settled: the saved config says what ran
        self.fitted, report = fit(self.config, self.featurizer, inputs, run_log=self.run_log,
                                  progress=progress)
        return report

    def features(self, dataset: Dataset, *, skip_bad: bool = False, progress: bool = True,
                 distribute: bool = True) -> FeatureSet:
        """Cached features of the kinds this tagger needs (see `Featurizer.features`)."""
        return self.featurizer.features(dataset, skip_bad=skip_bad, progress=progress,
                                        distribute=distribute)

    def recalibrate(self, *, retune: bool = True, progress: bool = False) -> Metrics | None:
        """Re-score the run's validation split with the current encoders (e.g. after an int8
        export): the record and the metrics become those of the current encoders; with `retune`
        the thresholds are tuned on it again, as training did, otherwise they are kept. A
        cross-fitted run's record is its training rows: they are re-scored out of fold (each by
        the fold head that did not train on it) and its figures decided out of fold, as training
        did. None, and nothing changed, when the run kept no validation record, or its model reads
        images and they are not (or no longer) in the images folder the run read them from
        (`validation_images_dir`)."""
        state = self.state()
        rec = state.validation
        if rec is None:
            return None
        reads_images = "image" in self.modalities
        images_dir = self.validation_images_dir() if reads_images else None
        if reads_images and images_dir is None:
            return None  # nothing says where the validation images are
        data = Dataset(path=Path("validation"), image_ids=list(rec.image_ids),
                       captions=list(rec.captions), labels=None, images_dir=images_dir,
                       image_ext=self.config.data.image_ext)
        if reads_images and not all(data.image_path(i).is_file() for i in range(len(data))):
            return None
        feats = self.features(data, progress=progress).features
        y = rec.y_true.astype(np.float32)
        ls = state.label_space
        folds = self._record_folds()
        if folds:
            from ..training.trainer import out_of_fold_scores

            # The record's rows are the training rows, and the bagged head trained on four
            # fifths of each: they are scored, stacked and decided out of fold, as in training.
            scores = out_of_fold_scores(self.head, feats, y, folds)
            oof = decide_out_of_fold(self.config, scores, y, folds, ls,
                                     None if retune else state.thresholds)
            state.thresholds, state.val_metrics, decided = oof.thresholds, oof.metrics, oof.decided
            state.extra["folds"] = {**state.extra["folds"], "samples_f1": oof.fold_samples_f1}
        else:
            scores, decided = self.scores(feats), None
            if retune:
                state.thresholds, state.val_metrics = tune(self.config, scores, y, ls)
            else:
                state.val_metrics = compute(y, decide(scores, state.thresholds), ls.ids, ls.names)
        state.validation = replace(rec, probs=scores.probs, branches=scores.branches,
                                   decided=decided)
        return state.val_metrics

    def validation_images_dir(self) -> Path | None:
        """The images folder of the run's validation rows: the config's `data.images` (`mmtag
        train` sets it), else, for a Tagger fitted on Datasets, the one folder its recorded image
        paths lie in (each is <folder>/<ImageID><image_ext>); None when neither says."""
        if self.config.data.images:
            return Path(self.config.data.images)
        rec = self.state().validation
        if rec is None or not rec.image_paths:
            return None
        ext = self.config.data.image_ext
        folders = {Path(p).parents[len(Path(i + ext).parts) - 1]
                   for p, i in zip(rec.image_paths, rec.image_ids)}
        return folders.pop() if len(folders) == 1 else None

    def _record_folds(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """A cross-fitted run's folds over its validation record (its training rows); [] else."""
        state = self.state()
        crossfit = state.extra.get("folds")
        if not crossfit or state.validation is None:
            return []
        from ..training.trainer import fold_indices, folds_of  # the folds training drew

        if state.validation.fold is not None:
            return folds_of(state.validation.fold)
        # runs from before the record kept its folds drew them ungrouped from the labels alone
        seed = int(crossfit.get("seed", self.config.train.seed))
        return fold_indices(state.validation.y_true.astype(np.float32), int(crossfit["k"]), seed)

    def validation_decisions(self) -> np.ndarray | None:
        """The decisions the run's figures are of, on its validation record: the model's
        thresholds applied, or for a cross-fitted run each fold's rows decided by the rule tuned
        on the other folds' scores (as `val_metrics` is); None without a record."""
        rec = self.state().validation
        if rec is None:
            return None
        if rec.decided is not None:
            return rec.decided
        scores = Scores(probs=rec.probs, branches=rec.branches, union=self.head.decision == "union")
        folds = self._record_folds()
        if folds:
            return cross_fitted_decisions(self.config, scores, rec.y_true.astype(np.float32), folds,
                                          self.thresholds)
        return decide(scores, self.thresholds)

    # ------------------------------------------------------------------ prediction
    def scores(self, feats: Features) -> Scores:
        """The head's probabilities (and each branch's, for late fusion) on cached features."""
        return head_scores(self.head, feats)

    @property
    def branches(self) -> tuple[str, ...]:
        """The modalities whose branch answers alone, for items lacking the other modality (late
        fusion: image and text); () when every prediction needs all of `modalities`."""
        return tuple(b for b in self.head.branches if b in self.modalities)

    def can_predict_with(self, modalities: Collection[str]) -> bool:
        """Whether items that carry only `modalities` ("image", "text") can be predicted."""
        return self.head.can_predict_with([m for m in modalities if m in self.modalities])

    def branch_decision(self, branch: str) -> BranchDecision:
        """How `branch` decides when it answers alone (see `BranchDecision`); tuned once per
        learned state, so a server pays for it once."""
        state = self.state()
        if branch not in self.branches:
            raise MmtagError(f"this model (head '{self.head_name}') has no branch '{branch}' that "
                             f"answers alone; its branches: {', '.join(self.branches) or 'none'}")
        cached = self._branch_decisions.get(branch)
        if cached is not None and cached[0] is state.validation and cached[1] is state.thresholds:
            return cached[2]
        rec, thr = state.validation, state.thresholds
        if rec is not None and branch in rec.branches:
            thresholds, metrics = tune(self.config, Scores(probs=rec.branches[branch]),
                                       rec.y_true.astype(np.float32), state.label_space)
            decision = BranchDecision(branch, thresholds, "validation", metrics)
        elif branch in thr.branches:
            decision = BranchDecision(branch, Thresholds(thr.mode, thr.branches[branch]), "union")
        else:
            decision = BranchDecision(branch, thr, "fused")
        self._branch_decisions[branch] = (rec, thr, decision)
        return decision

    def score_inputs(self, images: list[Any] | None = None,
                     captions: list[str] | None = None) -> InputScores:
        """Scores of in-memory inputs and the thresholds that decide them. Given every input the
        model reads, the whole head answers; given one, a late-fusion head answers from that
        modality's branch alone (its own scores and `branch_decision`); other heads refuse."""
        state = self.state()
        given = [m for m, x in (("image", images), ("text", captions))
                 if x is not None and m in self.modalities]
        missing = [m for m in self.modalities if m not in given]
        if not given or not missing:  # nothing usable (the featurizer says what is needed), or all
            return InputScores(self.scores(self.featurizer.encode(images, captions)),
                               state.thresholds, list(self.modalities))
        branch = self.head.branch_for(given)
        if branch is None:
            raise MmtagError(
                f"this model needs {' and '.join(INPUT_NAMES[m] + 's' for m in missing)} (one per "
                f"item): head '{self.head_name}' fuses image and caption, so it cannot answer from "
                f"{' and '.join(INPUT_NAMES[m] + 's' for m in given)} alone (heads that can: "
                f"{', '.join(heads_with_branches())})")
        feats = self.featurizer.encode(images if branch == "image" else None,
                                       captions if branch == "text" else None, modalities=(branch,))
        scores = Scores(probs=sigmoid(branch_only_logits(self.head, branch, feats[branch])))
        return InputScores(scores, self.branch_decision(branch).thresholds, [branch],
                           f"{' and '.join(INPUT_NAMES[m] for m in missing)} missing: "
                           f"{branch} branch only")

    def predict_proba_dataset(self, dataset: Dataset, *, progress: bool = True,
                              top_k: int | None = None,
                              group_by: str | None = None) -> DatasetPredictions:
        """Scores and decisions for every row (a bad row raises: predictions cover all rows);
        `top_k` caps each row's labels (`decision.keep_top_k`). `group_by="ImageID"`: rows that
        share an ImageID (an image's several captions) get one answer, decided on their scores
        averaged, in the order of each image's first row (`dataset` holds those first rows).

        Under torchrun each rank scores its contiguous shard of the rows and every rank gets
        all rows back, in input order, each exactly once.
        """
        state = self.state()
        ctx = dist.context()
        part = dataset.subset(ctx.shard(len(dataset))) if ctx.distributed else dataset
        if group_by is not None and group_by.casefold() != GROUP_BY.casefold():
            raise MmtagError(f"--group-by {group_by!r}: rows can be grouped by {GROUP_BY} (the "
                             "image column), not by another column")

        def score() -> Scores:
            return self.scores(self.features(part, progress=progress, distribute=False).features)

        shards = dist.all_gather(dist.checked(score))  # in rank order: the input order
        scores = Scores(probs=np.concatenate([s.probs for s in shards]),
                        branches={k: np.concatenate([s.branches[k] for s in shards])
                                  for k in shards[0].branches},
                        union=shards[0].union)
        if group_by is not None:
            scores, first = mean_scores_by(scores, dataset.image_ids)
            dataset = dataset.subset(first)
        mask = decide(scores, state.thresholds, top_k=top_k)
        return DatasetPredictions(dataset=dataset, probs=scores.probs, mask=mask,
                                  labels=state.label_space.decode(mask))

    def predict_proba(self, images: list[Any] | None = None,
                      captions: list[str] | None = None) -> np.ndarray:
        """(N, C) label scores for in-memory inputs: image paths / PIL images, and captions;
        a late-fusion model given only one of the two scores with that branch (`score_inputs`)."""
        return self.score_inputs(images, captions).scores.probs

    def predict(self, images: list[Any] | None = None, captions: list[str] | None = None, *,
                top_k: int | None = None) -> list[Prediction]:
        """Label lists and per-label scores for in-memory inputs (no cache, no files needed).
        A late-fusion model given only images or only captions answers from that branch, decided
        by its own thresholds (`branch_decision`), and says so in `Prediction.note`; an
        early-fusion model refuses (MmtagError)."""
        state = self.state()
        answer = self.score_inputs(images, captions)
        scores = answer.scores
        mask = decide(scores, answer.thresholds, top_k=top_k)  # top_k: at most k labels an item
        ls = state.label_space
        out = []
        for row_p, row_m in zip(scores.probs, mask):
            idx = np.flatnonzero(row_m)
            out.append(Prediction(labels=[ls.ids[j] for j in idx], names=[ls.names[j] for j in idx],
                                  scores={ls.ids[j]: float(row_p[j]) for j in range(len(ls))},
                                  modalities_used=list(answer.modalities_used), note=answer.note))
        return out

    def thresholds_by_label(self, branch: str | None = None) -> dict[str, dict[int, float]]:
        """Decision thresholds per label id: {"fused": …}, or one map per branch when the
        decision is the union of each branch's labels; with `branch`, {branch: …}, the
        thresholds that branch decides by when it answers alone (`branch_decision`)."""
        thr, ls = self.thresholds, self.label_space
        if branch is not None:
            tables = {branch: self.branch_decision(branch).thresholds.values}
        else:
            tables = thr.branches if thr.branches else {"fused": thr.values}
        return {name: {i: float(np.broadcast_to(v, (len(ls),))[j]) for j, i in enumerate(ls.ids)}
                for name, v in tables.items()}

    def evaluate(self, dataset: Dataset, *, progress: bool = True) -> Metrics:
        """Metrics of this tagger's decisions on a labelled dataset.

        True labels the model does not know (absent from its training labels) are not dropped
        from the truth: a warning names them, and they are scored as labels the model never
        predicts, so each is a missed label (false negative) in every average and has its own
        per-class row, named "<name> (unknown)", with recall 0.
        """
        if not dataset.labelled:
            raise DataError(dataset.path, "evaluation needs a Labels column")
        preds = self.predict_proba_dataset(dataset, progress=progress)
        ls = self.label_space
        truth = preds.dataset.label_rows()
        y, mask, ids, names = ls.encode(truth), preds.mask, ls.ids, ls.names
        unknown = warn_unknown_labels(ls, truth, dataset.path,
                                      "they count as missed labels in the metrics",
                                      vocab=preds.dataset.vocab)
        if unknown:
            extra = LabelSpace.from_labels([list(unknown)], vocab=preds.dataset.vocab)
            y = np.hstack([y, extra.encode(truth)])
            mask = np.hstack([mask, np.zeros((len(mask), len(extra)), dtype=mask.dtype)])
            ids, names = ids + extra.ids, names + tuple(f"{n} (unknown)" for n in extra.names)
        return compute(y, mask, ids, names)

    # ------------------------------------------------------------------ persistence
    def save(self, run_dir: str | Path) -> dict[str, Any]:
        """Write the bundle (see `mmtag.model.bundle`); returns its manifest. It is built beside
        `run_dir` and moved into place complete, replacing a previous bundle there."""
        return bundle_io.save(run_dir, self.bundle())

    def bundle(self) -> bundle_io.Bundle:
        """Everything a saved run holds, for `bundle.save`."""
        state = self.state()
        return bundle_io.Bundle(
            config=self.config, label_space=state.label_space, thresholds=state.thresholds,
            head_name=self.head_name, dims=state.dims, head_state=state.head.state_dict(),
            encoders={m: self.featurizer.encoder(m) for m in self.modalities},
            val_metrics=state.val_metrics, history=state.history,
            # a cross-fitted run's per-fold figures go into metrics.json ("folds"): the ± std
            extra={"pseudo_rounds": state.extra.get("pseudo_rounds", []),
                   "finetune": state.finetune_history,
                   **({"folds": state.extra["folds"]} if state.extra.get("folds") else {})},
            validation=state.validation)

    @classmethod
    def load(cls, run_dir: str | Path, *, cache_dir: str | None = None) -> "Tagger":
        """Load a trained bundle (weights verified against the manifest's sha256)."""
        b = bundle_io.load(run_dir)
        config = b.config
        if cache_dir is not None:
            config.cache_dir = cache_dir
        return cls.from_bundle(b)

    @classmethod
    def from_bundle(cls, b: bundle_io.Bundle) -> "Tagger":
        """The Tagger a loaded bundle describes."""
        tagger = cls(b.config, encoders=b.encoders)
        head = create_model_head(b.head_name, b.dims, len(b.label_space), b.config.model,
                                 b.config.train.folds, b.config.train.stack)
        head.load_state_dict(b.head_state)
        head.eval()
        tagger.fitted = Fitted(label_space=b.label_space, head=head, dims=b.dims,
                               thresholds=b.thresholds, val_metrics=b.val_metrics,
                               history=b.history, validation=b.validation,
                               extra={"pseudo_rounds": b.extra.get("pseudo_rounds") or [],
                                      "finetune": b.extra.get("finetune") or {},
                                      **({"folds": b.extra["folds"]} if b.extra.get("folds") else {})})
        return tagger


def warn_unknown_labels(ls: LabelSpace, truth: list[list[int]], path: Path,
                        consequence: str, *, vocab: LabelVocab | None = None) -> dict[int, int]:
    """True labels the model does not know (id → rows), said once in a warning, never dropped
    silently from the truth. `vocab`: the one `truth` was read with (named labels are then
    listed by name)."""
    unknown = ls.unknown(truth)
    if unknown and dist.context().is_main:
        spell = vocab if vocab is not None and vocab.named else None
        rows = sum(1 for row in truth if any(label in unknown for label in row))
        listed = ", ".join(f"{spell.token(i)!r} ({n} row{'s' if n > 1 else ''})" if spell else
                           f"{i} ({n} row{'s' if n > 1 else ''})" for i, n in list(unknown.items())[:20])
        more = f", and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        log.warning("%s: %d true label id(s) in %d row(s) are not in this model's label space: "
                    "%s%s; the model never predicts them; %s", path, len(unknown), rows, listed,
                    more, consequence)
    return unknown
