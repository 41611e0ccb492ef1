"""`mmtag evaluate` and `mmtag predict`: a saved run applied to a CSV.

The CSV is read as the run's config says (`data.image_col`, ..., saved at training), unless the
keyword arguments `image_col=`, `caption_col=`, `labels_col=`, `label_sep=`, `image_ext=` say
otherwise; its labels are read with the model's vocabulary, so a model trained on label names
reads names and writes names.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import dist
from ..data import CsvFormat, Dataset, read_dataset
from ..decision import Metrics, check_top_k
from ..errors import MmtagError, quoted
from ..io import atomic_write_text, check_writable_file, csv_cell
from ..model.tagger import DatasetPredictions, Tagger


def evaluate(run: str | Path, csv_path: str | Path, images: str | Path | None, *,
             progress: bool = True, cache_dir: str | None = None, image_col: str | None = None,
             caption_col: str | None = None, labels_col: str | None = None,
             label_sep: str | None = None, image_ext: str | None = None) -> Metrics:
    """Metrics of a saved run on a labelled CSV."""
    tagger = Tagger.load(run, cache_dir=cache_dir)
    fmt = tagger.config.data.csv_format(image_col=image_col, caption_col=caption_col,
                                        labels_col=labels_col, label_sep=label_sep,
                                        image_ext=image_ext)
    dataset = read_for(tagger, csv_path, images, fmt, labelled=True)
    return tagger.evaluate(dataset, progress=progress)


def predict(run: str | Path, csv_path: str | Path, images: str | Path | None, out: str | Path, *,
            progress: bool = True, cache_dir: str | None = None, proba: str | Path | None = None,
            top_k: int | None = None, image_col: str | None = None,
            caption_col: str | None = None, labels_col: str | None = None,
            label_sep: str | None = None, image_ext: str | None = None,
            group_by: str | None = None) -> DatasetPredictions:
    """Predict every row of a CSV and write `ImageID,Labels` atomically, in input order, the
    labels spelled as the training CSV spelled them (ids or names). `proba`: also write every
    label's probability per row (`write_probabilities`). `top_k`: at most k labels per row, the
    best-scoring of those the decision chose. `group_by="ImageID"`: one row per image, decided
    on the averaged scores of its rows (an image's several captions)."""
    if top_k is not None:
        check_top_k(top_k, "--top-k")  # before the model loads
    if dist.context().is_main:
        # before the model loads and every row is scored
        check_writable_file(out)
        if proba is not None:
            if Path(proba).resolve() == Path(out).resolve():
                raise MmtagError(f"{proba}: --proba must name another file than the submission")
            check_writable_file(proba)
    tagger = Tagger.load(run, cache_dir=cache_dir)
    fmt = tagger.config.data.csv_format(image_col=image_col, caption_col=caption_col,
                                        labels_col=labels_col, label_sep=label_sep,
                                        image_ext=image_ext)
    if proba is not None:
        proba_header(tagger.label_space.tokens)  # refused before any row is scored
    dataset = read_for(tagger, csv_path, images, fmt, labelled=False)
    preds = tagger.predict_proba_dataset(dataset, progress=progress, top_k=top_k, group_by=group_by)
    if dist.context().is_main:
        ls = tagger.label_space
        write_submission(out, preds.dataset.image_ids,
                         [[ls.vocab.token(i) for i in row] for row in preds.labels],
                         sep=fmt.label_sep)
        if proba is not None:
            write_probabilities(proba, preds.dataset.image_ids, preds.probs, ls.tokens)
    dist.barrier()
    return preds


def read_for(tagger: Tagger, csv_path: str | Path, images: str | Path | None, fmt: CsvFormat, *,
             labelled: bool) -> Dataset:
    """A CSV as `tagger` reads it: laid out as `fmt` says, labels in the model's vocabulary, its
    images only when the model uses them."""
    dataset, _ = read_dataset(csv_path, images if "image" in tagger.modalities else None,
                              labelled=labelled, csv_format=fmt, vocab=tagger.label_space.vocab)
    return dataset


def write_submission(path: str | Path, image_ids: list[str], labels: Sequence[Sequence[int | str]],
                     *, sep: str = " ") -> None:
    """`ImageID,Labels` CSV (each row's labels joined by `sep`), written via temp file + rename.
    A cell that would start like a spreadsheet formula (`=cmd`) gets a leading "'" (`csv_cell`)."""
    if len(image_ids) != len(labels):
        raise MmtagError("internal error: predictions do not cover every row")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["ImageID", "Labels"])
    for image_id, row in zip(image_ids, labels):
        writer.writerow([csv_cell(image_id), csv_cell(sep.join(str(x) for x in row))])
    atomic_write_text(path, buf.getvalue())


def write_probabilities(path: str | Path, image_ids: list[str], probs: np.ndarray,
                        labels: Sequence[str]) -> None:
    """`ImageID,<label>,<label>,...`: every label's probability (6 significant digits) per row,
    in input order, one column per label spelled as the user spells it; written atomically."""
    if probs.shape != (len(image_ids), len(labels)):
        raise MmtagError("internal error: probabilities do not cover every row and label")
    header = proba_header(labels)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for image_id, row in zip(image_ids, probs):
        writer.writerow([csv_cell(image_id), *(f"{float(p):.6g}" for p in row)])
    atomic_write_text(path, buf.getvalue())


def proba_header(labels: Sequence[str]) -> list[str]:
    """The `--proba` header: ImageID, then each label as a CSV cell (`csv_cell`). A label that
    would be a second column of one name is a one-line MmtagError: one named ImageID in any case
    (the reader refuses such labels; a bundle made before it did, or a Tagger fitted in Python,
    may hold one), or two labels written alike ('=x' and "'=x")."""
    header: list[str] = ["ImageID"]
    seen: dict[str, str] = {}  # cell → the label written as it
    for label in labels:
        cell = csv_cell(label)
        clash = "ImageID" if cell.casefold() == "imageid" else seen.get(cell)
        if clash is not None:
            raise MmtagError(f"label {quoted(label)} would be a second column {quoted(cell)} in "
                             f"the --proba CSV (beside {quoted(clash)}); rename the label")
        seen[cell] = label
        header.append(cell)
    return header
