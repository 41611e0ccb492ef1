"""Reading the competition layout: `ImageID,Labels,Caption` CSVs and images at `<images>/<ImageID>`.

Other layouts are read through a `CsvFormat` (the `data.*_col`, `data.label_sep` and
`data.image_ext` options): other column names, another label separator, ImageIDs without their
file extension. Labels are integer ids (the competition format) or names (`cat dog`); named
labels get ids from a `LabelVocab` (see `read_csv`).

Nothing here drops a row silently: a bad row raises `DataError` naming file, row and line, or, with
`skip_bad=True`, is skipped and reported back in `ReadResult.skipped`.
"""
from __future__ import annotations

import csv
import difflib
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from .dataset import Dataset, LabelVocab
from ..errors import DataError, MmtagError, quoted

# Captions are encoded with a 128-token limit anyway; this bound stops a 100 MB "caption".
MAX_CAPTION_CHARS = 10_000
# The columns of the CSVs mmtag reads and writes (a submission is ImageID,Labels; --proba is
# ImageID and a column per label): a label of one of these names, in any case, would make a
# --proba file with two ImageID columns, or a Labels column a program cannot tell apart.
OUTPUT_COLUMNS = ("ImageID", "Labels", "Caption")


@dataclass(frozen=True)
class CsvFormat:
    """How a CSV is laid out: the config's `data.image_col`, `data.caption_col`,
    `data.labels_col`, `data.label_sep` and `data.image_ext` (see `DataConfig.csv_format`).
    Messages name each as its `mmtag` flag: the field name with dashes (`--caption-col`)."""

    image_col: str = "ImageID"
    caption_col: str = "Caption"
    labels_col: str = "Labels"
    label_sep: str = " "  # " ": any run of whitespace (the competition format)
    image_ext: str = ""  # appended to every ImageID to name its file: "139" + ".jpg"

    def split_labels(self, text: str) -> list[str]:
        """A Labels cell → its label tokens (surrounding spaces and empty tokens dropped)."""
        if self.label_sep == " ":
            return text.split()
        return [t.strip() for t in text.split(self.label_sep) if t.strip()]

    def join_labels(self, tokens: list[str]) -> str:
        """Label tokens → one Labels cell, separated as the input's are."""
        return self.label_sep.join(tokens)


def flag(option: str) -> str:
    """The `mmtag` flag of a CsvFormat field: `caption_col` → `--caption-col`."""
    return "--" + option.replace("_", "-")


@dataclass
class ReadResult:
    """A parsed dataset plus the rows skipped under `skip_bad` (as DataErrors, in file order)."""

    dataset: Dataset
    skipped: list[DataError]


_LABEL = re.compile(r"[0-9]+")


def parse_labels(text: str) -> list[int]:
    """'1 3  19' → [1, 3, 19] (sorted, unique); raises ValueError naming the bad token.

    How an integer label is read. It is a string of ASCII digits: Python's int() also reads
    '1_8' as 18, '+3', and Arabic-Indic or full-width digits, none of which a label file means
    (`read_csv` refuses such a token rather than take it for a name).
    """
    out: set[int] = set()
    for token in text.split():
        if not _LABEL.fullmatch(token):
            kind = "negative" if _LABEL.fullmatch(token.removeprefix("-")) else "not an integer"
            raise ValueError(f"label {quoted(token)} is {kind} (labels are ASCII digits 0-9)")
        out.add(int(token))
    return sorted(out)


def check_image_id(image_id: str, column: str = "ImageID") -> None:
    """Reject ids that would escape the images directory (absolute paths, '..', drive letters)
    and ids with leading or trailing whitespace: an id names a file and is echoed in the
    submission, so it is used exactly, never trimmed into another name. `column`: the id
    column's name, for the message."""
    if not image_id:
        raise ValueError(f"{column} is empty")
    if image_id != image_id.strip():
        raise ValueError(f"{column} {quoted(image_id)} has leading or trailing spaces (ids are used exactly)")
    posix, win = PurePosixPath(image_id), PureWindowsPath(image_id)
    if posix.is_absolute() or win.is_absolute() or win.drive or ".." in posix.parts or ".." in win.parts:
        raise ValueError(f"{column} {quoted(image_id)} points outside the images directory")
    if "\x00" in image_id:
        raise ValueError(f"{column} contains a NUL byte")


