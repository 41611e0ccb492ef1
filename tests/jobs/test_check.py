"""`mmtag check` on users' own layouts (issue 17): column names, label names, a separator, and
ImageIDs written without their file extension."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from mmtag import api
from mmtag.errors import DataError, MmtagError


def _images(root: Path, *names: str) -> Path:
    root.mkdir()
    for name in names:
        Image.new("RGB", (8, 8), "red").save(root / name)
    return root


def test_check_reads_the_layout_it_is_told_and_counts_labels_by_name(tmp_path: Path) -> None:
    images = _images(tmp_path / "images", "a.jpg", "b.jpg")
    path = tmp_path / "t.csv"
    path.write_text('file,text,tags\na,a cat,"cat,dog"\nb,a dog,dog\n')
    r = api.check(path, images, progress=False, image_col="file", caption_col="text",
                  labels_col="tags", label_sep=",", image_ext=".jpg")
    assert r.problems == 0 and r.rows == 2 and r.labelled
    assert r.label_counts == {"cat": 1, "dog": 2}
    with pytest.raises(DataError, match="no column 'ImageID'.*pass --image-col file"):
        api.check(path, images, progress=False, caption_col="text", labels_col="tags")
    with pytest.raises(MmtagError, match=r"--image-ext \(data.image_ext\) must be empty or"):
        api.check(path, images, progress=False, image_ext="jpg")


def test_check_says_once_that_the_ids_lack_their_extension(tmp_path: Path) -> None:
    images = _images(tmp_path / "images", "139.jpg", "140.jpg")
    path = tmp_path / "t.csv"
    path.write_text("ImageID,Labels,Caption\n139,1,x\n140,2,y\n")
    with pytest.raises(DataError) as info:
        api.check(path, images, progress=False)
    assert "139.jpg' is (and so for all 2 rows" in str(info.value)
    assert "pass --image-ext .jpg" in str(info.value)
    r = api.check(path, images, progress=False, image_ext=".jpg")
    assert r.problems == 0 and r.label_counts == {1: 1, 2: 1}


def test_check_tells_caption_groups_from_copies_and_conflicts(tmp_path: Path, capsys) -> None:
    from mmtag.cli import main

    path = tmp_path / "t.csv"
    path.write_text("ImageID,Labels,Caption\n"
                    "a.jpg,1,a man on a horse\n"      # 1: a.jpg's captions: a group
                    "a.jpg,1 19,A man  riding a horse\n"  # 2
                    "b.jpg,2,a bike\n"                # 3: copied as 4
                    "b.jpg,2,a bike\n"                # 4
                    "c.jpg,3,a car\n"                 # 5: conflicts with 6
                    "c.jpg,3 8,A car\n"               # 6
                    "d.jpg,1,alone\n")
    r = api.check(path, None, progress=False)
    assert r.repeated.caption_groups == {"a.jpg": [1, 2]}
    assert r.repeated.copies == {"b.jpg": [3, 4]} and r.repeated.conflicts == {"c.jpg": [5, 6]}
    assert r.duplicate_ids == {"a.jpg": 2, "b.jpg": 2, "c.jpg": 2} and r.problems == 2
    assert main(["check", str(path), "-q"]) == 1
    out = capsys.readouterr().out
    assert "caption groups (one image, several captions: fine): 1, e.g. a.jpg rows 1, 2" in out
    assert "conflicts (same image and caption, different labels): 1, e.g. c.jpg rows 5, 6" in out
