"""The Python API: `Tagger` (fit / predict / predict_proba / evaluate / save / load) and the
file-level jobs that the CLI, the server and the report call. Faces hold no logic; this does.

    from mmtag import Tagger
    tagger = Tagger.load("runs/fused")
    preds = tagger.predict(["a.jpg"], ["a man riding a horse"])
    preds[0].labels, preds[0].scores
"""
from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .model import bundle as bundle_io
from .model.bundle import ValidationRecord
from . import dist
from .model import rundir
from .training.checkpoint import RunLog
from .data.augment import ImageAugment, TextAugment, label_words, parse_image_aug, parse_text_aug
from .config import Config, default_cache_dir
from .data import (Dataset, ImageDecodeError, LabelSpace, check_images_decode, check_images_exist,
                   decode_image, read_csv, train_val_split)
from .encoders import (Encoder, EncoderInfo, ImageEncoder, TextEncoder, create_encoder,
                       list_encoders)
from .errors import DataError, MmtagError
from .features import (FeatureCache, Features, FeatureSet, concat_features, encode_captions,
                       encode_images, extract, extract_views)
from .heads import HEADS, Head, LateFusionHead, create_head, head_needs, takes_unpaired
from .io import atomic_write_text, check_writable_dir, check_writable_file
from .decision.metrics import Metrics, compute
from .training.losses import create_loss
from .training.pseudo import PseudoRound, select_pseudo_labels
from .decision.thresholds import Scores, Thresholds, decide, tune_decisions
from .training.loop import FitResult, fit_head, predict_outputs, seed_everything

log = logging.getLogger("mmtag")


@dataclass
class Prediction:
    """One item's predicted label ids, their names, and the score of every label."""

    labels: list[int]
    names: list[str]
    scores: dict[int, float]


@dataclass
class DatasetPredictions:
    """Predictions for every row of a dataset, in input order."""

    dataset: Dataset
    probs: np.ndarray  # (N, C)
    mask: np.ndarray  # (N, C) bool
    labels: list[list[int]]


@dataclass
class FitReport:
    """What `Tagger.fit` did: sizes, skipped rows and validation metrics."""

    n_train: int
    n_val: int
    val_dataset: Dataset | None = None
    skipped: list[DataError] = field(default_factory=list)
    val_metrics: Metrics | None = None
    best_epoch: int = 0
    pseudo_rounds: list[PseudoRound] = field(default_factory=list)