def read_csv(path: str | Path, *, images_dir: str | Path | None = None,
             require_labels: bool = False, skip_bad: bool = False,
             csv_format: CsvFormat | None = None, vocab: LabelVocab | None = None) -> ReadResult:
    """Parse a competition CSV (train: ImageID,Labels,Caption; test: ImageID,Caption), or one
    laid out as `csv_format` says.

    A real CSV parser is used, so quoted captions with commas, quotes and embedded CR/LF parse.
    Labels are read when the header has a labels column (required if `require_labels`).

    Labels are integer ids or names, one kind per file. `vocab` None (training): the file
    decides; names get ids in their sorted order. A vocabulary given (the model's, or the
    training file's for a validation file) fixes the kind; names it lacks get new ids after its
    own (`LabelVocab.extended`). `ReadResult.dataset.vocab` spells the ids read.
    """
    path = Path(path)
    fmt = csv_format or CsvFormat()
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
        raise DataError(path, f"file is empty (expected a header {fmt.image_col},{fmt.labels_col},"
                        f"{fmt.caption_col})")

    try:
        header = next(csv.reader([physical[0]], strict=True), [])
    except csv.Error as exc:
        raise DataError(path, f"malformed header ({exc})", line=1) from None
    header = [h.strip() for h in header]
    col = _columns(path, header, fmt, require_labels)
    has_labels = "labels_col" in col
    labels_of = _LabelCells(fmt, vocab)

    ids: list[str] = []
    caps: list[str] = []
    labels: list[list[str]] = []  # each row's label tokens, given ids once the file is read
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
                    image_id, caption, row_labels = _parse_record(record, header, col, labels_of,
                                                                  seen_rows)
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
    label_ids, read_vocab = labels_of.ids(labels)
    dataset = Dataset(path=path, image_ids=ids, captions=caps,
                      labels=label_ids if has_labels else None,
                      images_dir=Path(images_dir) if images_dir is not None else None,
                      rows=rows, lines=lines, vocab=read_vocab, image_ext=fmt.image_ext)
    return ReadResult(dataset=dataset, skipped=skipped)


def _columns(path: Path, header: list[str], fmt: CsvFormat,
             require_labels: bool) -> dict[str, int]:
    """CsvFormat field (`image_col`, ...) → the header position of its column. A missing one is
    one error that lists the header and, for each, the flag to pass with the likeliest column:
    the competition's name for it, the same name in another case, the closest name, or the one
    column left over."""
    if len(header) == 1:
        for sep in (";", "\t", "|"):
            if sep in header[0]:
                shown = "tab" if sep == "\t" else repr(sep)
                raise DataError(path, f"the file must be comma-separated, but its header "
                                f"{quoted(header[0])} is separated by {shown}: save it as a CSV "
                                "with commas between fields", line=1)
    wanted = {"image_col": fmt.image_col, "caption_col": fmt.caption_col,
              "labels_col": fmt.labels_col}
    if len(set(wanted.values())) < len(wanted):
        raise DataError(path, "two of --image-col, --caption-col and --labels-col name the same "
                        f"column ({fmt.image_col!r}, {fmt.caption_col!r}, {fmt.labels_col!r})")
    for name in wanted.values():
        if header.count(name) > 1:
            # Otherwise one of the two silently wins, and a submission could list the wrong ids.
            raise DataError(path, f"column {name!r} appears more than once in the header "
                            f"{quoted(','.join(header))}", line=1)
    col = {option: header.index(name) for option, name in wanted.items() if name in header}
    missing = [o for o in ("image_col", "labels_col", "caption_col")
               if o not in col and (o != "labels_col" or require_labels)]
    if not missing:
        return col
    unclaimed = [h for h in header if h not in wanted.values()]
    fixes = []
    defaults = CsvFormat()
    for option in missing:
        default = getattr(defaults, option)  # a file in the competition layout, say
        guess = default if default in unclaimed else _closest(wanted[option], unclaimed,
                                                               alone=len(missing) == 1)
        if guess is not None:
            unclaimed.remove(guess)
        fixes.append(f"{flag(option)} {_shell_word(guess) if guess is not None else 'NAME'}")
    names = ", ".join(repr(wanted[o]) for o in missing)
    raise DataError(path, f"no column{'s' if len(missing) > 1 else ''} {names} (found: "
                    f"{', '.join(header)}); pass {' '.join(fixes)}", line=1)


def _closest(name: str, candidates: list[str], *, alone: bool) -> str | None:
    """The header column most likely meant for `name`: the same name in another case, else
    difflib's closest, else (`alone`: only one column is missing) the one unclaimed column."""
    same = [c for c in candidates if c.lower() == name.lower()]
    if same:
        return same[0]
    close = difflib.get_close_matches(name, candidates, n=1)
    if close:
        return close[0]
    return candidates[0] if alone and len(candidates) == 1 else None


def _shell_word(text: str) -> str:
    """`text` as one shell word, quoted only when it needs to be (a column name with spaces)."""
    return text if re.fullmatch(r"[\w.,:@%+=/-]+", text) else "'" + text.replace("'", "'\\''") + "'"


def _parse_record(record: list[str], header: list[str], col: dict[str, int],
                  labels_of: "_LabelCells", row: int) -> tuple[str, str, list[str]]:
    if len(record) != len(header):
        raise ValueError(f"has {len(record)} fields, the header has {len(header)}")
    fmt = labels_of.fmt
    image_id = record[col["image_col"]]
    check_image_id(image_id, fmt.image_col)
    caption = record[col["caption_col"]].strip()
    if not caption:
        raise ValueError(f"{fmt.caption_col} is empty")
    if len(caption) > MAX_CAPTION_CHARS:
        raise ValueError(f"{fmt.caption_col} is {len(caption)} characters long "
                         f"(limit {MAX_CAPTION_CHARS})")
    row_labels: list[str] = []
    if "labels_col" in col:
        row_labels = labels_of.tokens(record[col["labels_col"]], row)
        if not row_labels:
            raise ValueError(f"{fmt.labels_col} is empty (every item needs at least one label)")
    return image_id, caption, row_labels


