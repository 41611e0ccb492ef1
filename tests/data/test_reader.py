"""Tests for mmtag.data.reader: CSV reading (competition layout), labels and image ids.

Every input is generated under pytest's tmp_path; CSVs are written as bytes so line endings
(CRLF, bare CR, LF) are exactly what each test says they are.
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_helpers import HEADER, assert_data_error, crlf, write
from mmtag.data import (MAX_CAPTION_CHARS, CsvFormat, LabelVocab, check_image_id, parse_labels,
                        read_csv)
from mmtag.errors import DataError


# ----------------------------------------------------------------------------------------------
# 1. read_csv: parsing the competition layout
# ----------------------------------------------------------------------------------------------

def test_read_csv_crlf_quoted_captions_parse_exactly(tmp_path: Path) -> None:
    data = HEADER + crlf(
        b'a.jpg,1,plain caption',
        b'b.jpg,1 3  19,"a man, a plan, a canal"',
        b'c.jpg,2,"she said ""hi"" twice"',
        b'd.jpg,3,"line one\nline two"',
        b'e.jpg,4,"crlf one\r\ncrlf two"',
        b'f.jpg,5,"bare\rreturn"',
        b'g.jpg,6,"all, of ""them""\r\nand\nmore"',
        b'h.jpg,7,last',
    )
    path = write(tmp_path, data)
    result = read_csv(path, images_dir=tmp_path / "imgs", require_labels=True)
    ds = result.dataset
    assert result.skipped == []
    assert ds.path == path
    assert ds.labelled
    assert ds.image_ids == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg", "g.jpg", "h.jpg"]
    assert ds.captions == [
        "plain caption",
        "a man, a plan, a canal",
        'she said "hi" twice',
        "line one\nline two",
        "crlf one\r\ncrlf two",
        "bare\rreturn",
        'all, of "them"\r\nand\nmore',
        "last",
    ]
    assert ds.labels == [[1], [1, 3, 19], [2], [3], [4], [5], [6], [7]]
    assert ds.rows == [1, 2, 3, 4, 5, 6, 7, 8]
    # Records up to f.jpg have no bare CR, so their start lines are unambiguous.
    assert ds.lines[:6] == [2, 3, 4, 5, 7, 9]
    assert ds.images_dir == tmp_path / "imgs"
    assert ds.image_path(1) == tmp_path / "imgs" / "b.jpg"
    assert len(ds) == 8


def test_read_csv_lines_with_lf_and_multiline_records(tmp_path: Path) -> None:
    data = (b"ImageID,Labels,Caption\n"
            b'a.jpg,1,"one\ntwo\nthree"\n'
            b"b.jpg,2,single\n"
            b'c.jpg,3,"x\r\ny"\n'
            b"d.jpg,4,end")  # no trailing newline
    ds = read_csv(write(tmp_path, data)).dataset
    assert ds.captions == ["one\ntwo\nthree", "single", "x\r\ny", "end"]
    assert ds.rows == [1, 2, 3, 4]
    assert ds.lines == [2, 5, 6, 8]
    assert ds.where(3) == {"row": 4, "line": 8}


def test_read_csv_utf8_bom_header(tmp_path: Path) -> None:
    data = b"\xef\xbb\xbf" + HEADER + crlf("x.jpg,1,caf\u00e9 \u2013 ok".encode("utf-8"))
    ds = read_csv(write(tmp_path, data), require_labels=True).dataset
    assert ds.image_ids == ["x.jpg"]
    assert ds.captions == ["caf\u00e9 \u2013 ok"]
    assert ds.labels == [[1]]


def test_read_csv_test_layout_without_labels(tmp_path: Path) -> None:
    data = b"ImageID,Caption\r\n" + crlf(b"a.jpg,first", b'b.jpg,"second, quoted"')
    result = read_csv(write(tmp_path, data))
    ds = result.dataset
    assert ds.labels is None
    assert not ds.labelled
    assert ds.image_ids == ["a.jpg", "b.jpg"]
    assert ds.captions == ["first", "second, quoted"]
    assert ds.rows == [1, 2]
    assert ds.lines == [2, 3]
    assert ds.subset([1]).labels is None


def test_read_csv_columns_in_any_order_and_header_spaces(tmp_path: Path) -> None:
    data = b" Caption , ImageID ,Labels\r\n" + crlf(b'"hello, world",a.jpg,2 1', b"bye,sub/b.png,5")
    ds = read_csv(write(tmp_path, data), require_labels=True).dataset
    assert ds.image_ids == ["a.jpg", "sub/b.png"]
    assert ds.captions == ["hello, world", "bye"]
    assert ds.labels == [[1, 2], [5]]


def test_read_csv_blank_lines_are_ignored(tmp_path: Path) -> None:
    data = (HEADER
            + b"\r\n"                 # line 2: blank
            + b"a.jpg,1,first\r\n"    # line 3
            + b"\r\n\r\n"             # lines 4-5: blank
            + b"   \r\n"              # line 6: whitespace only
            + b'b.jpg,2,"two\r\nlines"\r\n'  # lines 7-8
            + b"\r\n"                 # line 9: blank
            + b"c.jpg,3,third\r\n"    # line 10
            + b"\r\n")                # line 11: trailing blank
    # (a record of empty fields, `,,`, is not a blank line: see test_read_csv_record_of_empty_fields)
    result = read_csv(write(tmp_path, data), require_labels=True)
    ds = result.dataset
    assert result.skipped == []
    assert ds.image_ids == ["a.jpg", "b.jpg", "c.jpg"]
    assert ds.captions == ["first", "two\r\nlines", "third"]
    assert ds.rows == [1, 2, 3]
    assert ds.lines == [3, 7, 10]


def test_read_csv_header_only_gives_empty_dataset(tmp_path: Path) -> None:
    result = read_csv(write(tmp_path, HEADER))
    assert len(result.dataset) == 0
    assert result.dataset.labels == []
    assert result.skipped == []


def test_line_numbers_match_grep_after_a_lone_cr_in_a_caption(tmp_path: Path) -> None:
    path = tmp_path / "cr.csv"
    path.write_bytes(b'ImageID,Labels,Caption\r\n0.jpg,1,"two\rlines"\r\n1.jpg,x,bad\r\n')
    with pytest.raises(DataError) as info:
        read_csv(path, require_labels=True)
    assert info.value.row == 2 and info.value.line == 3  # `grep -n bad` says line 3

# ----------------------------------------------------------------------------------------------
# 2. read_csv: strict errors
# ----------------------------------------------------------------------------------------------

# (name, records after the header, bad row, bad line, message fragments)
BAD_ROWS = [
    ("non_integer_label", [b"a.jpg,1,ok", b"b.jpg,1 x,bad"], 2, 3, ["'x'", "not an integer"]),
    ("negative_label", [b"a.jpg,-1,bad"], 1, 2, ["'-1'", "negative"]),
    ("empty_labels", [b"a.jpg,1,ok", b"b.jpg,,bad"], 2, 3, ["Labels is empty"]),
    ("blank_labels", [b'a.jpg,"   ",bad'], 1, 2, ["Labels is empty"]),
    ("empty_caption", [b"a.jpg,1,ok", b"b.jpg,2,"], 2, 3, ["Caption is empty"]),
    ("quoted_empty_caption", [b'a.jpg,2,""'], 1, 2, ["Caption is empty"]),
    ("blank_caption", [b'a.jpg,1,"  \r\n  "'], 1, 2, ["Caption is empty"]),
    ("too_many_fields", [b"a.jpg,1,ok", b"b.jpg,2,un,quoted"], 2, 3, ["4 fields", "header has 3"]),
    ("too_few_fields", [b"a.jpg,1"], 1, 2, ["2 fields", "header has 3"]),
    ("dotdot_id", [b"a.jpg,1,ok", b"../x.jpg,1,bad"], 2, 3, ["../x.jpg", "outside"]),
    ("nested_dotdot_id", [b"sub/../../x.jpg,1,bad"], 1, 2, ["outside"]),
    ("absolute_id", [b"/etc/passwd,1,bad"], 1, 2, ["/etc/passwd", "outside"]),
    ("windows_drive_id", [b"C:\\x.jpg,1,bad"], 1, 2, ["outside"]),
    ("windows_relative_drive_id", [b"C:x.jpg,1,bad"], 1, 2, ["outside"]),
    ("windows_dotdot_id", [b"..\\x.jpg,1,bad"], 1, 2, ["outside"]),
    ("unc_id", [b"\\\\server\\share\\x.jpg,1,bad"], 1, 2, ["outside"]),
    ("empty_id", [b",1,bad"], 1, 2, ["ImageID is empty"]),
    ("after_multiline", [b'a.jpg,1,"two\r\nlines"', b"b.jpg,x,bad"], 2, 4, ["'x'"]),
    ("after_blank_lines", [b"a.jpg,1,ok", b"", b"", b"b.jpg,,bad"], 2, 5, ["Labels is empty"]),
    ("caption_too_long", [b"a.jpg,1," + b"w" * (MAX_CAPTION_CHARS + 1)], 1, 2,
     [f"limit {MAX_CAPTION_CHARS}"]),
]


@pytest.mark.parametrize("records,row,line,fragments",
                         [pytest.param(r, row, line, f, id=name) for name, r, row, line, f in BAD_ROWS])
def test_read_csv_bad_row_raises_data_error(tmp_path: Path, records: list[bytes], row: int,
                                            line: int, fragments: list[str]) -> None:
    path = write(tmp_path, HEADER + crlf(*records))
    with pytest.raises(DataError) as info:
        read_csv(path, require_labels=True)
    assert_data_error(info.value, path, row, line, *fragments)


def test_read_csv_caption_at_limit_is_accepted(tmp_path: Path) -> None:
    caption = "w" * MAX_CAPTION_CHARS
    path = write(tmp_path, HEADER + crlf(b"a.jpg,1," + caption.encode()))
    assert read_csv(path).dataset.captions == [caption]


def test_read_csv_unterminated_quote_to_eof(tmp_path: Path) -> None:
    data = HEADER + crlf(
        b'a.jpg,1,"two\r\nlines"',          # row 1, lines 2-3
        b'b.jpg,2,"never closed',          # row 2, line 4: quote opens here
        b"c.jpg,3,plain",
        b"d.jpg,4,plain",
    )
    path = write(tmp_path, data)
    with pytest.raises(DataError) as info:
        read_csv(path)
    assert_data_error(info.value, path, 2, 4, "unterminated quote")


def test_read_csv_unterminated_quote_closed_by_a_later_quote(tmp_path: Path) -> None:
    # The stray quote on row 2 pairs with the opening quote of row 3; the error must still
    # point at the record where the stray quote opened, not where the parser noticed.
    data = HEADER + crlf(
        b"a.jpg,1,ok",
        b'b.jpg,2,"stray',                 # row 2, line 3
        b'c.jpg,3,"quoted, later"',
    )
    path = write(tmp_path, data)
    with pytest.raises(DataError) as info:
        read_csv(path)
    assert_data_error(info.value, path, 2, 3, "malformed CSV")


def test_read_csv_junk_after_closing_quote(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + crlf(b"a.jpg,1,ok", b'b.jpg,1,"closed"junk'))
    with pytest.raises(DataError) as info:
        read_csv(path)
    assert_data_error(info.value, path, 2, 3, "malformed CSV")


@pytest.mark.parametrize("header,require_labels,message", [
    (b"ImageID,Caption", True, "no column 'Labels' (found: ImageID, Caption); pass --labels-col NAME"),
    (b"ImageID,Labels", False, "no column 'Caption' (found: ImageID, Labels); pass --caption-col NAME"),
    (b"Labels,Caption", False, "no column 'ImageID' (found: Labels, Caption); pass --image-col NAME"),
    (b"id,labels,caption", False, "no columns 'ImageID', 'Caption' (found: id, labels, caption); "
                                  "pass --image-col NAME --caption-col caption"),
])
def test_read_csv_missing_column(tmp_path: Path, header: bytes, require_labels: bool,
                                 message: str) -> None:
    path = write(tmp_path, header + b"\r\n" + b"a.jpg,x\r\n")
    with pytest.raises(DataError) as info:
        read_csv(path, require_labels=require_labels)
    assert_data_error(info.value, path, None, 1, message)


def test_read_csv_labels_optional_unless_required(tmp_path: Path) -> None:
    path = write(tmp_path, b"ImageID,Caption\r\na.jpg,x\r\n")
    assert read_csv(path, require_labels=False).dataset.labels is None
    with pytest.raises(DataError, match="Labels"):
        read_csv(path, require_labels=True)


def test_read_csv_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(DataError) as info:
        read_csv(path)
    assert_data_error(info.value, path, None, None, "file not found")


def test_read_csv_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        read_csv(tmp_path)
    assert_data_error(info.value, tmp_path, None, None, "directory")


def test_read_csv_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, b"")
    with pytest.raises(DataError) as info:
        read_csv(path)
    assert_data_error(info.value, path, None, None, "empty")


def test_read_csv_non_utf8_bytes(tmp_path: Path) -> None:
    data = HEADER + crlf(b"a.jpg,1,fine", b"b.jpg,2,caf\xe9 latin-1")  # bad byte on line 3
    path = write(tmp_path, data)
    with pytest.raises(DataError) as info:
        read_csv(path)
    assert_data_error(info.value, path, None, 3, "UTF-8")


def test_read_csv_malformed_header_is_a_data_error(tmp_path: Path) -> None:
    # found by the fuzzer: a lone quote as the whole file escaped as csv.Error
    path = tmp_path / "q.csv"
    path.write_bytes(b'"')
    with pytest.raises(DataError, match="line 1.*malformed header"):
        read_csv(path)

# ----------------------------------------------------------------------------------------------
# 3. read_csv(skip_bad=True)
# ----------------------------------------------------------------------------------------------

def test_read_csv_skip_bad_reports_and_keeps_good_rows(tmp_path: Path) -> None:
    data = HEADER + crlf(
        b"good1.jpg,1,one",                # row 1, line 2
        b"bad1.jpg,1 x,non-integer",       # row 2, line 3
        b"bad2.jpg,,empty labels",         # row 3, line 4
        b'good2.jpg,2,"multi\r\nline"',    # row 4, lines 5-6
        b"bad3.jpg,3,",                    # row 5, line 7
        b"bad4.jpg,4,too,many",            # row 6, line 8
        b"../bad5.jpg,5,escape",           # row 7, line 9
        b"/etc/passwd,5,absolute",         # row 8, line 10
        b"C:\\bad7.jpg,5,drive",           # row 9, line 11
        b"good3.jpg,6,three",              # row 10, line 12
    )
    path = write(tmp_path, data)
    result = read_csv(path, require_labels=True, skip_bad=True)
    ds = result.dataset
    assert ds.image_ids == ["good1.jpg", "good2.jpg", "good3.jpg"]
    assert ds.captions == ["one", "multi\r\nline", "three"]
    assert ds.labels == [[1], [2], [6]]
    assert ds.rows == [1, 4, 10]
    assert ds.lines == [2, 5, 12]
    assert [e.row for e in result.skipped] == [2, 3, 5, 6, 7, 8, 9]
    assert [e.line for e in result.skipped] == [3, 4, 7, 8, 9, 10, 11]
    assert all(isinstance(e, DataError) and e.path == str(path) for e in result.skipped)
    reasons = [e.reason for e in result.skipped]
    assert "not an integer" in reasons[0]
    assert "Labels is empty" in reasons[1]
    assert "Caption is empty" in reasons[2]
    assert "4 fields" in reasons[3]
    assert all("outside" in r for r in reasons[4:])
    # Without skip_bad the first bad row stops the read.
    with pytest.raises(DataError) as info:
        read_csv(path, require_labels=True)
    assert (info.value.row, info.value.line) == (2, 3)


def test_read_csv_skip_bad_keeps_rows_after_unterminated_quote(tmp_path: Path) -> None:
    data = HEADER + crlf(
        b"a.jpg,1,first",                  # row 1, line 2
        b'b.jpg,2,"never closed',          # row 2, line 3 (runs to EOF)
        b"c.jpg,3,third",                  # row 3, line 4
        b'd.jpg,4,"quoted\r\nsplit"',      # row 4, lines 5-6  (itself fine)
        b"e.jpg,,bad labels",              # row 5, line 7
        b"f.jpg,6,sixth",                  # row 6, line 8
    )
    path = write(tmp_path, data)
    result = read_csv(path, require_labels=True, skip_bad=True)
    ds = result.dataset
    assert ds.image_ids == ["a.jpg", "c.jpg", "d.jpg", "f.jpg"]
    assert ds.captions == ["first", "third", "quoted\r\nsplit", "sixth"]
    assert ds.labels == [[1], [3], [4], [6]]
    assert ds.rows == [1, 3, 4, 6]
    assert ds.lines == [2, 4, 5, 8]
    assert [(e.row, e.line) for e in result.skipped] == [(2, 3), (5, 7)]
    assert result.skipped[0].reason.startswith("malformed CSV")
    assert "Labels is empty" in result.skipped[1].reason


def test_read_csv_skip_bad_unterminated_quote_on_last_row(tmp_path: Path) -> None:
    data = HEADER + crlf(b"a.jpg,1,first", b"b.jpg,2,second") + b'c.jpg,3,"open\r\n'
    path = write(tmp_path, data)
    result = read_csv(path, skip_bad=True)
    assert result.dataset.image_ids == ["a.jpg", "b.jpg"]
    assert [(e.row, e.line) for e in result.skipped] == [(3, 4)]
    assert "unterminated quote" in str(result.skipped[0])


def test_read_csv_skip_bad_does_not_hide_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Labels"):
        read_csv(write(tmp_path, b"ImageID,Caption\r\na.jpg,x\r\n"), require_labels=True,
                 skip_bad=True)
    with pytest.raises(DataError, match="UTF-8"):
        read_csv(write(tmp_path, HEADER + b"a.jpg,1,\xff\r\n", "b.csv"), skip_bad=True)

# ----------------------------------------------------------------------------------------------
# 4. parse_labels / check_image_id
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("1 3  19", [1, 3, 19]),
    ("19 3 1", [1, 3, 19]),
    ("3 1 3 3", [1, 3]),
    ("\t2\r\n 10 ", [2, 10]),
    ("0", [0]),
    ("", []),
    ("   ", []),
])
def test_parse_labels(text: str, expected: list[int]) -> None:
    assert parse_labels(text) == expected


@pytest.mark.parametrize("text,token", [("a", "'a'"), ("-1", "'-1'"), ("1 x", "'x'"),
                                        ("1.5", "'1.5'"), ("2 -3", "'-3'")])
def test_parse_labels_rejects_bad_tokens(text: str, token: str) -> None:
    with pytest.raises(ValueError, match=token):
        parse_labels(text)


@pytest.mark.parametrize("image_id", ["a.jpg", "sub/a.jpg", "sub\\a.jpg", "a..b.jpg", "..a.jpg"])
def test_check_image_id_accepts_relative_ids(image_id: str) -> None:
    check_image_id(image_id)


@pytest.mark.parametrize("image_id", ["", " a.jpg", "a.jpg ", "../x.jpg", "a/../../x.jpg",
                                      "/etc/passwd", "C:\\x.jpg", "C:x.jpg", "..\\x.jpg",
                                      "\\\\srv\\share\\x.jpg", "a\x00.jpg"])
def test_check_image_id_rejects_escaping_ids(image_id: str) -> None:
    with pytest.raises(ValueError):
        check_image_id(image_id)

# ----------------------------------------------------------------------------------------------
# 5. Bad data is never silently accepted (issue 14)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("token", ["1_8", "١٢", "１２", "٣", "+3", "0x1", "1e2", "²", "𝟗"])
def test_parse_labels_accepts_ascii_digits_only(token: str) -> None:
    # Python's int() reads '1_8' as 18 and '١٢' / '１２' as 12; a label is ASCII digits only
    with pytest.raises(ValueError, match="ASCII digits"):
        parse_labels(f"1 {token}")


def test_parse_labels_keeps_plain_integers() -> None:
    assert parse_labels("007 10 3") == [3, 7, 10]


def test_read_csv_refuses_a_label_with_an_underscore_with_its_row(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + crlf(b"a.jpg,1,ok", "b.jpg,1_8 ١٢,bad".encode()))
    with pytest.raises(DataError) as info:
        read_csv(path)
    assert_data_error(info.value, path, 2, 3, "'1_8'")


@pytest.mark.parametrize("header,name", [(b"ImageID,Labels,Caption,Caption", "Caption"),
                                         (b"ImageID,Labels,ImageID,Caption", "ImageID"),
                                         (b"ImageID, Labels ,Caption,Labels", "Labels")])
def test_read_csv_refuses_a_duplicated_column(tmp_path: Path, header: bytes, name: str) -> None:
    path = write(tmp_path, crlf(header, b"a.jpg,1,b.jpg,x"))
    for skip_bad in (False, True):
        with pytest.raises(DataError) as info:
            read_csv(path, skip_bad=skip_bad)
        assert_data_error(info.value, path, None, 1, f"'{name}'", "more than once")


def test_read_csv_other_repeated_columns_are_ignored(tmp_path: Path) -> None:
    # columns mmtag does not read (e.g. a spreadsheet's empty trailing ones) may repeat
    path = write(tmp_path, crlf(b"ImageID,Labels,Caption,,", b"a.jpg,1,x,,"))
    assert read_csv(path).dataset.image_ids == ["a.jpg"]


def test_read_csv_record_of_empty_fields_is_a_bad_row(tmp_path: Path) -> None:
    data = HEADER + crlf(b"a.jpg,1,x", b",,", b'"","",""', b"   ", b"", b"c.jpg,3,z")
    path = write(tmp_path, data)
    with pytest.raises(DataError) as info:
        read_csv(path)
    assert_data_error(info.value, path, 2, 3, "every field is empty")
    result = read_csv(path, skip_bad=True)
    assert result.dataset.image_ids == ["a.jpg", "c.jpg"]
    assert result.dataset.rows == [1, 4]  # blank lines are not rows; empty records are
    assert [(e.row, e.line) for e in result.skipped] == [(2, 3), (3, 4)]


@pytest.mark.parametrize("image_id", [b" a.jpg", b"a.jpg ", b'" a.jpg"', b"a.jpg\t"])
def test_read_csv_refuses_image_ids_with_surrounding_spaces(tmp_path: Path, image_id: bytes) -> None:
    """The rule: an ImageID is used exactly (it names a file and is echoed in the submission),
    so one with leading or trailing whitespace is refused, not trimmed into another name."""
    path = write(tmp_path, HEADER + crlf(b"b.jpg,1,ok", image_id + b",1,x"))
    with pytest.raises(DataError) as info:
        read_csv(path)
    assert_data_error(info.value, path, 2, 3, "spaces")

# ------------------------------------------------------------------ property-based fuzzing
_captions = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                    min_size=1, max_size=60).filter(lambda c: c.strip() != "")
_rows = st.lists(st.tuples(st.from_regex(r"[A-Za-z0-9_]{1,8}\.jpg", fullmatch=True),
                           st.lists(st.integers(1, 19), min_size=1, max_size=4),
                           _captions), min_size=0, max_size=8)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_rows, quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]),
       newline=st.sampled_from(["\r\n", "\n"]), bom=st.booleans(), extra=st.booleans())
def test_fuzz_written_csv_reads_back_exactly(tmp_path: Path, rows, quoting, newline, bom, extra) -> None:
    """Whatever a CSV writer produces (any quoting, CRLF or LF, BOM, an extra column, unicode and
    quotes/commas/CR/LF inside captions) reads back to exactly the rows written."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf, quoting=quoting, lineterminator=newline)
    w.writerow(["ImageID", "Labels", "Caption"] + (["Extra"] if extra else []))
    for image_id, labels, caption in rows:
        w.writerow([image_id, " ".join(map(str, labels)), caption] + (["x"] if extra else []))
    path = tmp_path / "fuzz.csv"
    path.write_bytes(("\ufeff" if bom else "").encode() + buf.getvalue().encode("utf-8"))
    try:
        d = read_csv(path).dataset
    except DataError as err:
        # The one refusal allowed: a writer told to end lines with LF leaves a lone CR in a caption
        # unquoted, which no reader can tell from an old-Mac line end. It must name the row.
        assert err.row is not None
        assert any("\r" in r[2] for r in rows) and quoting == csv.QUOTE_MINIMAL and newline == "\n"
        return
    assert d.image_ids == [r[0] for r in rows]
    assert [sorted(x) for x in d.labels] == [sorted(set(r[1])) for r in rows]  # repeats count once
    assert d.captions == [r[2].strip() for r in rows]  # surrounding whitespace is trimmed


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), header=st.sampled_from([b"ImageID,Labels,Caption\r\n", b"ImageID,Caption\n", b""]))
def test_fuzz_arbitrary_bytes_parse_or_raise_data_error(tmp_path: Path, data: bytes, header: bytes) -> None:
    """Random bytes after a header either parse or raise mmtag's DataError — never anything else —
    and with skip_bad every refused row is reported with its row number."""
    path = tmp_path / "junk.csv"
    path.write_bytes(header + data)
    for skip_bad in (False, True):
        try:
            result = read_csv(path, skip_bad=skip_bad)
        except DataError:
            continue
        assert all(e.row is not None for e in result.skipped)


