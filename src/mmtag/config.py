"""The one configuration tree of a run: dataclasses, loadable from YAML, overridable from the CLI.

Every option of `mmtag train` is a field here, so a saved `config.yaml` reproduces a run. Each
field also declares, once, which values it accepts (scikit-learn's `_parameter_constraints`
idea); `Config.validate` checks them all in one place, run by `from_dict`/`from_yaml`/`override`,
so a YAML file, a CLI flag and the Python API get the same one-line message before any work.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import registries
from .errors import MmtagError, quoted
from .io import CONFIG_MAX_BYTES, atomic_write_text, load_yaml

if TYPE_CHECKING:  # the reader's type, for annotations only
    from .data.reader import CsvFormat

FEATURE_RUNTIMES = ("auto", "onnx", "torch")  # Config.feature_runtime
IMAGE_POOLS = ("mean", "mean+max")  # ModelConfig.image_pool (features.IMAGE_POOL_KINDS: the same)
MODALITIES = ("image", "text")  # the inputs a model can read; one encoder field each below
AUTO = "auto"  # an option the trainer settles from the data (TrainConfig.resolved)
# --folds auto: 5 folds measured best out of fold (docs/results.md); below this many
# rows per fold the folds' validation rows are too few to stop on, so auto uses one split
AUTO_FOLDS = 5
AUTO_FOLDS_MIN_ROWS_PER_FOLD = 20


# ------------------------------------------------------------------------------ constraints
class Constraint:
    """The values one option accepts: `problem(value)` says what is wrong, or None if allowed.

    A problem reads after the option's name: "must be ..., got X" or "unknown ...; available: ..."."""

    def problem(self, value: Any) -> str | None:
        raise NotImplementedError

    def listing(self) -> Callable[[], Iterable[str]] | None:
        """The names a flag's help lists (`{names}`), read when the help is printed; None when
        the values are no list of names."""
        return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Interval(Constraint):
    """Finite numbers from `lo` to `hi` (None: unbounded); `closed` names the ends included."""

    lo: float | None = None
    hi: float | None = None
    closed: str = "both"  # both | left | right | neither
    integer: bool = False

    def describe(self) -> str:
        bounded = self.lo is not None and self.hi is not None
        kind = "an integer" if self.integer else "a number" if bounded else "a finite number"
        lo_in, hi_in = self.closed in ("both", "left"), self.closed in ("both", "right")
        if self.lo is not None and self.hi is not None:
            return (f"{kind} in {'[' if lo_in else '('}{_num(self.lo)}, "
                    f"{_num(self.hi)}{']' if hi_in else ')'}")
        if self.lo is not None:
            return f"{kind} {'>=' if lo_in else '>'} {_num(self.lo)}"
        if self.hi is not None:
            return f"{kind} {'<=' if hi_in else '<'} {_num(self.hi)}"
        return kind

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        lo_in, hi_in = self.closed in ("both", "left"), self.closed in ("both", "right")
        if self.lo is not None and (value < self.lo or (value == self.lo and not lo_in)):
            return False
        return not (self.hi is not None and (value > self.hi or (value == self.hi and not hi_in)))

    def problem(self, value: Any) -> str | None:
        return None if self.contains(value) else f"must be {self.describe()}, got {quoted(value)}"


@dataclass(frozen=True)
class OneOf(Constraint):
    """A name from a registry, read when checked: the registries live in modules that import
    torch, and a head or loss registered by a plugin must be accepted without editing this file."""

    what: str  # "fusion head"
    names: Callable[[], Iterable[str]]

    def problem(self, value: Any) -> str | None:
        names = list(self.names())
        return None if value in names else f"unknown {self.what} {quoted(value)}; available: {', '.join(names)}"

    def listing(self) -> Callable[[], Iterable[str]]:
        return self.names


@dataclass(frozen=True)
class SubsetOf(Constraint):
    """A list of distinct names from `names` (at least one unless `may_be_empty`)."""

    what: str
    names: tuple[str, ...] | Callable[[], Iterable[str]]  # a callable: a registry, read when checked
    may_be_empty: bool = False

    def problem(self, value: Any) -> str | None:
        names = list(self.names()) if callable(self.names) else list(self.names)
        unknown = [v for v in value if v not in names]
        if unknown:
            return f"unknown {self.what} {quoted(unknown[0])}; available: {', '.join(names)}"
        if len(set(value)) != len(value) or (not value and not self.may_be_empty):
            least = "" if self.may_be_empty else ", at least one"
            return f"must list distinct names from {', '.join(names)}{least}; got {quoted(value)}"
        return None

    def listing(self) -> Callable[[], Iterable[str]]:
        names = self.names
        return names if callable(names) else lambda: names