class Tagger:
    """A multi-label image+caption tagger: frozen encoders → cached features → fusion head."""

    def __init__(self, config: Config | None = None, *,
                 encoders: dict[str, Encoder] | None = None) -> None:
        """`encoders` (modality → encoder) replace the ones the config names, e.g. encoders
        already loaded for another run (`mmtag sweep`) or exported ones (`mmtag export`)."""
        self.config = config or Config()
        self.label_space: LabelSpace | None = None
        self.thresholds: Thresholds | None = None
        self.head: Head | None = None
        self.dims: dict[str, int] = {}
        self.encoders: dict[str, Encoder] = dict(encoders or {})
        self.val_metrics: Metrics | None = None
        self.history: list[dict[str, float]] = []
        self.pseudo_rounds: list[PseudoRound] = []
        self.finetune_history: dict[str, list[dict[str, float]]] = {}
        self.validation: ValidationRecord | None = None
        # Set by `train(..., out)`: per-epoch checkpoints and metrics.csv in the run directory.
        self.run_log: RunLog | None = None
        self.cache = FeatureCache(self.config.cache_dir or default_cache_dir())

    # ------------------------------------------------------------------ structure
    @property
    def head_name(self) -> str:
        return self.config.model.head_name()

    @property
    def needs(self) -> tuple[str, ...]:
        """Feature kinds the configured head reads."""
        return head_needs(self.head_name)

    @property
    def modalities(self) -> list[str]:
        kinds = self.needs
        return [m for m in ("image", "text") if any(k.startswith(m) for k in kinds)]

    def _encoder(self, modality: str) -> Encoder:
        if modality not in self.encoders:
            name = (self.config.model.image_encoder if modality == "image"
                    else self.config.model.text_encoder)
            self.encoders[modality] = create_encoder(name, modality,
                                                     random_init=self.config.model.random_init)
        enc = self.encoders[modality]
        if dist.device_of(enc) != dist.context().device:
            enc.to(dist.context().device)  # --device: features are computed where the encoder lives
        return enc

    def _check_fitted(self) -> None:
        if self.head is None or self.label_space is None or self.thresholds is None:
            raise MmtagError("this Tagger is not trained: call fit() or Tagger.load(run)")

    # ------------------------------------------------------------------ features
    def features(self, dataset: Dataset, *, skip_bad: bool = False, progress: bool = True,
                 distribute: bool = True) -> FeatureSet:
        """Cached features of the kinds this tagger needs; bad rows raise or (skip_bad) drop.
        Under torchrun the ranks share the computing (see `features.extract`)."""
        skipped: list[DataError] = []
        if "image" in self.modalities:
            dataset, skipped = check_images_exist(dataset, skip_bad=skip_bad)
        image_enc = self._encoder("image") if "image" in self.modalities else None
        text_enc = self._encoder("text") if "text" in self.modalities else None
        fs = extract(dataset, self.needs, image_encoder=image_enc,  # type: ignore[arg-type]
                     text_encoder=text_enc, cache=self.cache, skip_bad=skip_bad,  # type: ignore[arg-type]
                     workers=self.config.data.workers, progress=progress, distribute=distribute)
        fs.skipped = skipped + fs.skipped
        return fs

    def _dims(self, feats: Features) -> dict[str, int]:
        return {k: int(feats[k].shape[-1]) for k in self.needs}

    # ------------------------------------------------------------------ training
    def fit(self, train: Dataset, val: Dataset | None = None, *, unlabeled: Dataset | None = None,
            extra_text: Dataset | None = None, progress: bool = True) -> FitReport:
        """Train on `train`; validate on `val`, or on a seeded `val_frac` split of `train`.

        With `config.finetune.modalities`, encoders are first fine-tuned on the training rows
        (two-stage training). With `unlabeled` and `config.pseudo.rounds`, confident
        pseudo-labels of those rows join the training rows round by round (never validation).
        With `extra_text` (labelled captions without images) the text branch learns from those
        rows as well; that needs a text-only model or a late-fusion head (mean, union, gated).
        """
        if not train.labelled:
            raise DataError(train.path, "training data needs a Labels column")
        cfg = self.config.validate()  # a Config built in Python gets the checks files and flags get
        skip_bad = cfg.data.skip_bad
        skipped: list[DataError] = []
        # Missing images go first (--skip-bad), so the data check below counts the usable rows.
        if "image" in self.modalities:
            train, skipped = check_images_exist(train, skip_bad=skip_bad)
        _check_trainable(train, val, extra_text, dropped=len(skipped))
        if cfg.finetune.modalities:
            # Features depend on the fine-tuned encoders, so they come after the split and stage one.
            if "image" in cfg.finetune.modalities and "image" in self.modalities:
                # Fine-tuning reads images outside the cache, epoch after epoch: an undecodable
                # one is found (and under --skip-bad, dropped) before the first epoch.
                train, undecodable = check_images_decode(train, skip_bad=skip_bad, progress=progress)
                skipped += undecodable
                _check_trainable(train, val, extra_text, dropped=len(skipped))
            tr_data, va_data = self._split(train, val)
            self.label_space = LabelSpace.from_labels(tr_data.labels)  # type: ignore[arg-type]
            self._finetune(tr_data, va_data, progress=progress)
            tr = self.features(tr_data, skip_bad=skip_bad, progress=progress)
            va = self.features(va_data, skip_bad=skip_bad, progress=progress)
            skipped += tr.skipped + va.skipped
        else:
            full = self.features(train, skip_bad=skip_bad, progress=progress)
            if val is None:
                # undecodable images dropped under --skip-bad may leave too few rows to split
                _check_trainable(full.dataset, None, extra_text, dropped=len(skipped) + len(full.skipped))
                tr_idx, va_idx = self._split_indices(len(full.dataset))
                tr = FeatureSet(full.features.subset(tr_idx), full.dataset.subset(tr_idx))
                va = FeatureSet(full.features.subset(va_idx), full.dataset.subset(va_idx))
            else:
                tr, va = full, self.features(val, skip_bad=skip_bad, progress=progress)
            skipped += list(full.skipped) + (va.skipped if val is not None else [])
        tr_data, va_data = tr.dataset, va.dataset
        extra_labels = extra_text.labels if extra_text is not None else []
        self.label_space = LabelSpace.from_labels(tr_data.labels + extra_labels)  # type: ignore[operator]
        y_tr = self.label_space.encode(tr_data.labels)  # type: ignore[arg-type]
        y_va = self.label_space.encode(va_data.labels)  # type: ignore[arg-type]
        self.dims = self._dims(tr.features)
        if extra_text is not None:
            extra_text = _without_captions_of(extra_text, va_data)
            extra = self._extra_text_features(extra_text, progress=progress)
            y_extra = self.label_space.encode(extra_text.labels)  # type: ignore[arg-type]
            result = self._fit_unpaired(tr.features, y_tr, va.features, y_va, extra, y_extra,
                                        progress=progress)
        else:
            views = self._views(tr.dataset, progress=progress)
            result = self._fit_head(tr.features, y_tr, va.features, y_va, views=views,
                                    progress=progress)
        self.pseudo_rounds = []
        if unlabeled is None and cfg.pseudo.rounds > 0:
            log.warning("pseudo.rounds is %d but no unlabelled rows were given (--unlabeled CSV); "
                        "training without self-training", cfg.pseudo.rounds)
        if unlabeled is not None and cfg.pseudo.rounds > 0:
            result = self._self_train(result, unlabeled, tr.features, y_tr, va.features, y_va,
                                      progress=progress)
        self.head = result.head
        self.history = result.history_dicts()
        scores = self.scores(va.features)
        self._tune(scores, y_va)
        self.validation = ValidationRecord(
            probs=scores.probs, y_true=y_va, branches=scores.branches,
            image_ids=list(va_data.image_ids), captions=list(va_data.captions),
            image_paths=[str(va_data.image_path(i)) if "image" in self.modalities else ""
                         for i in range(len(va_data))])
        return FitReport(n_train=len(tr_data), n_val=len(va_data), val_dataset=va_data,
                         skipped=skipped, val_metrics=self.val_metrics, best_epoch=result.best_epoch,
                         pseudo_rounds=self.pseudo_rounds)

    def _tune(self, scores: Scores, y_va: np.ndarray) -> None:
        """Thresholds tuned on validation scores, and the validation metrics they give."""
        cfg = self.config
        assert self.label_space is not None
        ranges = {name: (float(r[0]), float(r[1])) for name, r in
                  (("image", cfg.train.union_image_range), ("text", cfg.train.union_text_range)) if r}
        self.thresholds = tune_decisions(cfg.train.thresholds, scores, y_va, ranges)
        self.val_metrics = compute(y_va, decide(scores, self.thresholds), self.label_space.ids,
                                   self.label_space.names)

    def recalibrate(self, *, progress: bool = False) -> Metrics | None:
        """Re-score the run's validation split with the current encoders (e.g. after an int8
        export) and re-tune the thresholds on it, as training did. None, and nothing changed,
        when the run kept no validation record or its images are no longer where they were."""
        rec = self.validation
        if rec is None or self.label_space is None:
            return None
        images_dir = None
        if "image" in self.modalities:
            # path = <images dir>/<ImageID>; one images folder per dataset
            dirs = {p[:len(p) - len(i)] for p, i in zip(rec.image_paths, rec.image_ids)}
            if len(dirs) != 1 or not all(Path(p).is_file() for p in rec.image_paths):
                return None
            images_dir = Path(dirs.pop())
        data = Dataset(path=Path("validation"), image_ids=list(rec.image_ids),
                       captions=list(rec.captions), labels=None, images_dir=images_dir)
        scores = self.scores(self.features(data, progress=progress).features)
        self._tune(scores, rec.y_true.astype(np.float32))
        self.validation = ValidationRecord(
            probs=scores.probs, branches=scores.branches, y_true=rec.y_true, image_ids=rec.image_ids,
            captions=rec.captions, image_paths=rec.image_paths)
        return self.val_metrics

    def _split(self, train: Dataset, val: Dataset | None) -> tuple[Dataset, Dataset]:
        if val is not None:
            return train, val
        tr_idx, va_idx = self._split_indices(len(train))
        return train.subset(tr_idx), train.subset(va_idx)

    def _split_indices(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The seeded train/validation split every training path uses."""
        return train_val_split(n, self.config.data.val_frac, self.config.train.seed)

    def _views(self, tr: Dataset, *, progress: bool) -> list[Features] | None:
        """`augment.views` cached augmented feature views of the training rows, or None."""
        aug = self.config.augment
        if aug.views <= 0:
            return None
        image_aug = self._image_augment() if "image" in self.modalities else None
        text_aug = self._text_augment() if "text" in self.modalities else None
        if image_aug is None and text_aug is None:
            raise MmtagError("--aug-views needs --image-aug or --text-aug for a modality the model uses")
        return extract_views(tr, self.needs, aug.views,
                             image_encoder=self.encoders.get("image"),  # type: ignore[arg-type]
                             text_encoder=self.encoders.get("text"),  # type: ignore[arg-type]
                             cache=self.cache, image_augment=image_aug, text_augment=text_aug,
                             seed=self.config.train.seed, workers=self.config.data.workers,
                             progress=progress)

    def _fit_head(self, tr: Features, y_tr: np.ndarray, va: Features, y_va: np.ndarray, *,
                  views: list[Features] | None = None, progress: bool, stage: str = "head") -> FitResult:
        """A fresh head of the configured kind, trained with early stopping on validation."""
        cfg = self.config
        assert self.label_space is not None
        seed_everything(cfg.train.seed)
        head = create_head(self.head_name, self.dims, len(self.label_space), cfg.model)
        return fit_head(head, tr, y_tr, va, y_va, cfg.train,
                        criterion=create_loss(cfg.train.loss, y_tr), views=views, progress=progress,
                        run_log=self.run_log, stage=stage)

    def _extra_text_features(self, extra: Dataset, *, progress: bool) -> Features:
        if not extra.labelled:
            raise DataError(extra.path, "--extra-text needs a Labels column")
        if not takes_unpaired(self.head_name):
            late = [n for n in HEADS if n != "text" and takes_unpaired(n)]
            raise MmtagError(f"--extra-text needs --modalities text or a late-fusion head "
                             f"({', '.join(sorted(late))}); '{self.head_name}' needs both modalities per row")
        return extract(extra, ["text"], image_encoder=None, text_encoder=self._encoder("text"),  # type: ignore[arg-type]
                       cache=self.cache, progress=progress).features

    def _fit_unpaired(self, tr: Features, y_tr: np.ndarray, va: Features, y_va: np.ndarray,
                      extra: Features, y_extra: np.ndarray, *, progress: bool) -> FitResult:
        """Training with extra captions that have no image.

        A text-only head simply gets more rows. A late-fusion head is trained branch by branch:
        its text MLP on paired + extra captions, its image MLP on paired rows, then whatever
        combines them (the gate of `gated`) on paired rows with both branches frozen; validation
        (paired rows) picks each stage's best epoch and the thresholds.
        """
        cfg = self.config
        assert self.label_space is not None
        text_rows = Features({"text": np.concatenate([tr["text"], extra["text"]])})
        text_y = np.concatenate([y_tr, y_extra])
        if self.head_name == "text":
            return self._fit_head(text_rows, text_y, va, y_va, progress=progress)
        seed_everything(cfg.train.seed)
        head = create_head(self.head_name, self.dims, len(self.label_space), cfg.model)
        assert isinstance(head, LateFusionHead)
        for modality, rows, y in (("text", text_rows, text_y), ("image", tr, y_tr)):
            branch = create_head(modality, self.dims, len(self.label_space), cfg.model)
            fitted = fit_head(branch, rows, y, va, y_va, cfg.train,
                              criterion=create_loss(cfg.train.loss, y), progress=progress,
                              run_log=self.run_log, stage=f"branch-{modality}")
            getattr(head, modality).load_state_dict(fitted.head.net.state_dict())  # type: ignore[union-attr]
            getattr(head, modality).requires_grad_(False)
        if any(p.requires_grad for p in head.parameters()):
            return fit_head(head, tr, y_tr, va, y_va, cfg.train,
                            criterion=create_loss(cfg.train.loss, y_tr), progress=progress,
                            run_log=self.run_log, stage="combine")
        head.eval()
        return FitResult(head=head, history=fitted.history, best_epoch=fitted.best_epoch)

    def _self_train(self, result: FitResult, unlabeled: Dataset, tr: Features, y_tr: np.ndarray,
                    va: Features, y_va: np.ndarray, *, progress: bool) -> FitResult:
        """Pseudo-label rounds: label the unlabelled rows with the current head, keep the confident
        ones, retrain on train + pseudo rows; stop when validation sample-F1 stops improving."""
        cfg = self.config
        pool = self.features(unlabeled, skip_bad=cfg.data.skip_bad, progress=progress).features
        best = result
        best_f1 = _val_f1(best)
        self.pseudo_rounds.append(PseudoRound(0, 0, best_f1))
        for r in range(1, cfg.pseudo.rounds + 1):
            self.head = best.head
            keep, y_pseudo = select_pseudo_labels(self.scores(pool).probs, cfg.pseudo.confidence)
            train_feats = concat_features(tr, pool.subset(keep))
            train_y = np.concatenate([y_tr, y_pseudo])
            candidate = self._fit_head(train_feats, train_y, va, y_va, progress=progress,
                                       stage=f"pseudo-{r}")
            f1 = _val_f1(candidate)
            self.pseudo_rounds.append(PseudoRound(r, int(len(keep)), f1))
            log.info("pseudo-label round %d: %d rows, val sample-F1 %.4f", r, len(keep), f1)
            if f1 <= best_f1:
                break
            best, best_f1 = candidate, f1
        return best

    def _image_augment(self, *, finetuning: bool = False) -> ImageAugment | None:
        return parse_image_aug(self.config.augment.image_spec(finetuning))

    def _text_augment(self) -> TextAugment | None:
        assert self.label_space is not None
        # Words naming any label class are never replaced (a "dog" must stay a dog).
        return parse_text_aug(self.config.augment.text, protected=label_words(self.label_space.names))

    def _finetune(self, tr: Dataset, va: Dataset, *, progress: bool) -> None:
        """Stage one of two-stage training: replace encoders by task-fine-tuned copies."""
        from .training.finetune import finetune_image, finetune_text

        cfg = self.config
        assert self.label_space is not None
        y_tr = self.label_space.encode(tr.labels)  # type: ignore[arg-type]
        y_va = self.label_space.encode(va.labels)  # type: ignore[arg-type]
        for modality in cfg.finetune.modalities:
            if modality not in self.modalities:
                raise MmtagError(f"--finetune {modality}: this model does not use the {modality} modality")
            enc = self._encoder(modality)
            loss = create_loss(cfg.train.loss, y_tr)
            if modality == "text":
                res = finetune_text(enc, tr.captions, y_tr, va.captions, y_va,  # type: ignore[arg-type]
                                    cfg.finetune, loss=loss, seed=cfg.train.seed,
                                    augment=self._text_augment(), progress=progress)
            else:
                # Datasets, not paths: a bad image is reported with its CSV row, as extraction does.
                res = finetune_image(enc, tr, y_tr, va, y_va, cfg.finetune,  # type: ignore[arg-type]
                                     loss=loss, seed=cfg.train.seed, workers=cfg.data.workers,
                                     augment=self._image_augment(finetuning=True),
                                     progress=progress)
            self.encoders[modality] = res.encoder
            self.finetune_history[modality] = res.history

    # ------------------------------------------------------------------ prediction
    def scores(self, feats: Features) -> Scores:
        """The head's probabilities (and each branch's, for late fusion) on cached features."""
        assert self.head is not None
        logits, branches = predict_outputs(self.head, feats)
        return Scores(probs=_sigmoid(logits), branches={k: _sigmoid(v) for k, v in branches.items()},
                      union=self.head.decision == "union")

    def predict_proba_dataset(self, dataset: Dataset, *, progress: bool = True) -> DatasetPredictions:
        """Scores and decisions for every row (a bad row raises: predictions cover all rows).

        Under torchrun each rank scores its contiguous shard of the rows and every rank gets
        all rows back, in input order, each exactly once.
        """
        self._check_fitted()
        ctx = dist.context()
        part = dataset.subset(ctx.shard(len(dataset))) if ctx.distributed else dataset

        def score() -> tuple[np.ndarray, np.ndarray]:
            scores = self.scores(self.features(part, progress=progress, distribute=False).features)
            return scores.probs, decide(scores, self.thresholds)  # type: ignore[arg-type]

        shards = dist.all_gather(dist.checked(score))  # in rank order: the input order
        probs = np.concatenate([p for p, _ in shards])
        mask = np.concatenate([m for _, m in shards])
        return DatasetPredictions(dataset=dataset, probs=probs, mask=mask,
                                  labels=self.label_space.decode(mask))  # type: ignore[union-attr]

    def predict_proba(self, images: list[Any] | None = None,
                      captions: list[str] | None = None) -> np.ndarray:
        """(N, C) label scores for in-memory inputs: image paths / PIL images, and captions."""
        self._check_fitted()
        return self.scores(self._encode(images, captions)).probs

    def predict(self, images: list[Any] | None = None,
                captions: list[str] | None = None) -> list[Prediction]:
        """Label lists and per-label scores for in-memory inputs (no cache, no files needed)."""
        self._check_fitted()
        scores = self.scores(self._encode(images, captions))
        probs = scores.probs
        mask = decide(scores, self.thresholds)  # type: ignore[arg-type]
        ls = self.label_space
        assert ls is not None
        out = []
        for row_p, row_m in zip(probs, mask):
            idx = np.flatnonzero(row_m)
            out.append(Prediction(labels=[ls.ids[j] for j in idx], names=[ls.names[j] for j in idx],
                                  scores={ls.ids[j]: float(row_p[j]) for j in range(len(ls))}))
        return out

    def thresholds_by_label(self) -> dict[str, dict[int, float]]:
        """Decision thresholds per label id: {"fused": …}, or one map per branch when the
        decision is the union of each branch's labels."""
        self._check_fitted()
        thr, ls = self.thresholds, self.label_space
        assert thr is not None and ls is not None
        tables = thr.branches if thr.branches else {"fused": thr.values}
        return {name: {i: float(np.broadcast_to(v, (len(ls),))[j]) for j, i in enumerate(ls.ids)}
                for name, v in tables.items()}

    def _encode(self, images: list[Any] | None, captions: list[str] | None,
                batch_size: int = 32) -> Features:
        encoded: dict[str, np.ndarray] = {}
        if "image" in self.modalities and images is None:
            raise MmtagError("this model needs images (one per item)")
        if "text" in self.modalities and captions is None:
            raise MmtagError("this model needs captions (one per item)")
        sizes = {len(x) for x in (images, captions) if x is not None}
        if len(sizes) != 1:
            raise MmtagError(f"got {len(images or [])} images but {len(captions or [])} captions")
        n = sizes.pop()
        if n == 0:
            raise MmtagError("nothing to predict: no items given")
        if "image" in self.modalities:
            assert images is not None
            enc = self._encoder("image")
            assert isinstance(enc, ImageEncoder)
            chunks: dict[str, list[np.ndarray]] = {"image": [], "image_tokens": []}
            for start in range(0, n, batch_size):
                arrays = []
                for k, img in enumerate(images[start:start + batch_size]):
                    if not isinstance(img, (Image.Image, str, Path)):
                        raise MmtagError(f"image {start + k}: expected a file path or a PIL image, "
                                         f"got {type(img).__name__}")
                    try:
                        arrays.append(decode_image(img if isinstance(img, Image.Image) else Path(img),
                                                   enc.image_size))
                    except ImageDecodeError as exc:  # whatever the decoder raised (data._decoding)
                        if isinstance(img, Image.Image):
                            raise MmtagError(f"image {start + k}: {exc}") from None
                        raise DataError(img, str(exc)) from None
                out = encode_images(enc, torch.from_numpy(np.stack(arrays)))
                for kind in chunks:
                    chunks[kind].append(out[kind])
            encoded.update({kind: np.concatenate(chunks[kind]) for kind in self.needs if kind in chunks})
        if "text" in self.modalities:
            assert captions is not None
            enc = self._encoder("text")
            assert isinstance(enc, TextEncoder)
            encoded["text"] = np.concatenate([encode_captions(enc, list(captions[s:s + 128]))
                                              for s in range(0, n, 128)])
        return Features(encoded)

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
        assert ls is not None
        truth: list[list[int]] = preds.dataset.labels  # type: ignore[assignment]
        y, mask, ids, names = ls.encode(truth), preds.mask, ls.ids, ls.names
        unknown = _warn_unknown_labels(ls, truth, dataset.path,
                                       "they count as missed labels in the metrics")
        if unknown:
            extra = LabelSpace.from_labels([list(unknown)])
            y = np.hstack([y, extra.encode(truth)])
            mask = np.hstack([mask, np.zeros((len(mask), len(extra)), dtype=mask.dtype)])
            ids, names = ids + extra.ids, names + tuple(f"{n} (unknown)" for n in extra.names)
        return compute(y, mask, ids, names)

    # ------------------------------------------------------------------ persistence
    def save(self, run_dir: str | Path) -> dict[str, Any]:
        """Write the bundle (see `mmtag.bundle`); returns its manifest. It is built beside
        `run_dir` and moved into place complete, replacing a previous bundle there."""
        return bundle_io.save(run_dir, self._bundle())

    def _bundle(self) -> bundle_io.Bundle:
        self._check_fitted()
        for m in self.modalities:
            self._encoder(m)
        return bundle_io.Bundle(
            config=self.config, label_space=self.label_space, thresholds=self.thresholds,  # type: ignore[arg-type]
            head_name=self.head_name, dims=self.dims, head_state=self.head.state_dict(),  # type: ignore[union-attr]
            encoders={m: self.encoders[m] for m in self.modalities},
            val_metrics=self.val_metrics, history=self.history,
            extra={"pseudo_rounds": [asdict(r) for r in self.pseudo_rounds],
                   "finetune": self.finetune_history},
            validation=self.validation)

    @classmethod
    def load(cls, run_dir: str | Path, *, cache_dir: str | None = None) -> "Tagger":
        """Load a trained bundle (weights verified against the manifest's sha256)."""
        b = bundle_io.load(run_dir)
        config = b.config
        if cache_dir is not None:
            config.cache_dir = cache_dir
        tagger = cls(config)
        tagger.label_space, tagger.thresholds = b.label_space, b.thresholds
        tagger.dims, tagger.encoders = b.dims, b.encoders
        tagger.head = create_head(b.head_name, b.dims, len(b.label_space), config.model)
        tagger.head.load_state_dict(b.head_state)
        tagger.head.eval()
        tagger.val_metrics, tagger.history = b.val_metrics, b.history
        tagger.validation = b.validation
        tagger.finetune_history = b.extra.get("finetune") or {}
        return tagger