@settings(derandomize=True)
@given(text=st.text(max_size=30))
def test_fuzz_parse_labels_returns_ints_or_value_error(text: str) -> None:
    try:
        labels = parse_labels(text)
    except ValueError:
        return
    assert all(isinstance(x, int) for x in labels)

# ----------------------------------------------------------------------------------------------
# 6. Other layouts: column names, label separators, named labels (issue 17)
# ----------------------------------------------------------------------------------------------

def test_read_csv_reads_the_columns_the_format_names(tmp_path: Path) -> None:
    path = write(tmp_path, b"tags,text,file\r\n1 3,a cat,a.jpg\r\n2,a dog,b.jpg\r\n")
    fmt = CsvFormat(image_col="file", caption_col="text", labels_col="tags", image_ext=".png")
    ds = read_csv(path, images_dir=tmp_path, require_labels=True, csv_format=fmt).dataset
    assert ds.image_ids == ["a.jpg", "b.jpg"] and ds.captions == ["a cat", "a dog"]
    assert ds.labels == [[1, 3], [2]] and not ds.vocab.named
    assert ds.image_path(0) == tmp_path / "a.jpg.png"  # the extension follows the id as written
    assert ds.subset([1]).image_path(0) == tmp_path / "b.jpg.png"


@pytest.mark.parametrize("header,fmt,message", [
    # the one column left over is the likely caption column
    (b"ImageID,Labels,text", CsvFormat(),
     "no column 'Caption' (found: ImageID, Labels, text); pass --caption-col text"),
    # another case first, then difflib's closest name
    (b"imageid,Labels,Caption,extra", CsvFormat(),
     "no column 'ImageID' (found: imageid, Labels, Caption, extra); pass --image-col imageid"),
    (b"ImageID,Lables,Caption,extra", CsvFormat(),
     "no column 'Labels' (found: ImageID, Lables, Caption, extra); pass --labels-col Lables"),
    # a configured name that the file does not use points back at the file's own column
    (b"ImageID,Labels,Caption", CsvFormat(caption_col="caption "),
     "no column 'caption ' (found: ImageID, Labels, Caption); pass --caption-col Caption"),
    (b"ImageID,Labels,image caption", CsvFormat(),
     "pass --caption-col 'image caption'"),
])
def test_a_header_typo_names_the_closest_column_and_the_flag(tmp_path: Path, header: bytes,
                                                             fmt: CsvFormat, message: str) -> None:
    path = write(tmp_path, header + b"\r\na.jpg,1,x\r\n")
    with pytest.raises(DataError) as info:
        read_csv(path, require_labels=True, csv_format=fmt)
    assert_data_error(info.value, path, None, 1, message)