@dataclass(frozen=True)
class EncoderName(Constraint):
    """A registered encoder of `modality`, or PREFIX:NAME of a registered family (hf:, timm:).
    Checks the name only: whether its weights are on this machine is asked when it is built."""

    modality: str

    def problem(self, value: Any) -> str | None:
        prefix, _, rest = value.partition(":")
        if rest and prefix in registries.ENCODER_FAMILIES:  # hf:PATH: the family's to resolve
            from .encoders import registry as encoders

            try:
                encoders.encoder_entry(value, self.modality)
                return None
            except MmtagError:  # unknown, or a family (hf:, flip:) that cannot build it
                pass
        elif registries.encoder_modality(value) == self.modality:  # known without torch
            return None
        return (f"unknown {self.modality} encoder {quoted(value)}; "
                f"available: {', '.join(registries.encoder_names(self.modality))}")

    def listing(self) -> Callable[[], Iterable[str]]:
        return lambda: registries.encoder_names(self.modality)


@dataclass(frozen=True)
class Pattern(Constraint):
    """A string matching `regex` (whole, case-insensitive); `expected` says it in words."""

    regex: str
    expected: str
    exact: bool = False  # the value as it is: surrounding spaces are not forgiven

    def problem(self, value: Any) -> str | None:
        text = str(value) if self.exact else str(value).strip()
        if re.fullmatch(self.regex, text, flags=re.IGNORECASE):
            return None
        return f"must be {self.expected}, got {quoted(value)}"


class ImageAugSpec(Constraint):
    """`auto`, `none`/empty, or ops of `augment.IMAGE_OPS` ("crop,flip"), parsed by augment."""

    def problem(self, value: Any) -> str | None:
        from .data.augment import parse_image_aug

        if value.strip().lower() == "auto":
            return None
        try:
            parse_image_aug(value)
        except MmtagError as exc:
            return str(exc)
        return None

    def listing(self) -> Callable[[], Iterable[str]]:
        def names() -> Iterable[str]:
            from .data.augment import IMAGE_OPS

            return IMAGE_OPS
        return names


class TextAugSpec(Constraint):
    """`none`/empty or OP[:N] with OP in `augment.TEXT_OPS` and N >= 1. Syntax only: WordNet is
    looked for when the augmentation is built, so a bundle still loads on a machine without it."""

    def problem(self, value: Any) -> str | None:
        from .data.augment import TEXT_OPS

        text = value.strip().lower()
        if text in ("", "none"):
            return None
        op, sep, count = (part.strip() for part in text.partition(":"))
        if op not in TEXT_OPS or (sep and not (count.isdigit() and int(count) >= 1)):
            return (f"unknown caption augmentation {quoted(value)}; available: none, "
                    f"{', '.join(t + ':N' for t in TEXT_OPS)} (N >= 1)")
        return None

    def listing(self) -> Callable[[], Iterable[str]]:
        def names() -> Iterable[str]:
            from .data.augment import TEXT_OPS

            return [f"{op}:N" for op in TEXT_OPS]
        return names


@dataclass(frozen=True)
class AutoOr(Constraint):
    """`auto` (the trainer decides from the data it is given; see `TrainConfig.resolved`) or a
    value `inner` accepts."""

    inner: Constraint | None = None

    def problem(self, value: Any) -> str | None:
        if value == AUTO:
            return None
        problem = self.inner.problem(value) if self.inner is not None else None
        if problem is None and (self.inner is not None or isinstance(value, bool)):
            return None
        got = problem.split(", got ")[0].removeprefix("must be ") if problem else "true or false"
        return f"must be auto or {got}, got {quoted(value)}"


@dataclass(frozen=True)
class ZeroOr(Constraint):
    """0 (which means `zero`, e.g. "the encoder's own size") or a value `inner` accepts."""

    inner: Interval
    zero: str

    def problem(self, value: Any) -> str | None:
        if (value == 0 and not isinstance(value, bool)) or self.inner.contains(value):
            return None
        return f"must be 0 ({self.zero}) or {self.inner.describe()}, got {quoted(value)}"


class LabelSeparator(Constraint):
    """What separates the labels in a Labels cell: one character that cannot be part of a label
    id or break the CSV (no letter, digit, quote or line break); " " means any whitespace."""

    def problem(self, value: Any) -> str | None:
        if isinstance(value, str) and len(value) == 1 and not value.isalnum() \
                and value not in "\"\r\n":
            return None
        return f"must be one character such as ' ', ',' or ';' (not a letter, digit or quote), got {quoted(value)}"


class ThresholdRange(Constraint):
    """Empty (the full grid) or [lo, hi] with 0 <= lo <= hi <= 1."""

    def problem(self, value: Any) -> str | None:
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if not value or (numbers and len(value) == 2 and 0.0 <= value[0] <= value[1] <= 1.0):
            return None
        return f"must be empty or [lo, hi] with 0 <= lo <= hi <= 1, got {quoted(value)}"


def _heads() -> list[str]:
    return sorted(registries.names("fusion head"))


