"""`mmtag train` with the user's own validation set (`--val CSV`)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from mmtag import api, cli


def test_val_csv_chooses_on_the_users_rows_and_says_how_few(
        tiny, cache_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="mmtag"):
        rc = cli.main(["train", str(tiny.train_csv), "--val", str(tiny.holdout_csv),
                       "--modalities", "text", "--epochs", "3", "--hidden", "32",
                       "--cache-dir", cache_dir, "--out", str(run)])
    out = capsys.readouterr().out
    assert rc == 0
    n_train, n_val = len(api.read_dataset(tiny.train_csv, None, labelled=True)[0]), 40
    assert f"trained text on {n_train} rows, validated on {n_val}" in out  # every row trains
    assert any(f"chosen on {n_val} validation row(s) (your --val set)" in r.getMessage()
               for r in caplog.records)
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]["val_csv"]
    assert saved == str(Path(tiny.holdout_csv).resolve())  # resumable from anywhere
    tagger = api.Tagger.load(run)
    assert tagger.validation is not None and tagger.validation.image_ids == \
        api.read_dataset(tiny.holdout_csv, None, labelled=True)[0].image_ids


def test_val_csv_without_labels_is_one_line(tiny, cache_dir: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["train", str(tiny.train_csv), "--val", str(tiny.test_csv), "--modalities", "text",
                   "--cache-dir", cache_dir, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(tiny.test_csv) in err[0] and "Labels" in err[0]
    assert not (tmp_path / "run" / "manifest.json").exists()
