"""`mmtag train` with the user's own validation set (`--val CSV`)."""
from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmtag import api, cli
from mmtag.config import Config
from mmtag.data import COCO_NAMES


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


# ------------------------------------------------------------------ progress and train.log
TEXT_OPTS = ["--modalities", "text", "--folds", "1", "--epochs", "2", "--patience", "2",
             "--hidden", "32", "--workers", "0"]
EPOCH = re.compile(r"head text: epoch (\d)/2, train loss \d+\.\d{4}, val loss \d+\.\d{4}, val F1 "
                   r"\d\.\d{4} \(best \d\.\d{4} at epoch \d\), elapsed \d\d:\d\d, ETA \d\d:\d\d")


def _epochs(lines: list[str]) -> list[str]:
    return [m[1] for m in map(EPOCH.search, lines) if m]


def _logged(run: Path) -> list[str]:
    """train.log's messages, without their time stamps and levels."""
    return [ln.split(" ", 3)[3] for ln in (run / "train.log").read_text().splitlines()]


def test_train_off_a_terminal_logs_a_plain_line_per_stage_and_epoch(
        tiny, cache_dir: str, tmp_path: Path) -> None:
    """`mmtag train ... 2>&1 | tee`, nohup, CI: stderr is a pipe, not a terminal."""
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mmtag", "train", str(tiny.train_csv), *TEXT_OPTS,
                        "--cache-dir", cache_dir, "--out", str(run)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    err = r.stderr.splitlines()
    assert "\r" not in r.stderr
    assert "head text: training up to 2 epochs (stage head)" in err
    assert _epochs(err) == ["1", "2"]
    assert any(ln.startswith("head text: done after epoch 2/2, best epoch ") for ln in err)
    # the finished run keeps the same lines, and its manifest covers the log
    logged = _logged(run)
    assert [ln for ln in err if ln.startswith("head text")] == \
        [ln for ln in logged if ln.startswith("head text")]
    assert logged[0].startswith("mmtag ") and f"-> {run}" in logged[0]
    assert "train.log" in json.loads((run / "manifest.json").read_text())["files"]
    api.Tagger.load(run)


def test_train_log_is_written_under_quiet_too(tiny, cache_dir: str, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="mmtag.progress"):
        assert cli.main(["-q", "train", str(tiny.train_csv), *TEXT_OPTS, "--cache-dir", cache_dir,
                         "--out", str(run)]) == 0
    assert _epochs(caplog.messages) == []  # -q: no line for the console (pytest's log capture)
    assert _epochs(_logged(run)) == ["1", "2"]


def test_python_api_off_a_terminal_logs_lines_not_bars(
        tiny, cache_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)  # a script run with `2> file`
    cfg = Config().override({"cache_dir": cache_dir, "model.modalities": ["text"], "train.folds": 1,
                             "train.epochs": 2, "model.hidden": 32, "data.workers": 0})
    with caplog.at_level(logging.INFO, logger="mmtag.progress"):
        api.train(tiny.train_csv, None, tmp_path / "run", cfg)
    assert _epochs([r.getMessage() for r in caplog.records]) == ["1", "2"]
    assert "\r" not in piped.getvalue()


# ------------------------------------------------------------------ how integer labels are shown
def test_integer_labels_are_shown_as_themselves_unless_names_are_asked_for(
        tiny, cache_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def train(out: Path, *extra: str) -> dict:
        rc = cli.main(["train", str(tiny.train_csv), *TEXT_OPTS, "--cache-dir", cache_dir,
                       "--out", str(out), *extra])
        assert rc == 0, capsys.readouterr().err
        return json.loads((out / "labels.json").read_text())

    plain = train(tmp_path / "plain")
    assert plain["names"] == [str(i) for i in plain["ids"]]  # a user's 3 is not COCO's "car"
    names = tmp_path / "names.csv"
    names.write_text("id,name\n" + "".join(f"{i},tag {i}\n" for i in plain["ids"][1:]))
    named = train(tmp_path / "named", "--label-names", str(names))
    assert named["ids"] == plain["ids"]
    assert named["names"] == [str(plain["ids"][0])] + [f"tag {i}" for i in plain["ids"][1:]]
    assert f"tag {plain['ids'][1]}" in (tmp_path / "named" / "report.html").read_text()
    saved = yaml.safe_load((tmp_path / "named" / "config.yaml").read_text())["data"]["label_names"]
    assert saved == str(names.resolve())  # resumable from anywhere
    coco = train(tmp_path / "coco", "--label-names", "coco")
    assert coco["names"] == [COCO_NAMES[i] for i in plain["ids"]]
    # a bad names file is one line, before any work
    names.write_text("1,cat\nx,dog\n")
    rc = cli.main(["train", str(tiny.train_csv), *TEXT_OPTS, "--cache-dir", cache_dir,
                   "--out", str(tmp_path / "bad"), "--label-names", str(names)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "names.csv (line 2): label id 'x' is not an integer" in err[0]
    assert not (tmp_path / "bad").exists()


def test_a_run_for_macro_f1_records_the_metric_and_every_choice_follows_it(
        tiny, cache_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmtag.jobs.info import info, info_rows
    from mmtag.jobs.report import best_epoch
    from mmtag.training.loop import higher_f1

    run = tmp_path / "macro"
    assert cli.main(["train", str(tiny.train_csv), *TEXT_OPTS, "--epochs", "3", "--decision",
                     "per-class", "--metric", "macro", "--cache-dir", cache_dir,
                     "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "optimised for: macro-F1 (--metric macro)" in out
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["metric"] == "macro"
    assert json.loads((run / "thresholds.json").read_text())["metric"] == "macro"
    tagger = api.Tagger.load(run)
    assert tagger.config.train.metric == "macro" and tagger.thresholds.metric == "macro"
    # the history keeps each epoch's macro-F1, and the best epoch is the one of the highest
    figures = [h["val_metric"] for h in tagger.history]
    assert best_epoch(tagger.history, higher_f1) == 1 + figures.index(max(figures))
    assert dict(info_rows(info(run)))["optimised for"] == "macro-F1 (--metric macro)"
    assert "optimised for macro-F1" in (run / "report.html").read_text()