COLUMN = Pattern(r".+", "a column name")
POSITIVE = Interval(0, None, closed="neither")  # learning rates, ...
AT_LEAST_0 = Interval(0, None, integer=True)
AT_LEAST_1 = Interval(1, None, integer=True)
FRACTION = Interval(0, 1, closed="left")  # [0, 1)
OPTIMIZER = OneOf("optimizer", registries.lister("optimizer"))
FUSION_HEAD = OneOf("fusion head", _heads)  # also `mmtag ablate --variants`


def option(default: Any = dataclasses.MISSING, check: Constraint | None = None,
           flag: str | None = None, *, factory: Callable[[], Any] | None = None,
           help: str | None = None, metavar: str | None = None,
           choices: tuple[str, ...] | None = None, parse: Callable[[str], Any] | None = None) -> Any:
    """A config field with its constraint and, for an option of `mmtag train`, its flag (named
    in messages). The flag is made from this declaration alone (`flags`): `help` ("{default}"
    and "{names}" are filled in; a help without a default gets "(default: ...)" added), the
    `metavar`, `choices` and `parse` (the flag's text -> the value, where they are spelled
    differently, as `--finetune both`)."""
    meta = {"check": check, "flag": flag, "help": help, "metavar": metavar, "choices": choices,
            "parse": parse}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# What prediction can group rows by (`predict --group-by`): the image each row names, so an
# image listed with several captions gets one answer.
GROUP_BY = "ImageID"

# `mmtag audit --fix`: a label is changed only when its issue scores at least this (for a label
# issue, the out-of-fold probability against the given label).
AUDIT_FIX_MIN_SCORE = 0.9


# ------------------------------------------------------------------------------ the tree
@dataclass
class DataConfig:
    """How the input is read and split."""

    train_csv: str = ""  # labelled CSV (the TRAIN_CSV argument); saved so a run can be re-run
    images: str = ""  # images directory (--images)
    val_frac: float = option(0.1, Interval(0, 1, closed="neither"), "--val-frac", metavar="F",
                             help="validation fraction (default: {default}; implies --folds 1)")
    # rows sharing an image (file bytes) or a caption are one group, kept on one side of every
    # split: a copy on the other side makes every choice and figure made on validation optimistic
    group_rows: bool = option(True, flag="--group-rows",
                              help="keep rows that share an image or a caption on one side of "
                                   "every split (default: on; --no-group-rows splits rows alone)")
    skip_bad: bool = option(False, flag="--skip-bad", help="skip bad rows instead of failing")
    # DataLoader workers that decode JPEGs while the encoder computes
    workers: int = option(2, AT_LEAST_0, "--workers", metavar="N", help="image decoding workers")
    extra_text: str = option("", flag="--extra-text", metavar="CSV",
                             help="labelled captions without images (ImageID,Labels,Caption); "
                                  "the text branch learns from them too")
    unlabeled: str = option("", flag="--unlabeled", metavar="CSV",
                            help="unlabelled CSV for pseudo-label self-training")
    # the user's own labelled validation CSV (--val): every choice (epoch, thresholds) is made on
    # it instead of a val_frac split of the training rows
    val_csv: str = option("", flag="--val", metavar="CSV",
                          help="your own labelled validation CSV (images in --images): the epoch "
                               "and thresholds are chosen on it, not on a --val-frac split of "
                               "TRAIN_CSV")
    # How the CSVs are laid out (`mmtag.data.CsvFormat`); saved with the run, so evaluate and
    # predict read the same layout unless told otherwise.
    image_col: str = option("ImageID", COLUMN, "--image-col", metavar="NAME",
                            help="column of the image ids")
    caption_col: str = option("Caption", COLUMN, "--caption-col", metavar="NAME",
                              help="column of the captions")
    labels_col: str = option("Labels", COLUMN, "--labels-col", metavar="NAME",
                             help="column of the labels")
    # " " (the competition format) splits on any whitespace; labels are integer ids or names
    label_sep: str = option(" ", LabelSeparator(), "--label-sep", metavar="SEP",
                            help="what separates the labels in that column (default: a space)")
    # appended to each ImageID to name its image file, for ids written without it ("139" + ".jpg")
    image_ext: str = option("", Pattern(r"(\.[a-z0-9_-]+)*", "empty or a file extension such as .jpg",
                                        exact=True), "--image-ext", metavar="EXT",
                            help="file extension of the images when the ids carry none, e.g. .jpg "
                                 "(default: none, the ids are file names)")
    # the names integer labels are shown by (report, info, server): none, each label as itself;
    # `coco`, the COCO category names (the competition's presets); or a CSV file of id,name rows
    # (`mmtag.data.label_names_of`). Named labels are always shown as written.
    label_names: str = option("", flag="--label-names", metavar="coco|FILE",
                              help="names to show integer labels by: coco (the COCO category names) "
                                   "or a CSV file of id,name rows (default: none, each label shown "
                                   "as itself)")

    def csv_format(self, **overrides: str | None) -> "CsvFormat":
        """How these CSVs are read, with `overrides` (the image_col=, ... keyword arguments of
        evaluate, predict, check, report; None keeps the option) checked like their flags."""
        from .data.reader import CsvFormat

        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(CsvFormat)}
        for name, value in overrides.items():
            if name not in values:
                raise TypeError(f"unknown CSV option {name!r}; available: {', '.join(values)}")
            if value is None:
                continue
            f = _field(DataConfig, name)
            problem = f.metadata["check"].problem(value)
            if problem:
                raise MmtagError(_Where("config", {f"data.{name}"}).say(f"data.{name}", f, problem))
            values[name] = value
        return CsvFormat(**values)


