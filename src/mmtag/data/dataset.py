"""The dataset types: `LabelVocab` (how labels are spelled), `LabelSpace` (the ordered label ids a
model predicts), `Dataset` (the rows of one CSV and where each came from) and the seeded
train/validation split.

`mmtag.data.reader` builds a Dataset from a CSV; `mmtag.data.images` decodes its images.
"""
from __future__ import annotations

import csv
import io
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .coco import COCO_NAMES
from ..errors import DataError, MmtagError, quoted
from ..io import RUN_FILE_MAX_BYTES, read_bounded


@dataclass(frozen=True)
class LabelVocab:
    """How label ids are spelled in CSVs and submissions.

    Integer labels (`names` empty; the competition format): a label is its id, written as itself.
    Named labels (`cat dog`): `names[i]` is the user's spelling of label id i. Training gives the
    names of the training CSV ids in sorted order; a file read later with this vocabulary
    (validation, evaluation) keeps those ids and appends the names it adds (`extended`), so
    every id of every file read in that chain means one name.
    """

    names: tuple[str, ...] = ()

    @property
    def named(self) -> bool:
        return bool(self.names)

    def token(self, label_id: int) -> str:
        """How label `label_id` is written: its name, or the id itself for integer labels."""
        return self.names[label_id] if self.named else str(label_id)

    def index(self) -> dict[str, int]:
        """name → id (named labels)."""
        return {name: i for i, name in enumerate(self.names)}

    def extended(self, names: Iterable[str]) -> "LabelVocab":
        """This vocabulary with the names it lacks appended, in sorted order (ids unchanged)."""
        known = set(self.names)
        return LabelVocab(self.names + tuple(sorted({n for n in names if n not in known})))

    def extends(self, other: "LabelVocab") -> bool:
        """Whether every id of `other` means the same label here."""
        return self.named == other.named and self.names[:len(other.names)] == other.names


# How many characters of a label name people are shown (reports, `mmtag info`, the web page):
# a name can be any length (a 100 kB one trains), the full name stays in labels.json and outputs.
DISPLAY_CHARS = 40


def display_name(name: str, limit: int = DISPLAY_CHARS) -> str:
    """A label name as shown to people, on one line: whole when at most `limit` characters, else
    its first `limit`, an ellipsis and its full length (`tag…(102,400 chars)`). Characters that
    are not printable (a newline, a tab) show as U+FFFD, so a name never breaks a line."""
    short = name if len(name) <= limit else name[:limit]
    if not short.isprintable():
        short = "".join(c if c.isprintable() else "\ufffd" for c in short)
    return short if len(name) <= limit else f"{short}…({len(name):,} chars)"


COCO = "coco"  # data.label_names: the COCO category names (the competition's labels)


