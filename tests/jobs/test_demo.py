"""`mmtag demo` end to end: the real command, on a smaller generated dataset."""
from __future__ import annotations

import csv
import shlex
from pathlib import Path

import pytest

from mmtag import cli
from mmtag.data.synthetic import make_dataset
from mmtag.jobs import demo


def test_demo_trains_evaluates_predicts_and_ends_with_next_steps_that_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Everything the demo does runs as `mmtag demo` runs it; only its generated dataset is
    # smaller (the default, 400 rows of 160 px, takes minutes), and under 100 rows the trainer's
    # `auto` folds use one split, so the three trainings take seconds.
    def small_dataset(out: Path, seed: int = 0):
        return make_dataset(out, n_train=90, n_holdout=30, n_test=10, size=64, seed=seed)

    monkeypatch.setattr(demo, "make_dataset", small_dataset)
    out_dir = tmp_path / "demo"
    assert cli.main(["-q", "demo", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {ln.split()[0]: [float(x) for x in ln.split()[1:]] for ln in out
            if ln.split() and ln.split()[0] in ("image", "text", "fused")}
    assert set(rows) == {"image", "text", "fused"} and all(0 <= f <= 1 for r in rows.values() for f in r)
    for name in ("image", "text", "fused"):
        run = out_dir / "runs" / name
        assert (run / "manifest.json").is_file() and (run / "report.html").is_file()
    with open(out_dir / "submission.csv", newline="") as fh:
        submitted = list(csv.DictReader(fh))
    with open(out_dir / "data" / "test.csv", newline="") as fh:
        wanted = [r["ImageID"] for r in csv.DictReader(fh)]
    assert [r["ImageID"] for r in submitted] == wanted and len(wanted) == 10

    fused = out_dir / "runs" / "fused"
    steps = [ln.strip() for ln in out[out.index("next, try:") + 1:]]
    commands = {s.split()[0] + " " + s.split()[1]: s.split("  #")[0].strip() for s in steps}
    assert set(commands) >= {"open " + str(fused / "report.html"), "mmtag info",
                             "mmtag serve", "mmtag predict", "mmtag train"}
    assert any(str(fused / "train.log") in s for s in steps) and (fused / "train.log").is_file()
    # the commands it prints run as printed
    assert cli.main(["-q", *shlex.split(commands["mmtag info"])[1:]]) == 0
    assert cli.main(["-q", *shlex.split(commands["mmtag predict"])[1:]]) == 0
    assert (out_dir / "predictions.csv").is_file()
