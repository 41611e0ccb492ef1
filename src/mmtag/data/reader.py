"""Reading the competition layout: `ImageID,Labels,Caption` CSVs and images at `<images>/<ImageID>`.

Nothing here drops a row silently: a bad row raises `DataError` naming file, row and line, or, with
`skip_bad=True`, is skipped and reported back in `ReadResult.skipped`.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from .dataset import Dataset
from ..errors import DataError, MmtagError

# Captions are encoded with a 128-token limit anyway; this bound stops a 100 MB "caption".
MAX_CAPTION_CHARS = 10_000


@dataclass
class ReadResult:
    """A parsed dataset plus the rows skipped under `skip_bad` (as DataErrors, in file order)."""

    dataset: Dataset
    skipped: list[DataError]


_LABEL = re.compile(r"[0-9]+")


def parse_labels(text: str) -> list[int]:
    """'1 3  19' → [1, 3, 19] (sorted, unique); raises ValueError naming the bad token.

    The one place a Labels field is read. A label is a string of ASCII digits: Python's int()
    also reads '1_8' as 18, '+3', and Arabic-Indic or full-width digits, none of which a
    label file means.
    """
    out: set[int] = set()
    for token in text.split():
        if not _LABEL.fullmatch(token):
            kind = "negative" if _LABEL.fullmatch(token.removeprefix("-")) else "not an integer"
            raise ValueError(f"label {token!r} is {kind} (labels are ASCII digits 0-9)")
        out.add(int(token))
    return sorted(out)


def check_image_id(image_id: str) -> None:
    """Reject ids that would escape the images directory (absolute paths, '..', drive letters)
    and ids with leading or trailing whitespace: an id names a file and is echoed in the
    submission, so it is used exactly, never trimmed into another name."""
    if not image_id:
        raise ValueError("ImageID is empty")
    if image_id != image_id.strip():
        raise ValueError(f"ImageID {image_id!r} has leading or trailing spaces (ids are used exactly)")
    posix, win = PurePosixPath(image_id), PureWindowsPath(image_id)
    if posix.is_absolute() or win.is_absolute() or win.drive or ".." in posix.parts or ".." in win.parts:
        raise ValueError(f"ImageID {image_id!r} points outside the images directory")
    if "\x00" in image_id:
        raise ValueError("ImageID contains a NUL byte")


def read_csv(path: str | Path, *, images_dir: str | Path | None = None,
             require_labels: bool = False, skip_bad: bool = False) -> ReadResult:
    """Parse a competition CSV (train: ImageID,Labels,Caption; test: ImageID,Caption).

    A real CSV parser is used, so quoted captions with commas, quotes and embedded CR/LF parse.
    Labels are read when the header has a `Labels` column (required if `require_labels`).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, "is a directory, expected a CSV file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(path, "not valid UTF-8 text", line=line) from None

    # Split physical lines on LF only (keeping the ends), so line numbers match what an editor or
    # `grep -n` shows even when a quoted caption holds a lone CR; the csv module joins the lines
    # of a multi-line quoted field itself. A file with old-Mac CR-only line ends is split on CR.
    physical = re.split(r"(?<=\n)", text) if "\n" in text else re.split(r"(?<=\r)", text)
    physical = [line for line in physical if line]
    if not physical:
        raise DataError(path, "file is empty (expected a header ImageID,Labels,Caption)")

    try:
        header = next(csv.reader([physical[0]], strict=True), [])
    except csv.Error as exc:
        raise DataError(path, f"malformed header ({exc})", line=1) from None
    header = [h.strip() for h in header]
    for name in ("ImageID", "Labels", "Caption"):
        if header.count(name) > 1:
            # Otherwise one of the two silently wins, and a submission could list the wrong ids.
            raise DataError(path, f"column {name!r} appears more than once in the header "
                            f"{','.join(header)!r}", line=1)
    col = {name: i for i, name in enumerate(header)}
    missing = [c for c in ("ImageID", "Caption") if c not in col]
    if require_labels and "Labels" not in col:
        missing.insert(1, "Labels")
    if missing:
        raise DataError(path, f"missing column(s) {', '.join(missing)}; header is {','.join(header)!r}",
                        line=1)
    has_labels = "Labels" in col

    ids: list[str] = []
    caps: list[str] = []
    labels: list[list[int]] = []
    rows: list[int] = []
    lines: list[int] = []
    skipped: list[DataError] = []
    seen_rows = 0
    start = 1  # index into `physical` of the next record's first line
    while start < len(physical):
        reader = csv.reader(iter(physical[start:]), strict=True)
        record_line = start + 1
        try:
            for record in reader:
                seen_rows += 1
                line = record_line
                record_line = start + reader.line_num + 1
                if len(record) <= 1 and not "".join(record).strip():
                    seen_rows -= 1  # blank (or whitespace-only) lines are not rows
                    continue
                try:
                    if not any(f.strip() for f in record):
                        # `,,` is a record, unlike a blank line: something was meant to be here.
                        raise ValueError("every field is empty")
                    image_id, caption, row_labels = _parse_record(record, header, col, has_labels)
                except ValueError as exc:
                    err = DataError(path, str(exc), row=seen_rows, line=line)
                    if not skip_bad:
                        raise err from None
                    skipped.append(err)
                    continue
                ids.append(image_id)
                caps.append(caption)
                labels.append(row_labels)
                rows.append(seen_rows)
                lines.append(line)
            break
        except csv.Error as exc:
            message = str(exc)
            if "unexpected end of data" in message or "EOF" in message:
                message = "unterminated quote: a quoted field runs to the end of the file"
            seen_rows += 1
            err = DataError(path, f"malformed CSV ({message})", row=seen_rows, line=record_line)
            if not skip_bad:
                raise err from None
            skipped.append(err)
            # Resume on the line after the broken record's first line, so one stray quote
            # costs one row rather than the rest of the file.
            start = record_line
    dataset = Dataset(path=path, image_ids=ids, captions=caps,
                      labels=labels if has_labels else None,
                      images_dir=Path(images_dir) if images_dir is not None else None,
                      rows=rows, lines=lines)
    return ReadResult(dataset=dataset, skipped=skipped)


def _parse_record(record: list[str], header: list[str], col: dict[str, int],
                  has_labels: bool) -> tuple[str, str, list[int]]:
    if len(record) != len(header):
        raise ValueError(f"has {len(record)} fields, the header has {len(header)}")
    image_id = record[col["ImageID"]]
    check_image_id(image_id)
    caption = record[col["Caption"]].strip()
    if not caption:
        raise ValueError("Caption is empty")
    if len(caption) > MAX_CAPTION_CHARS:
        raise ValueError(f"Caption is {len(caption)} characters long (limit {MAX_CAPTION_CHARS})")
    row_labels: list[int] = []
    if has_labels:
        row_labels = parse_labels(record[col["Labels"]])
        if not row_labels:
            raise ValueError("Labels is empty (every item needs at least one label)")
    return image_id, caption, row_labels


def read_dataset(csv_path: str | Path, images: str | Path | None, *, labelled: bool,
                 skip_bad: bool = False) -> tuple[Dataset, list[DataError]]:
    """Read a CSV (strict unless skip_bad) and attach the images directory."""
    if images is not None and not Path(images).is_dir():
        raise MmtagError(f"{images}: images directory not found")
    result = read_csv(csv_path, images_dir=images, require_labels=labelled, skip_bad=skip_bad)
    if len(result.dataset) == 0:
        raise DataError(csv_path, "no usable rows")
    return result.dataset, result.skipped