@pytest.mark.parametrize("data,shown", [(b"ImageID;Labels;Caption\r\na.jpg;1;x\r\n", "';'"),
                                        (b"ImageID\tLabels\tCaption\r\na.jpg\t1\tx\r\n", "tab")])
def test_a_semicolon_or_tab_file_is_told_to_be_comma_separated(tmp_path: Path, data: bytes,
                                                               shown: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(DataError) as info:
        read_csv(path, require_labels=True)
    assert_data_error(info.value, path, None, 1, "must be comma-separated",
                      f"is separated by {shown}")


def test_a_comma_cell_under_the_default_separator_says_to_pass_label_sep(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + crlf(b"a.jpg,1,ok", b'b.jpg,"1,3",bad'))
    with pytest.raises(DataError) as info:
        read_csv(path, require_labels=True)
    assert_data_error(info.value, path, 2, 3, "Labels '1,3' holds a comma", "pass --label-sep ,")


def test_label_sep_reads_comma_separated_labels(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + crlf(b'a.jpg,"1,3",one', b'b.jpg,"19, 2,",two',
                                         b'c.jpg,"traffic light,cat",named'))
    comma = CsvFormat(label_sep=",")
    ds = read_csv(path, require_labels=True, csv_format=comma, skip_bad=True).dataset
    assert ds.labels == [[1, 3], [2, 19]]  # row 3 mixes names into an integer file: refused
    # space-separated ids under --label-sep , would read as one name: said instead
    spaced = write(tmp_path, HEADER + crlf(b"a.jpg,1 3,x"), "spaced.csv")
    with pytest.raises(DataError, match="separated by spaces, but --label-sep is ','"):
        read_csv(spaced, require_labels=True, csv_format=comma)


def test_named_labels_get_ids_in_sorted_order_and_keep_their_spelling(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + crlf(b"a.jpg,dog cat,one", b"b.jpg,Zebra dog dog,two",
                                         "c.jpg,café,three".encode()))
    ds = read_csv(path, require_labels=True).dataset
    assert ds.vocab == LabelVocab(("Zebra", "café", "cat", "dog"))
    assert ds.labels == [[2, 3], [0, 3], [1]]
    assert [[ds.vocab.token(i) for i in row] for row in ds.labels] == \
        [["cat", "dog"], ["Zebra", "dog"], ["café"]]
    # with a separator, a name may hold spaces
    spaced = write(tmp_path, HEADER + crlf(b'a.jpg,"traffic light;stop sign",x'), "s.csv")
    sds = read_csv(spaced, require_labels=True, csv_format=CsvFormat(label_sep=";")).dataset
    assert sds.vocab.names == ("stop sign", "traffic light") and sds.labels == [[0, 1]]


def test_a_file_read_with_a_vocabulary_keeps_its_ids_and_appends_new_names(tmp_path: Path) -> None:
    train = read_csv(write(tmp_path, HEADER + crlf(b"a.jpg,dog cat,x", b"b.jpg,cat,y")),
                     require_labels=True).dataset
    other = write(tmp_path, HEADER + crlf(b"c.jpg,yak dog,x", b"d.jpg,ant,y"), "other.csv")
    ds = read_csv(other, require_labels=True, vocab=train.vocab).dataset
    assert ds.vocab.names == ("cat", "dog", "ant", "yak")  # known ids first, then new names
    assert ds.labels == [[1, 3], [2]]
    assert ds.vocab.extends(train.vocab) and not train.vocab.extends(ds.vocab)


@pytest.mark.parametrize("records,row,fragments", [
    ([b"a.jpg,1,ok", b"b.jpg,1 x,bad"], 2, ["'x' is not an integer", "row 1's label '1'"]),
    ([b"a.jpg,cat,ok", b"b.jpg,dog 3,bad"], 2, ["'3' is an integer", "row 1's label 'cat' is a name"]),
    ([b"a.jpg,cat 3,bad"], 1, ["'3' is an integer", "row 1's label 'cat'"]),
    ([b"a.jpg,cat -1,bad"], 1, ["'-1' is negative"]),  # reads as a number: refused, not a name
    ([b"a.jpg,cat 1.5,bad"], 1, ["'1.5' is not an integer"]),
])
def test_a_file_holds_ids_or_names_not_both(tmp_path: Path, records: list[bytes], row: int,
                                            fragments: list[str]) -> None:
    path = write(tmp_path, HEADER + crlf(*records))
    with pytest.raises(DataError) as info:
        read_csv(path, require_labels=True)
    assert_data_error(info.value, path, row, row + 1, *fragments)


def test_the_models_vocabulary_fixes_the_kind_of_label(tmp_path: Path) -> None:
    names = write(tmp_path, HEADER + crlf(b"a.jpg,cat,x"), "names.csv")
    ids = write(tmp_path, HEADER + crlf(b"a.jpg,3,x"), "ids.csv")
    with pytest.raises(DataError, match="'cat' is not an integer, but the model's labels are integer ids"):
        read_csv(names, vocab=LabelVocab())
    with pytest.raises(DataError, match="'3' is an integer, but the model's labels are names"):
        read_csv(ids, vocab=LabelVocab(("cat", "dog")))
    assert read_csv(ids, vocab=LabelVocab()).dataset.labels == [[3]]


def test_a_row_skipped_for_its_labels_does_not_decide_the_kind(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + crlf(b"a.jpg,cat 3,mixed", b"b.jpg,1,ok", b"c.jpg,2 5,ok"))
    result = read_csv(path, require_labels=True, skip_bad=True)
    assert result.dataset.labels == [[1], [2, 5]] and not result.dataset.vocab.named
    assert [e.row for e in result.skipped] == [1]


# ----------------------------------------------------------------------------------------------
# Label names that are output columns, or spreadsheet formulas (issue 29)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label, column", [
    (b"ImageID", "ImageID"), (b"imageid", "ImageID"), (b"LABELS", "Labels"), (b"caption", "Caption"),
])
def test_a_label_named_like_an_output_column_is_refused_naming_its_row(tmp_path: Path, label: bytes,
                                                                        column: str) -> None:
    path = write(tmp_path, HEADER + crlf(b"a.jpg,cat,ok", b"b.jpg,dog " + label + b",bad"))
    with pytest.raises(DataError) as info:
        read_csv(path, require_labels=True)
    assert_data_error(info.value, path, 2, 3, f"label {label.decode()!r} is named like the column "
                      f"{column!r} of mmtag's CSVs (case aside); rename the label")
    assert "\n" not in str(info.value)