@dataclass
class ModelConfig:
    """Which encoders feed which fusion head, and the head's hyper-parameters: each head reads
    the ones it names in `heads.Head.params` (the others are ignored), so they are saved in
    config.yaml and a bundle rebuilds its head from them."""

    modalities: list[str] = option(check=SubsetOf("modality", MODALITIES), flag="--modalities",
                                   factory=lambda: ["image", "text"], metavar="LIST",
                                   help="comma-separated, from {names}")
    image_encoder: str = option("efficientnet-lite0", EncoderName("image"), "--image-encoder",
                                metavar="NAME", help="image encoder: {names} (default: {default}; "
                                                     "timm: needs mmtag[timm])")
    # the side of the square images the image encoder reads; 0 keeps each encoder's own (224 for
    # efficientnet-lite0, 240 for -lite1, 260 for -lite2). Any other size is part of the
    # encoder's id (cached features of two sizes never mix); the bounds are
    # encoders.base.MIN_IMAGE_SIZE and MAX_IMAGE_SIZE (no multiple of 32 is needed: Lite1 and
    # Lite2 read 240 and 260, and the backbone is built for the size it reads)
    image_size: int = option(0, ZeroOr(Interval(32, 1024, integer=True), "the encoder's own size"),
                             "--image-size", metavar="N",
                             help="side in pixels of the images the image encoder reads (default: "
                                  "0, the encoder's own: 224 for efficientnet-lite0, 240 for -lite1, "
                                  "260 for -lite2)")
    # what the "image" vector every head (and a late-fusion head's image branch) reads is: the
    # mean of the image encoder's spatial tokens, or that and their max concatenated (twice as
    # wide). Applied by the feature pipeline (features.IMAGE_POOL_KINDS), so no head declares it
    image_pool: str = option("mean", OneOf("image pooling", lambda: IMAGE_POOLS), "--image-pool",
                             choices=IMAGE_POOLS,
                             help="the image vector the head reads: mean of the spatial tokens, "
                                  "or mean+max (both concatenated)")
    text_encoder: str = option("minilm-l6", EncoderName("text"), "--text-encoder", metavar="NAME",
                               help="text encoder: {names}, hf: being any local Hugging Face model")
    # mean (late fusion): out of fold on coco-real it learns from captions without images
    # (--extra-text) and, stacked, beat every other head (docs/results.md); concat needs
    # both modalities in every row
    fusion: str = option("mean", FUSION_HEAD, "--fusion", metavar="HEAD",
                         help="fusion head when both modalities are used: {names}")
    # allow encoders without pretrained weights (never silently)
    random_init: bool = option(False, flag="--random-init",
                               help="allow encoders without pretrained weights (random initialisation)")
    hidden: int = option(512, AT_LEAST_1, "--hidden", metavar="N",  # every head's classifier MLPs
                         help="hidden width of the head's classifier")
    dropout: float = option(0.5, FRACTION)
    # early fusion (concat, xattn): the common width each modality is projected to, so the 1280-d
    # image vector cannot drown the 384-d caption vector; also xattn's attention width
    proj_dim: int = option(256, AT_LEAST_1)
    # early fusion: 1280-d pooled image vectors overfit small training sets far faster than 384-d
    # caption vectors; dropping half of the image inputs while training gave +0.6 points of
    # validation sample-F1 for concat on coco-real (see bench/foundation.py), free at inference
    image_input_dropout: float = option(0.5, FRACTION)
    # gated: the gate only picks between two modalities; a narrow hidden layer is plenty and keeps
    # it from becoming a third classifier that overfits
    gate_hidden: int = option(64, AT_LEAST_1)
    attention_heads: int = option(4, AT_LEAST_1)  # xattn; must divide proj_dim

    def head_name(self) -> str:
        """The registered head that these modalities and this fusion choice select."""
        mods = set(self.modalities)
        if mods == {"image"}:
            return "image"
        if mods == {"text"}:
            return "text"
        return self.fusion


