"""`mmtag demo` ends by saying what to try next, with commands that work on the run it made."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from mmtag import api, cli
from mmtag.jobs import demo


def test_demo_ends_with_next_steps_that_work(fused_run: Path, tiny, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # The demo's three trainings are its own tests' business (and minutes): here, its ending,
    # on a finished fused run and the data it was trained on.
    metrics = api.evaluate(fused_run, tiny.holdout_csv, tiny.images, progress=False)

    def finished_demo(out: Path, *, progress: bool = True, seed: int = 0) -> demo.DemoResult:
        return demo.DemoResult(out=Path(out), metrics={"fused": metrics},
                               submission=Path(out) / "submission.csv",
                               runs={"fused": fused_run}, data=tiny)

    monkeypatch.setattr(demo, "run_demo", finished_demo)
    capsys.readouterr()
    assert cli.main(["-q", "demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    steps = [ln.strip() for ln in out[out.index("next, try:") + 1:]]
    commands = {s.split()[0] + " " + s.split()[1]: s.split("  #")[0].strip() for s in steps}
    assert set(commands) >= {"open " + str(fused_run / "report.html"), "mmtag info",
                             "mmtag serve", "mmtag predict", "mmtag train"}
    assert (fused_run / "report.html").is_file() and (fused_run / "train.log").is_file()
    assert any(str(fused_run / "train.log") in s for s in steps)
    # the commands it prints run as printed
    assert cli.main(["-q", *shlex.split(commands["mmtag info"])[1:]]) == 0
    assert cli.main(["-q", *shlex.split(commands["mmtag predict"])[1:]]) == 0
    assert (tmp_path / "predictions.csv").is_file()