def test_a_label_named_like_this_files_own_columns_is_refused(tmp_path: Path) -> None:
    fmt = CsvFormat(image_col="file", labels_col="tags", caption_col="text")
    path = write(tmp_path, b"file,tags,text\r\n" + crlf(b"a.jpg,cat TAGS,x"))
    with pytest.raises(DataError, match="label 'TAGS' is named like the column 'tags'"):
        read_csv(path, require_labels=True, csv_format=fmt)
    # the competition's names stay reserved under another layout: they are the outputs' columns
    other = write(tmp_path, b"file,tags,text\r\n" + crlf(b"a.jpg,Labels,x"), "o.csv")
    with pytest.raises(DataError, match="label 'Labels' is named like the column 'Labels'"):
        read_csv(other, require_labels=True, csv_format=fmt)


def test_formula_like_label_names_are_read_as_they_are(tmp_path: Path) -> None:
    # They stay the user's names everywhere but in CSV cells (mmtag.io.csv_cell escapes those).
    path = write(tmp_path, HEADER + crlf(b"a.jpg,=cmd @at,x", b"b.jpg,+plus -dash,y",
                                         b"c.jpg,=cmd,z"))
    ds = read_csv(path, require_labels=True).dataset
    assert ds.vocab.names == ("+plus", "-dash", "=cmd", "@at")
    assert ds.labels == [[2, 3], [0, 1], [2]]
    # a token that reads as a number is still an id, refused when negative, never a name
    neg = write(tmp_path, HEADER + crlf(b"a.jpg,-1,x"), "neg.csv")
    with pytest.raises(DataError, match="label '-1' is negative"):
        read_csv(neg, require_labels=True)


def test_a_long_label_is_quoted_shortened_in_a_message(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + crlf(b"a.jpg,1,ok", b"b.jpg,-1" + b"0" * 100_000 + b" 5,bad"))
    with pytest.raises(DataError) as info:
        read_csv(path, require_labels=True)
    assert "label '-1000" in str(info.value) and "is negative" in str(info.value)
    assert len(str(info.value)) < len(str(path)) + 400