def _warn_unknown_labels(ls: LabelSpace, truth: list[list[int]], path: Path,
                         consequence: str) -> dict[int, int]:
    """True labels the model does not know (id → rows), said once in a warning, never dropped
    silently from the truth."""
    unknown = ls.unknown(truth)
    if unknown and dist.context().is_main:
        rows = sum(1 for row in truth if any(label in unknown for label in row))
        listed = ", ".join(f"{i} ({n} row{'s' if n > 1 else ''})" for i, n in list(unknown.items())[:20])
        more = f", and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        log.warning("%s: %d true label id(s) in %d row(s) are not in this model's label space: "
                    "%s%s; the model never predicts them; %s", path, len(unknown), rows, listed,
                    more, consequence)
    return unknown


def _check_trainable(train: Dataset, val: Dataset | None, extra_text: Dataset | None, *,
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


def _without_captions_of(extra: Dataset, val: Dataset) -> Dataset:
    """Extra rows minus those whose caption is also a validation caption: corpora built from the
    same source (e.g. two COCO-derived sets) share items, and a validation caption seen with its
    labels in training would inflate validation scores."""
    seen = {c.strip().lower() for c in val.captions}
    keep = [i for i, c in enumerate(extra.captions) if c.strip().lower() not in seen]
    if len(keep) < len(extra):
        log.warning("--extra-text: dropped %d row(s) whose caption is also a validation caption",
                    len(extra) - len(keep))
    return extra.subset(keep) if len(keep) < len(extra) else extra


def _val_f1(result: FitResult) -> float:
    return result.history[result.best_epoch - 1].val_samples_f1 if result.history else 0.0


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------------- file-level jobs
def read_dataset(csv_path: str | Path, images: str | Path | None, *, labelled: bool,
                 skip_bad: bool = False) -> tuple[Dataset, list[DataError]]:
    """Read a CSV (strict unless skip_bad) and attach the images directory."""
    if images is not None and not Path(images).is_dir():
        raise MmtagError(f"{images}: images directory not found")
    result = read_csv(csv_path, images_dir=images, require_labels=labelled, skip_bad=skip_bad)
    if len(result.dataset) == 0:
        raise DataError(csv_path, "no usable rows")
    return result.dataset, result.skipped


def train(train_csv: str | Path | None, images: str | Path | None, out: str | Path, config: Config,
          *, progress: bool = True, resume: bool = False, tensorboard: bool = False,
          overwrite: bool = False) -> tuple[Tagger, FitReport, dict[str, Any]]:
    """Read, train, tune, save: the whole `mmtag train` job. Returns tagger, report, manifest.

    `train_csv` / `images` default to the config's `data.train_csv` / `data.images`. The resolved
    config is written first to the directory the run trains in (OUT, or `.OUT.partial` while a
    finished run at OUT is replaced), so `train --config OUT/config.yaml` reproduces the run and
    `resume=True` continues it from its per-epoch checkpoints (see `mmtag.checkpoint`). The
    finished run (bundle, metrics.csv, report, manifest last) is assembled beside OUT and moved
    into place complete (see `mmtag.rundir`). A finished or interrupted run at OUT is refused
    unless `overwrite`; until the new run is complete, it stays exactly as it was.
    """
    out = Path(out)
    train_csv = train_csv or config.data.train_csv or None
    images = images or config.data.images or None
    if train_csv is None:
        raise MmtagError("no training CSV: give TRAIN_CSV or data.train_csv in the config")
    config.data.train_csv = str(Path(train_csv).resolve())
    config.data.images = str(Path(images).resolve()) if images else ""
    tagger = Tagger(config)
    if "image" in tagger.modalities and images is None:
        raise MmtagError("--images DIR is required when the image modality is used")
    image_dir = images if "image" in tagger.modalities else None
    writer = dist.context().is_main  # under torchrun, rank 0 alone writes the run directory
    # Before any expensive work: an --out that cannot work, or holds a run, is refused now.
    space = dist.checked(lambda: rundir.prepare(out, overwrite=overwrite, resume=resume)
                         if writer else None)
    try:
        if space is not None:
            config.save_yaml(space.work / "config.yaml")
            tagger.run_log = RunLog(space.work, tensorboard=tensorboard)
        dataset, skipped = read_dataset(train_csv, image_dir, labelled=True,
                                        skip_bad=config.data.skip_bad)
        unlabeled = None
        if config.data.unlabeled:
            unlabeled, pool_skipped = read_dataset(config.data.unlabeled, image_dir, labelled=False,
                                                   skip_bad=config.data.skip_bad)
            skipped += pool_skipped
        extra_text = None
        if config.data.extra_text:
            extra_text, extra_skipped = read_dataset(config.data.extra_text, None, labelled=True,
                                                     skip_bad=config.data.skip_bad)
            skipped += extra_skipped
        fit = tagger.fit(dataset, unlabeled=unlabeled, extra_text=extra_text, progress=progress)
        fit.skipped = skipped + fit.skipped
        manifest: dict[str, Any] = {}
        if space is not None:
            tagger.run_log.close()  # type: ignore[union-attr]
            work = space.work
            manifest = bundle_io.save(out, tagger._bundle(),
                                      add_files=lambda run: _add_run_files(work, run))
            space.finish()
    except Exception:
        if space is not None:
            space.abandon()
        raise
    finally:
        if tagger.run_log is not None:
            tagger.run_log.close()
    dist.barrier()  # no rank reports success before the bundle exists
    return tagger, fit, manifest


def _add_run_files(work: Path, run: Path) -> None:
    """Into the new bundle `run`, before its manifest: the training logs and the report."""
    import shutil

    if (work / "metrics.csv").is_file():
        shutil.copy2(work / "metrics.csv", run / "metrics.csv")
    if (work / "tensorboard").is_dir():
        shutil.copytree(work / "tensorboard", run / "tensorboard")
    report(run, progress=False)


def resume(run: str | Path, *, progress: bool = True,
           tensorboard: bool = False) -> tuple[Tagger, FitReport, dict[str, Any]]:
    """Continue an interrupted `train` from its saved config; it finishes into `run`."""
    run = Path(run)
    config = Config.from_yaml(rundir.resume_dir(run) / "config.yaml")
    return train(None, None, run, config, progress=progress, resume=True, tensorboard=tensorboard)


def evaluate(run: str | Path, csv_path: str | Path, images: str | Path | None, *,
             progress: bool = True, cache_dir: str | None = None) -> Metrics:
    """Metrics of a saved run on a labelled CSV."""
    tagger = Tagger.load(run, cache_dir=cache_dir)
    dataset, _ = read_dataset(csv_path, images if "image" in tagger.modalities else None, labelled=True)
    return tagger.evaluate(dataset, progress=progress)


def predict(run: str | Path, csv_path: str | Path, images: str | Path | None, out: str | Path, *,
            progress: bool = True, cache_dir: str | None = None) -> DatasetPredictions:
    """Predict every row of a CSV and write `ImageID,Labels` atomically, in input order."""
    if dist.context().is_main:
        check_writable_file(out)  # before the model loads and every row is scored
    tagger = Tagger.load(run, cache_dir=cache_dir)
    dataset, _ = read_dataset(csv_path, images if "image" in tagger.modalities else None, labelled=False)
    preds = tagger.predict_proba_dataset(dataset, progress=progress)
    if dist.context().is_main:
        write_submission(out, preds.dataset.image_ids, preds.labels)
    dist.barrier()
    return preds


def write_submission(path: str | Path, image_ids: list[str], labels: list[list[int]]) -> None:
    """`ImageID,Labels` CSV (labels space-separated), written via temp file + rename."""
    if len(image_ids) != len(labels):
        raise MmtagError("internal error: predictions do not cover every row")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["ImageID", "Labels"])
    for image_id, row in zip(image_ids, labels):
        writer.writerow([image_id, " ".join(str(x) for x in row)])
    atomic_write_text(path, buf.getvalue())