@dataclass
class TrainConfig:
    """Optimisation of the head on cached features."""

    # numpy's legacy seeding (np.random.seed) takes 32-bit unsigned seeds
    seed: int = option(0, Interval(0, 2**32 - 1, integer=True), "--seed", metavar="N",
                       help="random seed")
    epochs: int = option(100, AT_LEAST_1, "--epochs", metavar="N", help="most epochs of head training")
    patience: int = option(15, AT_LEAST_0, "--patience", metavar="N",
                           help="epochs without a better validation F1 (--metric) before stopping")
    batch_size: int = option(256, AT_LEAST_1, "--batch-size", metavar="N", help="batch size")
    lr: float = option(1e-3, POSITIVE, "--lr", metavar="F", help="learning rate")
    weight_decay: float = option(0.05, Interval(0, None))
    optimizer: str = option("adamw", OPTIMIZER, "--optimizer", metavar="NAME", help="{names}")
    loss: str = option("bce", OneOf("loss", registries.lister("loss")), "--loss", metavar="NAME",
                       help="{names}")
    # auto: global unless per-class or gfm clearly decides better on rows it was not tuned on.
    # The key keeps its first name; its flag is --decision (--thresholds: cli's older spelling)
    thresholds: str = option(
        "auto", OneOf("threshold mode", registries.lister("threshold mode")), "--decision",
        metavar="RULE",
        help="how scores become labels: {names} (default: {default}). global: one tuned threshold; "
             "per-class: one per label; balanced: per label, where false positives and false "
             "negatives balance; gfm: each item's expected-F1-maximising label set, nothing tuned; "
             "auto: of global, per-class and gfm, the one that scores best on validation rows it "
             "was not tuned on (global unless another clearly wins on enough rows)")
    # the figure every choice optimises (thresholds, auto's pick, the best epoch, ablate's and
    # sweep's ranking); the names are registries.METRICS's
    metric: str = option(
        "samples", OneOf("metric", registries.lister("metric")), "--metric", metavar="NAME",
        help="the F1 every choice optimises: {names} (default: {default}). samples: each item's "
             "F1, averaged (Kaggle's Mean F1); micro: every label decision pooled (overall "
             "precision and recall); macro: each label's F1, averaged, so a rare label counts "
             "as much as a common one")
    oversample: bool = option(False, flag="--oversample", help="repeat rows that carry rare labels")
    # union fusion: restrict each branch's threshold search to [lo, hi] (empty = the full grid)
    union_image_range: list[float] = option(check=ThresholdRange(), factory=list)
    union_text_range: list[float] = option(check=ThresholdRange(), factory=list)
    # cross-fitting: K > 1 trains a head per fold and chooses the decision on out-of-fold scores
    # of every training row (instead of a val_frac split); the model averages the K heads.
    # auto: 5 folds, or 1 (a split) with --val, --finetune or very few rows (see `resolved`)
    folds: int | str = option(AUTO, AutoOr(Interval(1, 50, integer=True)), "--folds", metavar="K",
                              help="cross-fitting: K > 1 trains a head per fold, chooses the epoch "
                                   "and the decision on out-of-fold scores of every row, and "
                                   "averages the K heads; 1: a --val-frac split (default: {default}: "
                                   "5, or 1 with --val, --val-frac, --finetune or under 100 rows)")
    # late fusion with --folds: per-label weights of the image and text branches, fitted on their
    # out-of-fold scores (logistic regression), instead of the head's own combination.
    # auto: on wherever it can be (folds >= 2 and a late-fusion head)
    stack: bool | str = option(AUTO, AutoOr(), "--stack",
                               help="late fusion (mean, gated) with --folds: per-label weights of "
                                    "the image and text branches, fitted on their out-of-fold "
                                    "scores (default: {default}, on whenever it can be)")
    # training strategies asked for by name, besides those the inputs switch on (--finetune,
    # --extra-text, --unlabeled); see mmtag.training.strategies
    strategies: list[str] = option(check=SubsetOf("training strategy", registries.lister("training strategy"), may_be_empty=True),
                                   factory=list)


    def resolved(self, *, n_rows: int, user_val: bool, finetuning: bool,
                 can_stack: bool) -> "TrainConfig":
        """A copy with `auto` settled for this data. Out-of-fold choices beat a 10% split on
        every dataset measured (docs/results.md), but a user's --val set is what they
        asked to choose on, and fine-tuning the encoders once per fold costs K times as much."""
        folds = self.folds
        if folds == AUTO:
            few = n_rows < AUTO_FOLDS * AUTO_FOLDS_MIN_ROWS_PER_FOLD
            folds = 1 if user_val or finetuning or few else AUTO_FOLDS
        stack = self.stack
        if stack == AUTO:
            stack = folds >= 2 and can_stack
        return dataclasses.replace(self, folds=folds, stack=stack)


def _finetune_modalities(text: str) -> list[str]:
    """`--finetune text|image|both` as the list of modalities it names."""
    return list(MODALITIES) if text == "both" else [text]


