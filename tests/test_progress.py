"""The one progress policy: labelled tqdm bars in a terminal, plain log lines elsewhere (never a
'\\r'), nothing from ranks other than 0, and a train.log that gets every line whatever shows."""
from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from mmtag import dist, progress
from mmtag.progress import Bar, Mode, line, mode, train_log


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _stderr(monkeypatch: pytest.MonkeyPatch, stream: io.StringIO) -> io.StringIO:
    """Make `stream` this test's stderr (in the test body: pytest's own capture puts its stream
    back after fixtures run)."""
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mmtag.progress"]


def test_mode_follows_the_quiet_flag_the_terminal_and_the_rank(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _stderr(monkeypatch, io.StringIO())
    assert mode(True) is Mode.LINES and mode(False) is Mode.OFF
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert mode(True) is Mode.BARS and mode(False) is Mode.OFF
    monkeypatch.setattr(dist, "context", lambda: dist.Context(rank=1, world=2))
    assert mode(True) is Mode.OFF  # under torchrun only rank 0 speaks


def test_a_bar_off_a_terminal_is_plain_lines_and_an_early_finish_ends_full(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    piped = _stderr(monkeypatch, io.StringIO())
    with caplog.at_level(logging.INFO, logger="mmtag.progress"):
        bar = Bar(label="text features minilm-l6", total=10, unit="cap")
        bar.update(4)
        bar.set_postfix(loss="0.5")  # no line of its own: it waits for the next one
        bar.finish()  # stopped early on purpose: done, at the count it reached
    lines = _lines(caplog)
    assert lines == ["text features minilm-l6: 0/10 cap (0%), elapsed 00:00, ETA ?",
                     "text features minilm-l6: 4/4 cap (100%), elapsed 00:00, ETA 00:00, loss=0.5"]
    assert "\r" not in piped.getvalue()


def test_a_bar_in_a_terminal_is_labelled_and_an_early_finish_closes_it_full(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    terminal = _stderr(monkeypatch, Terminal())
    with caplog.at_level(logging.INFO, logger="mmtag.progress"):
        bar = Bar(label="fold 2/5 head mean", total=40, unit="epoch")
        bar.update(16)
        bar.finish()
    last = terminal.getvalue().rstrip("\n").split("\r")[-1]
    assert last.startswith("fold 2/5 head mean: 100%") and "16/16" in last, last
    assert _lines(caplog) == []  # the bar says it: no log line besides


def test_quiet_lines_reach_train_log_only_and_it_is_appended(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _stderr(monkeypatch, io.StringIO())
    path = tmp_path / "train.log"
    with caplog.at_level(logging.INFO, logger="mmtag.progress"):
        with train_log(path):
            line("head concat: epoch 1/2", show=False)
            bar = Bar(label="checking images", total=3, unit="img", show=False)
            bar.update(3)
            bar.close()
            logging.getLogger("mmtag").warning("a warning")
        line("after the run", show=False)
        with train_log(path):  # a resumed run continues its log
            line("head concat: resuming after epoch 1/2")
    text = path.read_text()
    assert [ln.split(" ", 3)[2:] for ln in text.splitlines()] == [
        ["INFO", "head concat: epoch 1/2"],
        ["INFO", "checking images: 0/3 img (0%), elapsed 00:00, ETA ?"],
        ["INFO", "checking images: 3/3 img (100%), elapsed 00:00, ETA 00:00"],
        ["WARNING", "a warning"],
        ["INFO", "head concat: resuming after epoch 1/2"]]
    assert _lines(caplog) == ["head concat: resuming after epoch 1/2"]  # the one shown
    assert not [h for h in logging.getLogger("mmtag").handlers if isinstance(h, progress.TrainLog)]


def test_without_logging_configured_lines_still_reach_a_redirected_stderr(tmp_path: Path) -> None:
    """The Python API in a script run with `2> file`: plain lines, though nobody set logging up."""
    code = ("from mmtag.progress import Bar, line\n"
            "line('hello from mmtag')\n"
            "bar = Bar(label='image features efficientnet-lite0', total=8, unit='img')\n"
            "bar.update(8)\nbar.close()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        "hello from mmtag",
        "image features efficientnet-lite0: 0/8 img (0%), elapsed 00:00, ETA ?",
        "image features efficientnet-lite0: 8/8 img (100%), elapsed 00:00, ETA 00:00"]


def test_durations_and_eta() -> None:
    assert progress.duration(65) == "01:05" and progress.duration(3723) == "1:02:03"
    assert progress.duration(None) == "?" and progress.duration(float("nan")) == "?"
    assert progress.eta(10.0, 2, 5) == pytest.approx(15.0) and progress.eta(0.0, 0, 5) is None