# Reads as a number (signed, decimal, exponent, digit groups, any script's digits): a label
# like this is meant as an integer id, so it is refused as one (parse_labels), never taken as
# a name.
_NUMBER_LIKE = re.compile(r"[+-]?[\d_.]*\d[\d_.]*(?:[eE][+-]?\d+)?")


class _LabelCells:
    """One file's Labels cells → label tokens, and at the end ids: the file holds one kind of
    label, integer ids or names, decided by the vocabulary it is read with or else by its first
    label, so a stray name in an integer file (or the reverse) is an error on its row."""

    def __init__(self, fmt: CsvFormat, vocab: LabelVocab | None) -> None:
        self.fmt = fmt
        self.vocab = vocab
        # OUTPUT_COLUMNS and this file's own column names, case-folded → as spelled
        self.columns = {c.casefold(): c for c in (*OUTPUT_COLUMNS, fmt.image_col, fmt.labels_col,
                                                  fmt.caption_col)}
        self.named: bool | None = None if vocab is None else vocab.named
        self.first: tuple[int, str] | None = None  # (row, label) that decided the kind

    def tokens(self, cell: str, row: int) -> list[str]:
        """The unique label tokens of one cell, in order; ValueError saying what is wrong."""
        if self.fmt.label_sep == " " and "," in cell:
            raise ValueError(f"{self.fmt.labels_col} {quoted(cell.strip())} holds a comma, but labels "
                             "are separated by spaces; pass --label-sep , for comma-separated "
                             "labels")
        tokens = list(dict.fromkeys(self.fmt.split_labels(cell)))
        for token in tokens:
            if self.fmt.label_sep != " " and len(token.split()) > 1 \
                    and all(_LABEL.fullmatch(t) for t in token.split()):
                raise ValueError(f"{self.fmt.labels_col} {quoted(cell.strip())} holds ids separated by "
                                 f"spaces, but --label-sep is {self.fmt.label_sep!r}; pass "
                                 "--label-sep ' ' (the default) for space-separated labels")
        named, first = self.named, self.first
        for token in tokens:
            column = self.columns.get(token.casefold())
            if column is not None:
                raise ValueError(f"label {quoted(token)} is named like the column {quoted(column)} of "
                                 "mmtag's CSVs (case aside); rename the label")
            is_id = bool(_LABEL.fullmatch(token))
            if not is_id and _NUMBER_LIKE.fullmatch(token):
                parse_labels(token)  # raises why it is not an id: negative, not ASCII digits...
            if named is None:
                named, first = not is_id, (row, token)
            elif named == is_id:
                raise ValueError(self._mixed(token, is_id, first))
        self.named, self.first = named, first  # only a row read whole decides the file's kind
        return tokens

    def _mixed(self, token: str, is_id: bool, first: tuple[int, str] | None) -> str:
        what = f"label {quoted(token)} is {'an integer' if is_id else 'not an integer'}"
        if first is None:  # the kind came from the model's vocabulary
            if is_id:
                assert self.vocab is not None
                return f"{what}, but the model's labels are names (e.g. {quoted(self.vocab.names[0])})"
            return f"{what}, but the model's labels are integer ids"
        row, label = first
        kind = "a name" if is_id else "an integer id"
        return (f"{what}, but row {row}'s label {quoted(label)} is {kind}: a labels column holds "
                "integer ids or names, not both")

    def ids(self, rows: list[list[str]]) -> tuple[list[list[int]], LabelVocab]:
        """Every row's label ids (sorted) and the vocabulary that spells them."""
        vocab = self.vocab if self.vocab is not None else LabelVocab()
        if not self.named:
            return [sorted({int(t) for t in row}) for row in rows], vocab
        vocab = vocab.extended(t for row in rows for t in row)
        index = vocab.index()
        return [sorted(index[t] for t in row) for row in rows], vocab


def read_dataset(csv_path: str | Path, images: str | Path | None, *, labelled: bool,
                 skip_bad: bool = False, csv_format: CsvFormat | None = None,
                 vocab: LabelVocab | None = None) -> tuple[Dataset, list[DataError]]:
    """Read a CSV (strict unless skip_bad) and attach the images directory (see `read_csv`)."""
    if images is not None and not Path(images).is_dir():
        raise MmtagError(f"{images}: images directory not found")
    result = read_csv(csv_path, images_dir=images, require_labels=labelled, skip_bad=skip_bad,
                      csv_format=csv_format, vocab=vocab)
    if len(result.dataset) == 0:
        raise DataError(csv_path, "no usable rows")
    return result.dataset, result.skipped
