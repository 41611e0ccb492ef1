"""`mmtag evaluate` and `mmtag predict`: a saved run applied to a CSV."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from .. import dist
from ..data import read_dataset
from ..decision import Metrics
from ..errors import MmtagError
from ..io import atomic_write_text, check_writable_file
from ..model.tagger import DatasetPredictions, Tagger


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
