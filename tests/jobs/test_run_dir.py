"""A finished run is never destroyed: `mmtag train --out RUN` refuses a run already there unless
--overwrite, trains beside it and replaces it only when complete (manifest last, covering every
file); interrupted runs say how to resume; a bad --out, a full disk and Ctrl-C are one line."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mmtag import api, cli
from mmtag.jobs import train as train_job

from mmtag.model import bundle
from mmtag.training.checkpoint import RunLog, StageState
from mmtag.errors import MmtagError

OPTS = ["--modalities", "text", "--epochs", "4", "--patience", "4", "--hidden", "32",
        "--workers", "0", "--folds", "1"]


def _train(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, list[str]]:
    """`mmtag -q train ARGS` in this process; its exit code and stderr lines."""
    capsys.readouterr()
    rc = cli.main(["-q", "train", *map(str, args)])
    return rc, capsys.readouterr().err.strip().splitlines()


def _snapshot(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def _leftovers(root: Path) -> list[str]:
    """Temporary files or directories anywhere under `root`."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.endswith((".tmp", ".staging")) or ".mmtag-probe" in p.name)


@pytest.fixture(scope="module")
def trained_once(tiny, cache_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["-q", "train", str(tiny.train_csv), "--out", str(run), *OPTS,
                     "--cache-dir", cache_dir]) == 0
    return run


@pytest.fixture
def finished(trained_once: Path, tmp_path: Path) -> Path:
    """A finished text-only run (trained by `mmtag train ... OPTS`) at tmp_path/run."""
    return Path(shutil.copytree(trained_once, tmp_path / "run"))


def _bad_csv(tiny, tmp_path: Path) -> Path:
    """The training CSV with a label that is not a number on row 1."""
    lines = tiny.train_csv.read_text().splitlines()
    image_id, _, caption = lines[1].split(",", 2)
    path = tmp_path / "bad.csv"
    path.write_text("\r\n".join([lines[0], f"{image_id},x1,{caption}", *lines[2:]]) + "\r\n")
    return path