@dataclass
class FinetuneConfig:
    """Stage one of two-stage training: fine-tune encoders on the task before fitting the head."""

    # [], ["text"], ["image"] or both
    modalities: list[str] = option(check=SubsetOf("modality", MODALITIES, may_be_empty=True),
                                   flag="--finetune", factory=list,
                                   choices=("text", "image", "both"), parse=_finetune_modalities,
                                   help="two-stage: fine-tune these encoders on the task first")
    epochs: int = option(4, AT_LEAST_1, "--ft-epochs", metavar="N", help="fine-tuning epochs")
    # the encoder's learning rate; the task head gets head_lr
    lr: float = option(5e-5, POSITIVE, "--ft-lr", metavar="F",
                       help="fine-tuning encoder learning rate")
    head_lr: float = option(1e-3, POSITIVE, "--ft-head-lr", metavar="F",
                            help="fine-tuning task-head learning rate")
    batch_size: int = option(32, AT_LEAST_1, "--ft-batch-size", metavar="N",
                             help="fine-tuning batch size")
    warmup_frac: float = option(0.06, FRACTION)  # linear warm-up, then linear decay to zero
    weight_decay: float = option(0.01, Interval(0, None))
    optimizer: str = option("adamw", OPTIMIZER, "--ft-optimizer", metavar="NAME",
                            help="fine-tuning optimizer: {names}")
    # image encoder: how many of the last MBConv blocks are trained (its block count is the
    # upper bound, checked when the encoder is built)
    unfreeze_blocks: int = option(2, AT_LEAST_0, "--unfreeze-blocks", metavar="K",
                                  help="image fine-tuning: last K blocks trained")
    # text encoder: 0 = today's full fine-tuning; N = the lower layers frozen and computed once
    # per caption, only the top N transformer layers trained (several times faster on a CPU; its
    # layer count is the upper bound, checked when fine-tuning starts)
    top_layers: int = option(0, AT_LEAST_0, "--ft-top-layers", metavar="N",
                             help="text fine-tuning: train only the top N transformer layers, the "
                                  "lower ones computed once per caption (default: {default}, the "
                                  "whole encoder)")


@dataclass
class AugmentConfig:
    """Training-time augmentation (validation and test always see the plain input)."""

    # "crop,flip", "none"; auto = crop,flip whenever augmented views are used
    image: str = option("auto", ImageAugSpec(), "--image-aug", metavar="OPS",
                        help="image augmentation, comma-separated from {names}, or none (default: "
                             "{default}: crop,flip when the image encoder is fine-tuned or "
                             "--aug-views is set)")
    text: str = option("", TextAugSpec(), "--text-aug", metavar="OP",  # "synonyms:2"
                       help="caption augmentation: {names} (WordNet synonyms of N words; "
                            "default: {default})")
    # frozen encoders: K augmented views per training item cached, one drawn per epoch
    views: int = option(0, AT_LEAST_0, "--aug-views", metavar="K",
                        help="frozen encoders: cache K augmented views per training item, draw "
                             "one per epoch")

    def image_spec(self, finetuning_image: bool) -> str:
        if self.image != "auto":
            return self.image
        return "crop,flip" if finetuning_image or self.views > 0 else ""


@dataclass
class PseudoConfig:
    """Pseudo-label self-training on an unlabelled CSV (`--unlabeled`)."""

    rounds: int = option(0, AT_LEAST_0, "--pseudo-rounds", metavar="N", help="pseudo-label rounds")
    # a label is kept when its score is >= this, or <= 1 - this for all; at 0.5 or below both
    # would hold at once, at 1 no sigmoid score qualifies (see selftrain.select_pseudo_labels)
    confidence: float = option(0.9, Interval(0.5, 1, closed="neither"), "--pseudo-confidence",
                               metavar="F", help="score needed to trust a pseudo-label")