def label_names_of(spec: str) -> dict[int, str]:
    """The display names `data.label_names` (`--label-names`) asks for integer labels: none ({}:
    each label shown as itself), `coco` (COCO's category names), or a CSV file of `id,name`
    rows (a first row whose id is not an integer is a header; a name may hold commas)."""
    if not spec:
        return {}
    if spec.strip().lower() == COCO:
        return dict(COCO_NAMES)
    try:
        raw = read_bounded(spec, "label names file", RUN_FILE_MAX_BYTES)
        text = raw.decode("utf-8-sig")
    except OSError as e:
        raise DataError(spec, f"cannot read the label names file ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise DataError(spec, "the label names file is not UTF-8 text") from None
    names: dict[int, str] = {}
    for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not any(cell.strip() for cell in row):
            continue
        try:
            label = int(row[0])
        except ValueError:
            if n == 1:
                continue  # a header
            raise DataError(spec, f"label id {quoted(row[0])} is not an integer (rows are id,name)",
                            line=n) from None
        name = ",".join(row[1:]).strip()
        if not name:
            raise DataError(spec, f"label {label} has no name (rows are id,name)", line=n)
        if label in names:
            raise DataError(spec, f"label {label} is named twice", line=n)
        names[label] = name
    return names


@dataclass(frozen=True)
class LabelSpace:
    """The ordered set of label ids a model predicts, with display names, and the vocabulary
    that spells them (integer ids unless the training labels were names)."""

    ids: tuple[int, ...]
    names: tuple[str, ...]
    vocab: LabelVocab = LabelVocab()

    @classmethod
    def from_labels(cls, labels: list[list[int]], names: dict[int, str] | None = None,
                    vocab: LabelVocab = LabelVocab()) -> "LabelSpace":
        """Infer the label space from training labels (sorted ids). Display names: the user's
        names for named labels, else `names` (`label_names_of`) or the id itself: a label 3 is
        "3", not COCO's "car", unless names are asked for."""
        ids = tuple(sorted({label for row in labels for label in row}))
        if vocab.named:
            return cls(ids=ids, names=tuple(vocab.token(i) for i in ids), vocab=vocab)
        lookup = names or {}
        return cls(ids=ids, names=tuple(lookup.get(i, str(i)) for i in ids))

    @classmethod
    def of(cls, *datasets: "Dataset | None", names: dict[int, str] | None = None) -> "LabelSpace":
        """The labels of these datasets' rows (training rows, extra captions), spelled by their
        vocabulary. Files with named labels must have been read in one chain (each with the
        vocabulary of the one before; see `LabelVocab`), so their ids agree. `names`: the
        display names of integer labels (`label_names_of`)."""
        data = [d for d in datasets if d is not None]
        return cls.from_labels([row for d in data for row in (d.labels or [])], names=names,
                               vocab=shared_vocab(*data))

    @property
    def tokens(self) -> tuple[str, ...]:
        """Each label as the user writes it (in CSVs and submissions): a name or an id."""
        return tuple(self.vocab.token(i) for i in self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def encode(self, labels: list[list[int]]) -> np.ndarray:
        """Label lists → (N, C) 0/1 float32 matrix; ids outside the space are ignored (see
        `unknown` for what was ignored: evaluation must not hide them)."""
        index = {label: j for j, label in enumerate(self.ids)}
        y = np.zeros((len(labels), len(self.ids)), dtype=np.float32)
        for i, row in enumerate(labels):
            for label in row:
                j = index.get(label)
                if j is not None:
                    y[i, j] = 1.0
        return y

    def unknown(self, labels: list[list[int]]) -> dict[int, int]:
        """Label ids outside this space → number of rows carrying each (sorted by id)."""
        known = set(self.ids)
        counts = Counter(label for row in labels for label in set(row) if label not in known)
        return dict(sorted(counts.items()))

    def decode(self, mask: np.ndarray) -> list[list[int]]:
        """(N, C) boolean matrix → label id lists in label-space order."""
        return [[self.ids[j] for j in np.flatnonzero(row)] for row in mask]

    def to_dict(self) -> dict[str, list]:
        """`ids` and `names`, and `vocab` (the names, in id order) for named labels only, so an
        integer-labelled bundle is written as before and one without `vocab` reads as integers."""
        out: dict[str, list] = {"ids": list(self.ids), "names": list(self.names)}
        if self.vocab.named:
            out["vocab"] = list(self.vocab.names)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, list]) -> "LabelSpace":
        return cls(ids=tuple(int(i) for i in raw["ids"]), names=tuple(str(n) for n in raw["names"]),
                   vocab=LabelVocab(tuple(str(n) for n in raw.get("vocab") or ())))