# ------------------------------------------------------------------ a finished run at --out
def test_retrain_without_overwrite_is_refused(finished: Path, tiny, cache_dir: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(finished)
    rc, err = _train(capsys, tiny.train_csv, "--out", finished, *OPTS, "--seed", "5",
                     "--cache-dir", cache_dir)
    assert rc == 2 and len(err) == 1, err
    assert f"{finished} holds a finished run" in err[0] and "--overwrite" in err[0]
    assert _snapshot(finished) == before


@pytest.mark.parametrize("flags", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_failed_retrain_leaves_the_finished_run_byte_identical(
        finished: Path, tiny, cache_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        flags: list[str]) -> None:
    before = _snapshot(finished)
    bad = _bad_csv(tiny, tmp_path)
    rc, err = _train(capsys, bad, "--out", finished, *OPTS, *flags, "--cache-dir", cache_dir)
    assert rc == 2 and len(err) == 1 and err[0].startswith("mmtag: error: "), err
    assert _snapshot(finished) == before
    api.Tagger.load(finished)  # every file still matches its manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "run"]  # nothing left beside


def test_retrain_with_overwrite_replaces_the_run_only_when_complete(
        finished: Path, tiny, cache_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    before = _snapshot(finished)
    during: list[dict[str, str]] = []
    drawn: list[int] = []
    add, draw = train_job.add_run_files, train_job.report

    def add_watching_the_old_run(work: Path, run: Path) -> None:
        during.append(_snapshot(finished))  # training is over, the new bundle is being written
        add(work, run)

    def report_of_the_new_run(run: Path, *args: object, **kwargs: object) -> Path:
        drawn.append(api.Tagger.load(run).config.train.seed)  # the new run is complete, in place
        return draw(run, *args, **kwargs)

    monkeypatch.setattr(train_job, "add_run_files", add_watching_the_old_run)
    monkeypatch.setattr(train_job, "report", report_of_the_new_run)
    rc, err = _train(capsys, tiny.train_csv, "--out", finished, *OPTS, "--seed", "5", "--overwrite",
                     "--cache-dir", cache_dir)
    assert rc == 0, err
    assert during == [before]  # until the new run was complete, the old one was untouched
    assert drawn == [5]  # and its report was drawn only once it was saved
    tagger = api.Tagger.load(finished)  # verifies every file against the new manifest
    assert tagger.config.train.seed == 5
    manifest = json.loads((finished / "manifest.json").read_text())
    assert {"report.html", "metrics.csv", "config.yaml"} <= set(manifest["files"])
    assert set(manifest["files"]) | {"manifest.json"} == set(_snapshot(finished))
    assert not (finished / "checkpoints").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_report_that_cannot_be_drawn_costs_the_report_not_the_run(
        tiny, cache_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(run: Path, *args: object, **kwargs: object) -> Path:
        raise MemoryError("drawing the plots")

    monkeypatch.setattr(train_job, "report", broken)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="mmtag"):
        rc, err = _train(capsys, tiny.train_csv, "--out", run, *OPTS, "--cache-dir", cache_dir)
    assert rc == 0, err
    warned = [r.getMessage() for r in caplog.records if "report" in r.getMessage()]
    assert len(warned) == 1 and "the run is saved, but its report could not be drawn" in warned[0]
    assert f"`mmtag report {run}` tries again" in warned[0]
    api.Tagger.load(run)  # finished and whole
    assert not (run / "report.html").exists()
    assert cli.main(["-q", "report", str(run)]) == 0  # and the hint works
    assert "report.html" in json.loads((run / "manifest.json").read_text())["files"]
    api.Tagger.load(run)


def test_bundle_save_failing_midway_leaves_the_previous_bundle(finished: Path, tmp_path: Path) -> None:
    """`Tagger.save` and `mmtag export` write bundles the same way: built beside, then renamed."""
    before = _snapshot(finished)
    b = bundle.load(finished)

    def fail(run: Path) -> None:
        assert (run / "head.safetensors").is_file() and run.name == finished.name
        raise RuntimeError("stopped half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        bundle.save(finished, b, add_files=fail)
    assert _snapshot(finished) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_run_set_aside_by_a_killed_swap_is_put_back(finished: Path, tiny, cache_dir: str,
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A kill between "old run aside" and "new run in" leaves RUN missing; the next command
    that writes RUN puts the old one back before looking at it."""
    before = _snapshot(finished)
    container = tmp_path / ".run.k1ll3d.staging"
    container.mkdir()
    (container / "run").mkdir()  # the new run, never renamed into place
    finished.rename(container / "previous")
    rc, err = _train(capsys, tiny.train_csv, "--out", finished, *OPTS, "--cache-dir", cache_dir)
    assert rc == 2 and "holds a finished run" in err[0], err
    assert _snapshot(finished) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_report_rewritten_into_the_run_keeps_it_loadable(finished: Path, tiny, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    old = json.loads((finished / "manifest.json").read_text())
    capsys.readouterr()
    assert cli.main(["-q", "report", str(finished), "--csv", str(tiny.holdout_csv)]) == 0, \
        capsys.readouterr().err
    manifest = json.loads((finished / "manifest.json").read_text())
    assert manifest["files"]["report.html"] == hashlib.sha256(
        (finished / "report.html").read_bytes()).hexdigest() != old["files"]["report.html"]
    assert {k: v for k, v in manifest.items() if k != "files"} == {
        k: v for k, v in old.items() if k != "files"}
    api.Tagger.load(finished)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ------------------------------------------------------------------ interrupted runs
def _ctrl_c_after_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    save = RunLog.save

    def save_then_interrupt(self: RunLog, stage: str, state: StageState) -> None:
        save(self, stage, state)
        if state.epoch == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunLog, "save", save_then_interrupt)


def test_ctrl_c_prints_the_resume_command_and_the_run_resumes(
        finished: Path, tiny, cache_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "new"
    with monkeypatch.context() as m:
        _ctrl_c_after_epoch(m, 2)
        rc, err = _train(capsys, tiny.train_csv, "--out", run, *OPTS, "--cache-dir", cache_dir)
    assert rc == 130
    assert err == [f"mmtag: interrupted; to continue: mmtag train --resume {run}"]

    rc, err = _train(capsys, tiny.train_csv, "--out", run, *OPTS, "--cache-dir", cache_dir)
    assert rc == 2
    assert err == [f"mmtag: error: {run} holds an interrupted run: `mmtag train --resume {run}` "
                   "to continue, or `--overwrite` to start again"]
    assert (run / "checkpoints" / "head.json").is_file()  # never silently discarded

    rc, err = _train(capsys, "--resume", run)
    assert rc == 0, err
    api.Tagger.load(run)
    # the same run as the uninterrupted one (same options, same data)
    assert (json.loads((run / "metrics.json").read_text())
            == json.loads((finished / "metrics.json").read_text()))
    assert not (run / "checkpoints").exists() and _leftovers(tmp_path) == []
    # one train.log tells both attempts: the resumed one appended to it
    logged = [ln.split(" ", 3)[3] for ln in (run / "train.log").read_text().splitlines()]
    epochs = [ln.split(",")[0] for ln in logged if ln.startswith("head text: epoch ")]
    assert epochs == [f"head text: epoch {e}/4" for e in (1, 2, 3, 4)]
    assert logged.index("interrupted") < logged.index("head text: resuming after epoch 2/4 (stage head)")
    assert sum(ln.startswith("mmtag ") and " train" in ln for ln in logged) == 2


def test_ctrl_c_while_replacing_a_finished_run_keeps_it_and_resumes(
        finished: Path, tiny, cache_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    before = _snapshot(finished)
    with monkeypatch.context() as m:
        _ctrl_c_after_epoch(m, 2)
        rc, err = _train(capsys, tiny.train_csv, "--out", finished, *OPTS, "--seed", "5",
                         "--overwrite", "--cache-dir", cache_dir)
    assert rc == 130 and err == [f"mmtag: interrupted; to continue: mmtag train --resume {finished}"]
    assert _snapshot(finished) == before
    api.Tagger.load(finished)

    rc, err = _train(capsys, tiny.train_csv, "--out", finished, *OPTS, "--cache-dir", cache_dir)
    assert rc == 2 and "holds an interrupted run" in err[0]

    rc, err = _train(capsys, "--resume", finished)
    assert rc == 0, err
    assert api.Tagger.load(finished).config.train.seed == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _interrupted_run(tiny, cache_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                     monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path/run: a train stopped by Ctrl-C after its first epoch."""
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _ctrl_c_after_epoch(m, 1)
        assert _train(capsys, tiny.train_csv, "--out", run, *OPTS, "--cache-dir", cache_dir)[0] == 130
    return run


def test_overwrite_starts_an_interrupted_run_again(tiny, cache_dir: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    run = _interrupted_run(tiny, cache_dir, tmp_path, capsys, monkeypatch)
    rc, err = _train(capsys, tiny.train_csv, "--out", run, *OPTS, "--overwrite", "--cache-dir", cache_dir)
    assert rc == 0, err
    api.Tagger.load(run)


# ------------------------------------------------------------------ --out that cannot work
def _no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def read(*_: object, **__: object) -> None:
        raise AssertionError("the data was read before --out was checked")

    monkeypatch.setattr(train_job, "read_dataset", read)


@pytest.mark.parametrize("where, needle", [
    ("file", "exists and is not a directory"),
    ("file/run", "is not a directory"),
    ("other", "not an mmtag run directory (it holds notes.txt)"),
])
@pytest.mark.parametrize("flags", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_out_that_cannot_work_is_refused_before_any_work(
        tiny, cache_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, where: str, needle: str, flags: list[str]) -> None:
    (tmp_path / "file").write_text("keep me")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me too")
    before = _snapshot(tmp_path)
    _no_work(monkeypatch)
    rc, err = _train(capsys, tiny.train_csv, "--out", tmp_path / where, *OPTS, *flags,
                     "--cache-dir", cache_dir)
    assert rc == 2 and len(err) == 1, err
    assert str(tmp_path / where) in err[0] and needle in err[0]
    assert _snapshot(tmp_path) == before and _leftovers(tmp_path) == []


def test_unwritable_out_is_refused_before_any_work(tiny, cache_dir: str, tmp_path: Path) -> None:
    # A real `mmtag train` process. Root may write anywhere (CAP_DAC_OVERRIDE), so as root it
    # runs without that capability (setpriv, util-linux): the folder is unwritable to it too.
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cached = sorted(Path(cache_dir).rglob("*"))
    as_user = (["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
               if os.geteuid() == 0 else [])
    try:
        done = subprocess.run([*as_user, sys.executable, "-m", "mmtag", "train", str(tiny.train_csv),
                               "--out", str(locked / "run"), *OPTS, "--cache-dir", cache_dir],
                              capture_output=True, text=True, timeout=300)
    finally:
        locked.chmod(0o700)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and str(locked) in err[0], done.stderr
    assert list(locked.iterdir()) == []
    assert sorted(Path(cache_dir).rglob("*")) == cached  # no feature was computed


# ------------------------------------------------------------------ a full disk
def _disk_full_at(monkeypatch: pytest.MonkeyPatch, name: str, how: str) -> None:
    """Writing the file `name` fails as a full disk does: from the OS, or from safetensors."""
    if how == "os":
        replace = os.replace

        def full(src: object, dst: object, *args: object, **kwargs: object) -> None:
            if Path(str(dst)).name == name:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            replace(src, dst, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "replace", full)
    else:
        from safetensors import SafetensorError

        save_file = bundle.save_file

        def full_st(tensors: object, path: str, *args: object, **kwargs: object) -> None:
            save_file(tensors, path, *args, **kwargs)  # type: ignore[arg-type]
            raise SafetensorError(f'Error while serializing: I/O error: No space left on device '
                                  f'(os error {errno.ENOSPC}) at path "{path}"')

        monkeypatch.setattr(bundle, "save_file", full_st)


@pytest.mark.parametrize("how", ["os", "safetensors"])
def test_disk_full_is_one_line_keeps_the_run_and_leaves_no_temporary_files(
        finished: Path, tiny, cache_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, how: str) -> None:
    before = _snapshot(finished)
    with monkeypatch.context() as m:
        _disk_full_at(m, "head.safetensors", how)
        rc, err = _train(capsys, tiny.train_csv, "--out", finished, *OPTS, "--seed", "5",
                         "--overwrite", "--cache-dir", cache_dir)
    assert rc == 2 and len(err) == 1, err
    assert "head.safetensors: could not be written: No space left on device" in err[0]
    assert _snapshot(finished) == before and _leftovers(tmp_path) == []
    # training itself had finished: its checkpoints wait for `--resume` once there is room, and
    # a warning (before the error line; in this process, pytest's log capture takes it) says so
    assert (f"mmtag: the interrupted run is kept (config and checkpoints): `mmtag train --resume "
            f"{finished}` continues it once the cause is fixed") in caplog.messages
    rc, err = _train(capsys, "--resume", finished)
    assert rc == 0, err
    assert api.Tagger.load(finished).config.train.seed == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_disk_full_in_a_checkpoint_is_one_line(tiny, cache_dir: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _disk_full_at(monkeypatch, "head.json", "os")
    rc, err = _train(capsys, tiny.train_csv, "--out", tmp_path / "run", *OPTS, "--cache-dir", cache_dir)
    assert rc == 2 and len(err) == 1, err
    assert "head.json: could not be written: No space left on device" in err[0]
    assert list(tmp_path.iterdir()) == []  # nothing was saved to resume from: all of it went


# ------------------------------------------------------------------ a failed train
def test_a_train_failing_on_bad_input_leaves_no_run_folder(tiny, cache_dir: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The bad row is found after the run directory was made (config.yaml, train.log)."""
    bad = _bad_csv(tiny, tmp_path)
    rc, err = _train(capsys, bad, "--out", tmp_path / "run", *OPTS, "--cache-dir", cache_dir)
    assert rc == 2 and len(err) == 1 and "row 1" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]


def test_a_crash_in_training_keeps_the_checkpoints_and_says_how_to_resume(
        tiny, cache_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        make_config) -> None:
    run = tmp_path / "run"
    cfg = make_config(**{"model.modalities": ["text"], "train.epochs": 4, "train.patience": 4,
                         "model.hidden": 32, "data.workers": 0})
    save = RunLog.save

    def crash_at(epoch: int):
        def save_then_crash(self: RunLog, stage: str, state: StageState) -> None:
            if state.epoch == epoch:
                raise RuntimeError("boom")
            save(self, stage, state)
        return save_then_crash

    with monkeypatch.context() as m:  # before any epoch was saved: nothing to keep
        m.setattr(RunLog, "save", crash_at(1))
        with pytest.raises(RuntimeError, match="boom"):
            api.train(tiny.train_csv, None, run, cfg, progress=False)
    assert list(tmp_path.iterdir()) == []
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="mmtag"):
        m.setattr(RunLog, "save", crash_at(3))
        with pytest.raises(RuntimeError, match="boom"):
            api.train(tiny.train_csv, None, run, cfg, progress=False)
    assert (run / "checkpoints" / "head.json").is_file()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING][-1] == (
        f"mmtag: the interrupted run is kept (config and checkpoints): "
        f"`mmtag train --resume {run}` continues it once the cause is fixed")
    rc, err = _train(capsys, "--resume", run)
    assert rc == 0, err
    logged = (run / "train.log").read_text()
    assert "failed: RuntimeError: boom" in logged and "resuming after epoch 2/4" in logged


def test_python_api_refuses_a_finished_run_unless_overwrite(finished: Path, tiny, make_config) -> None:
    cfg = make_config(**{"model.modalities": ["text"], "train.epochs": 2, "model.hidden": 32})
    with pytest.raises(MmtagError, match="holds a finished run"):
        api.train(tiny.train_csv, None, finished, cfg, progress=False)
    _, _, manifest = api.train(tiny.train_csv, None, finished, cfg, progress=False, overwrite=True)
    assert "report.html" in manifest["files"]
    api.Tagger.load(finished)


# ------------------------------------------------------------------ one writer per run
MODEL_FILES = ("config.yaml", "labels.json", "thresholds.json", "head.safetensors",
               "validation.safetensors")


def _model_hashes(run: Path) -> dict[str, str]:
    return {name: hashlib.sha256((run / name).read_bytes()).hexdigest() for name in MODEL_FILES}


def _hold_lock(run: Path) -> "subprocess.Popen[str]":
    """Another process holding `run`'s lock, as a train writing it would, until killed."""
    code = ("import sys, time\nfrom mmtag.model import rundir\n"
            "with rundir.lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def _refused_while_held(run: Path, capsys: pytest.CaptureFixture[str], *args: object) -> None:
    """`mmtag train ARGS` while another process holds `run`'s lock: one line naming it, and
    neither the run nor anything beside it changes."""
    holder = _hold_lock(run)
    try:
        before = sorted(p.name for p in run.parent.iterdir())
        snapshot = _snapshot(run)
        rc, err = _train(capsys, *args)
        assert rc == 2 and len(err) == 1, err
        assert f"another mmtag process (PID {holder.pid}) is writing this run" in err[0]
        assert "train --resume" not in err[0]  # no advice about a state it did not leave
        assert _snapshot(run) == snapshot
        assert sorted(p.name for p in run.parent.iterdir()) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_second_writer_is_refused_with_the_holders_pid_and_touches_nothing(
        finished: Path, tiny, cache_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    _refused_while_held(finished, capsys, tiny.train_csv, "--out", finished, *OPTS, "--overwrite",
                        "--cache-dir", cache_dir)


def test_resume_takes_the_same_lock(tiny, cache_dir: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run = _interrupted_run(tiny, cache_dir, tmp_path, capsys, monkeypatch)
    _refused_while_held(run, capsys, "--resume", run)
    rc, err = _train(capsys, "--resume", run)  # once the holder is gone
    assert rc == 0, err


def test_a_killed_writer_does_not_block_the_next(finished: Path, tiny, cache_dir: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    holder = _hold_lock(finished)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    rc, err = _train(capsys, tiny.train_csv, "--out", finished, *OPTS, "--overwrite",
                     "--seed", "3", "--cache-dir", cache_dir)
    assert rc == 0, err
    api.Tagger.load(finished)
    # the dead holder's lock file went with the release of the one that replaced it
    assert sorted(p.name for p in finished.parent.iterdir()) == ["run"]


def test_concurrent_overwrites_leave_exactly_one_complete_training(
        trained_once: Path, tiny, cache_dir: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Real processes racing for one RUN, several rounds: the run always holds the files of
    exactly one complete training (those of a clean run with the winner's seed), and every
    other process either finished before the next began or was refused with one line."""
    seeds = (11, 12, 13)
    clean = {}
    for seed in seeds:  # what each contender's training gives alone
        rc, err = _train(capsys, tiny.train_csv, "--out", tmp_path / f"clean-{seed}", *OPTS,
                         "--seed", seed, "--cache-dir", cache_dir)
        assert rc == 0, err
        clean[seed] = _model_hashes(tmp_path / f"clean-{seed}")
    assert len({tuple(h.values()) for h in clean.values()}) == len(seeds)  # tellable apart
    run = tmp_path / "shared" / "run"
    shutil.copytree(trained_once, run)
    refused = 0
    for _ in range(3):
        procs = {seed: subprocess.Popen(
            [sys.executable, "-m", "mmtag", "-q", "train", str(tiny.train_csv), "--out", str(run),
             *OPTS, "--overwrite", "--seed", str(seed), "--cache-dir", cache_dir],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in seeds}
        results = {seed: (p.wait(timeout=600), p.stderr.read().strip().splitlines())
                   for seed, p in procs.items()}
        for seed, (rc, err) in results.items():
            if rc == 2:
                assert len(err) == 1 and "another mmtag process (PID " in err[0], err
                refused += 1
            else:
                assert rc == 0, (seed, err)
        winners = [seed for seed, (rc, _) in results.items() if rc == 0]
        assert winners, results
        api.Tagger.load(run)  # complete: every file matches the manifest
        assert _model_hashes(run) in [clean[seed] for seed in winners]
        assert sorted(p.name for p in run.parent.iterdir()) == ["run"]  # nothing left beside
    assert refused > 0  # they did overlap: the lock, not luck, kept the run whole