def export(run: str | Path, out: str | Path, *, format: str = "onnx", int8: bool = False) -> dict[str, Any]:
    """Write a copy of a run whose encoders run in ONNX Runtime (`mmtag export`); returns its
    manifest. `int8` quantises the text encoder. The head, thresholds and labels are unchanged."""
    import shutil

    from .model.export import export_encoders

    if format != "onnx":
        raise MmtagError(f"unknown export format '{format}' (available: onnx)")
    if Path(out).resolve() == Path(run).resolve():
        raise MmtagError(f"{out}: export into a new directory, not over the run itself")
    # Before the slow export: OUT must be new, empty or an mmtag run (replaced only when complete).
    rundir.inspect(out)
    check_writable_dir(Path(os.path.abspath(out)).parent)
    b = bundle_io.load(run)
    encoders, workdir = export_encoders(b.encoders, int8=int8)
    try:
        config = b.config
        for modality, enc in encoders.items():
            setattr(config.model, f"{modality}_encoder", enc.name)
        b.config, b.encoders, b.manifest = config, encoders, {}
        # int8 shifts the scores a little, so the thresholds are re-tuned on the run's own
        # validation split, scored by the export; the export then reports its own metrics.
        # Where that split cannot be replayed, the record (of the eager model) is dropped.
        tagger = Tagger.load(run)
        tagger.config, tagger.encoders = config, dict(encoders)
        recalibrated = tagger.recalibrate() is not None
        if recalibrated:
            b.thresholds, b.val_metrics, b.validation = (tagger.thresholds, tagger.val_metrics,  # type: ignore[assignment]
                                                         tagger.validation)
        else:
            b.validation = None
        b.extra = {**b.extra, "export": {"format": format, "int8": int8, "from_run": str(run),
                                         "from_manifest_sha256": bundle_io.manifest_sha256(run),
                                         "thresholds_retuned": recalibrated}}
        return bundle_io.save(out, b)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def report(run: str | Path, out: str | Path | None = None, *, csv_path: str | Path | None = None,
           images: str | Path | None = None, progress: bool = True) -> Path:
    """Write a self-contained HTML report of a run (default RUN/report.html): of its validation
    split, or with `csv_path`, of that labelled CSV scored by the run."""
    from .jobs.report import ReportData, render

    tagger = Tagger.load(run)
    assert tagger.label_space is not None and tagger.thresholds is not None
    if csv_path is not None:
        dataset, _ = read_dataset(csv_path, images if "image" in tagger.modalities else None,
                                  labelled=True)
        fs = tagger.features(dataset, progress=progress)
        d = fs.dataset
        _warn_unknown_labels(tagger.label_space, d.labels, dataset.path,  # type: ignore[arg-type]
                             "the report shows the model's own labels only (see mmtag evaluate)")
        scores = tagger.scores(fs.features)
        record = ValidationRecord(
            probs=scores.probs, branches=scores.branches,
            y_true=tagger.label_space.encode(d.labels),  # type: ignore[arg-type]
            image_ids=list(d.image_ids), captions=list(d.captions),
            image_paths=[str(d.image_path(i)) if "image" in tagger.modalities else ""
                         for i in range(len(d))])
        title = f"{Path(run).name} on {Path(csv_path).name}"
    elif tagger.validation is not None:
        record, title = tagger.validation, f"{Path(run).name}: validation split"
    else:
        raise MmtagError(f"{run}: no validation record in this run (an export, or trained before "
                         "mmtag kept one); use --csv to report on a labelled CSV")
    scores = Scores(probs=record.probs, branches=record.branches,
                    union=tagger.head.decision == "union")  # type: ignore[union-attr]
    mask = decide(scores, tagger.thresholds)
    ls = tagger.label_space
    data = ReportData(
        title=title, label_ids=list(ls.ids), label_names=list(ls.names), record=record, mask=mask,
        thresholds=tagger.thresholds, metrics=compute(record.y_true, mask, ls.ids, ls.names),
        history=tagger.history, finetune_history=tagger.finetune_history,
        config_yaml=_yaml(tagger.config.to_dict()))
    target = Path(out) if out is not None else Path(run) / "report.html"
    bundle_io.write_file(run, target, render(data))  # RUN/report.html: the manifest follows
    return target