@dataclass
class Dataset:
    """Rows of one CSV: image ids, captions, optional labels, and where the rows came from."""

    path: Path
    image_ids: list[str]
    captions: list[str]
    labels: list[list[int]] | None
    images_dir: Path | None = None
    rows: list[int] = field(default_factory=list)  # 1-based data row of each item, for messages
    lines: list[int] = field(default_factory=list)  # physical line where each record starts
    # how the label ids of `labels` are spelled (named labels: the names, see LabelVocab)
    vocab: LabelVocab = LabelVocab()
    image_ext: str = ""  # appended to each ImageID to name its file (`data.image_ext`)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def label_rows(self) -> list[list[int]]:
        """Every row's label ids; a DataError naming the file when it has no Labels column."""
        if self.labels is None:
            raise DataError(self.path, "needs a Labels column")
        return self.labels

    def image_path(self, i: int) -> Path:
        """`<images>/<ImageID><image_ext>`; DataError (with the row) when it resolves outside the
        images directory through a symlink, the way `check_image_id` refuses `../` in the id."""
        if self.images_dir is None:
            raise DataError(self.path, "no images directory given (--images)")
        path = self.images_dir / (self.image_ids[i] + self.image_ext)
        # Checked on every call, so no path handed out (to a decoder, a report) skips the check.
        try:
            target = path.resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop, before Python 3.13
            raise DataError(self.path, f"image {self.image_ids[i]!r}: cannot resolve its path "
                            f"({exc})", **self.where(i)) from None
        if not target.is_relative_to(self.images_dir.resolve()):
            raise DataError(self.path, f"image {self.image_ids[i]!r} is a symlink that resolves "
                            f"outside the images directory (to {str(target)!r})", **self.where(i))
        return path

    def subset(self, index: list[int] | np.ndarray) -> "Dataset":
        idx = [int(i) for i in index]
        return Dataset(
            path=self.path,
            image_ids=[self.image_ids[i] for i in idx],
            captions=[self.captions[i] for i in idx],
            labels=None if self.labels is None else [self.labels[i] for i in idx],
            images_dir=self.images_dir,
            rows=[self.rows[i] for i in idx] if self.rows else [],
            lines=[self.lines[i] for i in idx] if self.lines else [],
            vocab=self.vocab,
            image_ext=self.image_ext,
        )

    def where(self, i: int) -> dict[str, int | None]:
        """Row/line keywords for a DataError about item i."""
        return {"row": self.rows[i] if self.rows else None,
                "line": self.lines[i] if self.lines else None}


def shared_vocab(*datasets: Dataset | None) -> LabelVocab:
    """The vocabulary that spells the labels of all these datasets (the longest of theirs), or
    an MmtagError when their label ids disagree: files with named labels read one by one without
    passing on the vocabulary (`read_dataset(..., vocab=first.vocab)`) number their names apart."""
    data = [d for d in datasets if d is not None and d.labels]
    vocab = max((d.vocab for d in data), key=lambda v: len(v.names), default=LabelVocab())
    for d in data:
        if not vocab.extends(d.vocab):
            raise MmtagError(f"{d.path}: its labels were read with another label vocabulary than "
                             f"{data[0].path}'s; read each file after the first with "
                             "vocab=<the dataset read before it>.vocab")
    return vocab


def train_val_split(n: int, val_frac: float, seed: int,
                    groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split → (train_idx, val_idx), both sorted; at least one item in each. With
    `groups` (each row's group id, 0..G-1; see `data.groups`), whole groups go to one side: the
    groups in a seeded order fill the validation part until it holds `val_frac` of the rows."""
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"val_frac must be in (0, 1), got {val_frac}")
    if n < 2:
        raise ValueError(f"need at least 2 rows to split off validation, got {n}")
    rng = np.random.default_rng(seed)
    n_val = min(max(1, int(math.floor(n * val_frac + 0.5))), n - 1)
    if groups is None or len(np.unique(groups)) == n:  # one row per group: the row split
        perm = rng.permutation(n)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    groups = np.asarray(groups)
    n_groups = int(groups.max()) + 1
    if n_groups < 2:
        raise ValueError("every row is in one group (they share images or captions): "
                         "there is nothing to split off for validation")
    sizes = np.bincount(groups, minlength=n_groups)
    perm = rng.permutation(n_groups)
    # the fewest groups in that order reaching n_val rows, leaving at least one group to train on
    take = min(int(np.searchsorted(np.cumsum(sizes[perm]), n_val)) + 1, n_groups - 1)
    val = np.isin(groups, perm[:take])
    return np.flatnonzero(~val), np.flatnonzero(val)