@dataclass
class Config:
    """A whole run's configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    # Empty: $MMTAG_CACHE or ~/.cache/mmtag, looked up when used, so a bundle carried to another
    # machine or user does not point at the trainer's cache.
    cache_dir: str = option("", flag="--cache-dir", metavar="DIR",
                            help="feature cache (default: $MMTAG_CACHE or ~/.cache/mmtag)")
    # auto | cpu | cuda | cuda:N (under torchrun, "cuda" = this rank's GPU); whether that device
    # exists here is asked when it is set up (dist.resolve_device)
    device: str = option("auto", Pattern(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N"),
                         "--device", help="auto, cpu, cuda or cuda:N (default: {default}, CUDA if "
                                          "available)")
    # mixed precision (fp16 autocast + grad scaling) on CUDA
    amp: bool = option(False, flag="--amp",
                       help="mixed precision (fp16 autocast) on CUDA; no effect on CPU")
    # What computes the features of frozen encoders: onnx = their ONNX Runtime twins (traced once
    # into the cache; 3.85x eager PyTorch for EfficientNet-Lite0 on 2 cores, per
    # bench/feature_runtime.py), torch = eager PyTorch, auto = onnx on a CPU where onnxruntime is
    # installed and the work repays the tracing
    feature_runtime: str = option("auto", OneOf("feature runtime", lambda: FEATURE_RUNTIMES),
                                  "--feature-runtime", choices=FEATURE_RUNTIMES,
                                  help="what computes the frozen encoders' features: onnx (ONNX "
                                       "Runtime, traced once into the cache; ~4x faster for images "
                                       "on a CPU), torch, or auto (onnx on a CPU when it repays "
                                       "the tracing)")
    preset: str = ""  # the preset this config started from, if any
    substitutions: list[str] = field(default_factory=list)  # "wanted -> used" backbone swaps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config") -> "Config":
        """Build and validate a Config from nested dicts; unknown keys and bad values are a
        one-line MmtagError that starts with `source` and names the option."""
        where = _Where(source)
        return _build(cls, raw or {}, "", where)._validate(where)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Config":
        return cls.from_dict(read_yaml_mapping(path, "config file"), source=str(path))

    def save_yaml(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def override(self, dotted: dict[str, Any], *, spelled: dict[str, str] | None = None) -> "Config":
        """Return a validated copy with `{"train.lr": 1e-3, ...}` applied; None values are
        ignored. A bad value names its flag first (`--lr (train.lr) must be ...`), or the
        spelling `spelled` gives for its key (an older flag name the user typed)."""
        raw = self.to_dict()
        applied = set()
        for key, value in dotted.items():
            if value is None:
                continue
            node = raw
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.get(p) if isinstance(node, dict) else None
            if not isinstance(node, dict) or leaf not in node or isinstance(node[leaf], dict):
                raise MmtagError(f"unknown config option {quoted(key)}")
            node[leaf] = value
            applied.add(key)
        where = _Where("config", applied, dict(spelled or {}))
        return _build(type(self), raw, "", where)._validate(where)

    def validate(self, source: str = "config") -> "Config":
        """Check every option against its declared constraint (and the few rules that tie two
        options together); raise a one-line MmtagError for the first bad one. Returns self."""
        return self._validate(_Where(source))

    def _validate(self, where: "_Where") -> "Config":
        for dotted, value, f in _leaves(self):
            check = f.metadata.get("check")
            problem = check.problem(value) if check is not None else None
            if problem:
                raise MmtagError(where.say(dotted, f, problem))
        self._check_combinations(where)
        return self

    def _check_combinations(self, where: "_Where") -> None:
        # What the chosen head reads is known from the registry without importing the head
        # (which imports this module): its `params`, declared or, for a plugin, its class's.
        model, name = self.model, self.model.head_name()
        if ("attention_heads" in (registries.HEADS.about(name, "params") or ())
                and model.proj_dim % model.attention_heads):  # each reads an equal slice
            raise MmtagError(where.say(
                "model.attention_heads", _field(ModelConfig, "attention_heads"),
                f"must divide model.proj_dim ({model.proj_dim}) for head '{name}', "
                f"got {model.attention_heads}"))
        aug = self.augment
        if aug.views > 0:
            kinds = model.modalities  # the head reads the modalities the model is given
            image = "image" in kinds and aug.image_spec(False).strip().lower() not in ("", "none")
            text = "text" in kinds and aug.text.strip().lower() not in ("", "none")
            if not (image or text):
                f = _field(AugmentConfig, "views")
                raise MmtagError(where.say("augment.views", f, "needs --image-aug or --text-aug "
                                           "for a modality the model uses"))


# ------------------------------------------------------------------------------ flags
@dataclass(frozen=True)
class Flag:
    """The command-line flag of one config option, made from its field's declaration: the
    commands build their parsers from these and map the values back by `key`, so adding an
    option to `mmtag train` is adding a field."""

    key: str  # "train.lr"
    name: str  # "--lr"
    help: str  # the default filled in; "{names}" is left for the parser to fill when printed
    kind: Any  # int, float, str; "switch" (given: on), "toggle" (--x / --no-x), "auto-int"
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    names: Callable[[], Iterable[str]] | None = None  # what "{names}" lists
    parse: Callable[[Any], Any] | None = None

    @property
    def dest(self) -> str:
        """The attribute argparse stores it under (`--batch-size` -> batch_size)."""
        return self.name.lstrip("-").replace("-", "_")

    def value(self, given: Any) -> Any:
        """The option's value for what the flag was given (None: not given, nothing to apply)."""
        return None if given is None else self.parse(given) if self.parse else given


def flags(root: type | None = None) -> dict[str, Flag]:
    """Every option of the config tree `root` (default: `Config`) that declares a flag, by
    dotted key, in declaration order. Read once per tree (each command's parser asks)."""
    return dict(_flags_of(root or Config))


@functools.cache
def _flags_of(root: type) -> dict[str, Flag]:
    found: dict[str, Flag] = {}

    def walk(node: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(node))
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif f.metadata.get("flag"):
                found[f"{prefix}{f.name}"] = _flag(f"{prefix}{f.name}", f, value, hints[f.name])

    walk(root(), "")
    return found