def _yaml(obj: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)


@dataclass
class CheckReport:
    """What `mmtag check` found in a dataset (nothing trained, nothing written)."""

    path: Path
    rows: int  # data rows read, bad ones included
    labelled: bool
    label_counts: dict[int, int]  # label id → rows carrying it
    bad_rows: list[DataError]  # rows the reader refuses (quoting, labels, empty captions, paths)
    missing_images: list[DataError]
    corrupt_images: list[DataError]
    duplicate_ids: dict[str, int]  # ImageID → times it occurs (only those occurring twice or more)

    @property
    def problems(self) -> int:
        return (len(self.bad_rows) + len(self.missing_images) + len(self.corrupt_images)
                + len(self.duplicate_ids))


def check(csv_path: str | Path, images: str | Path | None = None, *,
          progress: bool = True) -> CheckReport:
    """Validate a dataset without training: every row parsed, every image opened and decoded."""
    from collections import Counter

    if images is not None and not Path(images).is_dir():
        raise MmtagError(f"{images}: images directory not found")
    result = read_csv(csv_path, images_dir=images, skip_bad=True)
    d = result.dataset
    counts: Counter[int] = Counter(label for row in (d.labels or []) for label in set(row))
    dup = {i: n for i, n in Counter(d.image_ids).items() if n > 1}
    missing: list[DataError] = []
    corrupt: list[DataError] = []
    escaped: list[DataError] = []
    if images is not None:
        present = []
        for i in range(len(d)):
            try:
                path = d.image_path(i)
            except DataError as err:  # a symlink leading outside the images directory: a bad row
                escaped.append(err)
                continue
            if path.is_file():
                present.append(i)
            else:
                missing.append(DataError(d.path, f"image {str(path)!r} not found", **d.where(i)))
        _, corrupt = check_images_decode(d.subset(present), skip_bad=True, progress=progress)
    return CheckReport(path=Path(csv_path), rows=len(d) + len(result.skipped), labelled=d.labelled,
                       label_counts=dict(sorted(counts.items())),
                       bad_rows=sorted(result.skipped + escaped, key=lambda e: e.row or 0),
                       missing_images=missing, corrupt_images=corrupt, duplicate_ids=dup)


def available_encoders() -> list[EncoderInfo]:
    """Encoders usable here and now (`mmtag encoders`)."""
    return list_encoders()


def info(run: str | Path) -> dict[str, Any]:
    """What a run holds: config, labels, thresholds, encoders (with hashes), metrics, size."""
    import json

    # Every file is validated first (encoders excepted: their weights are only parsed), so what
    # follows reads well-formed files.
    manifest = bundle_io.load(run, build_encoders=False).manifest
    run = Path(run)
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    return {
        "run": str(run),
        "head": manifest["head"],
        "encoders": manifest["encoders"],
        "labels": json.loads((run / "labels.json").read_text(encoding="utf-8")),
        "thresholds": json.loads((run / "thresholds.json").read_text(encoding="utf-8")),
        "validation": metrics.get("validation"),
        "config": Config.from_yaml(run / "config.yaml").to_dict(),
        "model_size_mb": manifest["model_size_mb"],
    }
