"""`mmtag audit`: what is wrong with a training CSV (label errors, duplicates, leaks, outliers),
from a cross-fitted run's out-of-fold scores and cached features (`jobs.audit_findings`), written
as issues.csv, audit.html (`jobs.audit_page`) and, asked for, a corrected copy of the CSV.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from ..data import CsvFormat, read_dataset
from ..errors import MmtagError
from ..io import atomic_write_text, csv_cell
from .audit_findings import FIX_MIN_SCORE, AuditResult, Change, Issue, find_issues, fixes
from .audit_page import render


ISSUE_COLUMNS = ["row", "ImageID", "kind", "label", "evidence", "score", "other_row", "other_file"]


def write_issues(path: Path, issues: list[Issue]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(ISSUE_COLUMNS)
    for i in issues:
        w.writerow([i.row, csv_cell(i.image_id), i.kind, csv_cell(i.label), csv_cell(i.evidence),
                    f"{i.score:.4f}", i.other or "", csv_cell(i.other_file)])
    atomic_write_text(path, buf.getvalue())


def write_fixed(src: Path, dst: Path, fmt: CsvFormat, changes: list[Change]) -> None:
    """A copy of the CSV `src` with the changed rows' labels rewritten, every other byte of each
    row kept as read (columns, quoting, label spelling and separator), written atomically."""
    with open(src, newline="", encoding="utf-8-sig") as fh:
        records = list(csv.reader(fh))
    header = records[0]
    col = header.index(fmt.labels_col)
    by_row = {c.row: c for c in changes}
    for n, record in enumerate(records[1:], 1):
        change = by_row.get(n)
        if change is not None:
            # keep the row's own order of the labels it keeps; added ones after them
            kept = [t for t in fmt.split_labels(record[col]) if t in change.after]
            record[col] = fmt.label_sep.join(kept + [t for t in change.after if t not in kept])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n" if _crlf(src) else "\n").writerows(records)
    atomic_write_text(dst, buf.getvalue())


def write_changes(path: Path, changes: list[Change], sep: str) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "ImageID", "before", "after", "why"])
    for c in changes:
        w.writerow([c.row, csv_cell(c.image_id), csv_cell(sep.join(c.before)),
                    csv_cell(sep.join(c.after)), csv_cell(c.why)])
    atomic_write_text(path, buf.getvalue())


def _crlf(path: Path) -> bool:
    with open(path, "rb") as fh:
        return b"\r\n" in fh.read(1 << 16)


# ----------------------------------------------------------------------------- the job
def audit(train_csv: str | Path, images: str | Path | None = None, *, run: str | Path | None = None,
          tests: list[str | Path] = (), out: str | Path = "audit", fix: str | Path | None = None,
          fix_min_score: float = FIX_MIN_SCORE, cache_dir: str | None = None,
          progress: bool = True) -> AuditResult:
    """Audit a training CSV: with `run`, from that cross-fitted run's out-of-fold scores and
    cached features; without, by cross-fitting the default model on it first. Writes
    OUT/issues.csv and OUT/audit.html (and with `fix`, a corrected copy of the CSV and
    OUT/changes.csv); the input is never modified."""
    from ..config import Config
    from ..model.tagger import Tagger

    train_csv, out = Path(train_csv), Path(out)
    if fix is not None and Path(fix).resolve() == train_csv.resolve():
        raise MmtagError(f"--fix {fix}: the corrected copy must be another file than the input")
    if not 0.0 <= fix_min_score <= 1.0:
        raise MmtagError(f"--fix-min-score must be in [0, 1], got {fix_min_score}")
    if run is not None:
        tagger = Tagger.load(run, cache_dir=cache_dir)
    else:
        cfg = Config().override({"train.folds": 5, **({"cache_dir": cache_dir} if cache_dir else {})})
        if images is None:
            cfg = cfg.override({"model.modalities": ["text"]})
        tagger = Tagger(cfg)
    cfg = tagger.config
    fmt = cfg.data.csv_format()
    use_images = images if "image" in cfg.model.modalities else None
    vocab = tagger.label_space.vocab if run is not None else None
    data, _ = read_dataset(train_csv, use_images, labelled=True, csv_format=fmt,
                           **({"vocab": vocab} if vocab is not None else {}))
    if run is None:
        if len(data) < 10:
            raise MmtagError(f"{train_csv}: {len(data)} rows; an audit cross-fits 5 folds and needs at least 10")
        tagger.fit(data, progress=progress)
    rec = tagger.validation
    if rec is None or not tagger.state().extra.get("folds"):
        raise MmtagError(f"{run}: not cross-fitted (it has no out-of-fold scores of its training "
                         "rows); train it with --folds 5, or audit without --run")
    if rec.image_ids != data.image_ids or rec.captions != data.captions:
        raise MmtagError(f"{train_csv} is not the CSV {run} was cross-fitted on ({len(data)} rows "
                         f"here, {len(rec.image_ids)} out-of-fold rows in the run, or other "
                         "ImageIDs or captions): audit the run's own training CSV")
    tests_read = []
    for t in tests:
        try:
            test, _ = read_dataset(t, use_images, labelled=False, csv_format=fmt)
        except MmtagError as exc:
            raise MmtagError(f"--test {t}: {exc} (read in the training CSV's layout)") from None
        tests_read.append(test)
    # features of the rows, from the cache cross-fitting filled
    # (one process: `train --audit` runs it on rank 0 alone)
    feats = tagger.features(data, progress=progress, distribute=False).features
    features = {m: np.asarray(feats[m], dtype=np.float32) for m in ("image", "text") if m in feats}
    ls = tagger.label_space
    tokens = [ls.vocab.token(i) for i in ls.ids]
    y = rec.y_true.astype(np.int64)
    result = find_issues(data, y, np.asarray(rec.probs, dtype=np.float64), tokens, features,
                         tests_read)
    out.mkdir(parents=True, exist_ok=True)
    write_issues(out / "issues.csv", result.issues)
    atomic_write_text(out / "audit.html", render(result))
    if fix is not None:
        changes = fixes(result, y, fix_min_score)
        write_fixed(train_csv, Path(fix), fmt, changes)
        write_changes(out / "changes.csv", changes, fmt.label_sep)
    return result