def _flag(key: str, f: dataclasses.Field, default: Any, hint: Any) -> Flag:
    meta = f.metadata
    if hint is bool:
        kind: Any = "toggle" if default else "switch"
    elif set(typing.get_args(hint)) == {bool, str}:
        kind = "toggle"  # auto, on or off
    elif set(typing.get_args(hint)) == {int, str}:
        kind = "auto-int"
    else:
        kind = hint if hint in (int, float) else str
    help = meta.get("help") or ""
    if "{default}" not in help and "default:" not in help:
        help = f"{help} (default: {{default}})".lstrip()
    check = meta.get("check")
    return Flag(key=key, name=meta["flag"], help=help.replace("{default}", _shown(default)),
                kind=kind, metavar=meta.get("metavar"), choices=meta.get("choices"),
                names=check.listing() if check is not None else None, parse=meta.get("parse"))


def _shown(value: Any) -> str:
    """A default as help text shows it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value) if value != "" else "none"


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file → {}), or a one-line MmtagError.
    Read by `io.load_yaml`: at most `io.CONFIG_MAX_BYTES`, and no anchors or aliases."""
    raw = load_yaml(path, what, CONFIG_MAX_BYTES)
    if raw is not None and not isinstance(raw, dict):
        raise MmtagError(f"{path}: expected a mapping at the top level")
    return raw or {}


def default_cache_dir() -> str:
    """Feature cache shared by all runs of a user: $MMTAG_CACHE or ~/.cache/mmtag."""
    env = os.environ.get("MMTAG_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "mmtag")


# ------------------------------------------------------------------------------ building
@dataclass
class _Where:
    """How a message names an option: `FILE: train.lr` for a file's value, `--lr (train.lr)` for
    one set by `override` (CLI flags, sweep axes)."""

    source: str
    overridden: set[str] = field(default_factory=set)
    spelled: dict[str, str] = field(default_factory=dict)  # key -> the flag as the user typed it

    def say(self, dotted: str, f: dataclasses.Field | None, problem: str) -> str:
        flag = self.spelled.get(dotted) or (f.metadata.get("flag") if f is not None else None)
        if dotted in self.overridden:
            name = f"{flag} ({dotted})" if flag else dotted
        else:
            name = f"{self.source}: {dotted}"
        return f"{name} {problem}" if problem.startswith(("must", "needs")) else f"{name}: {problem}"


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _leaves(obj: Any, prefix: str = "") -> Iterable[tuple[str, Any, dataclasses.Field]]:
    """(dotted name, value, field) of every non-dataclass option, in declaration order."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, f


def _build(cls: type, raw: dict[str, Any], prefix: str, where: _Where) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise MmtagError(f"{where.source}: unknown option(s) {quoted(sorted(unknown, key=str))} in {cls.__name__}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise MmtagError(f"{where.source}: '{prefix}{name}' must be a mapping")
            kwargs[name] = _build(type(default), value, f"{prefix}{name}.", where)
        else:
            problem, kwargs[name] = _coerce(value, hints[name])
            if problem:
                raise MmtagError(where.say(f"{prefix}{name}", f, problem))
    return cls(**kwargs)


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(value: Any, hint: Any) -> tuple[str | None, Any]:
    """(problem, value) with YAML/CLI scalars converted to the field's type, so `lr: 1e-3` (a str
    in YAML 1.1) and `epochs: '5'` work, while `epochs: 2.5` or `skip_bad: maybe` are refused
    rather than silently truncated or read as false."""
    args = typing.get_args(hint)
    if str in args and len(args) == 2 and typing.get_origin(hint) is not list:  # `int | str`: auto or a value
        if isinstance(value, str) and value.strip().lower() == AUTO:
            return None, AUTO
        problem, value = _coerce(value, next(a for a in args if a is not str))
        return (problem.replace("must be ", "must be auto or ", 1) if problem else None), value
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (str,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            return f"must be a list, got {quoted(value)}", value
        items = []
        for v in value:
            problem, v = _coerce(v, item)
            if problem:
                return f"{problem} (in {quoted(list(value))})", value
            items.append(v)
        return None, items
    if hint is bool:
        text = str(value).strip().lower()
        if isinstance(value, bool):
            return None, value
        if isinstance(value, (int, str)) and text in _TRUE + _FALSE:
            return None, text in _TRUE
        return f"must be true or false, got {quoted(value)}", value
    if hint is int:
        number = _number(value)
        if number is None or not float(number).is_integer() or not math.isfinite(number):
            return f"must be an integer, got {quoted(value)}", value
        return None, int(number)
    if hint is float:
        number = _number(value)
        return (None, float(number)) if number is not None else (f"must be a number, got {quoted(value)}", value)
    if hint is str:
        if isinstance(value, (dict, list, tuple)):
            return f"must be a string, got {quoted(value)}", value
        return None, str(value)
    return None, value


def _number(value: Any) -> int | float | None:
    """An int or float from a number or numeric string; None for anything else (bools too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return None
    return None
