"""Per-epoch checkpoints: an interrupted run resumes to exactly the uninterrupted result,
in-process and after SIGKILL of the real `mmtag train`; metrics.csv and config reproduction.
(Fine-tuning's checkpoints are tested in test_finetune.py, the loop's own in test_loop.py.)"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mmtag.training.checkpoint import RunLog, StageState, numpy_rng_tensor, set_numpy_rng
from mmtag.config import TrainConfig
from mmtag.features import Features
from mmtag.heads import create_head
from mmtag.training.loop import fit_head
from training_helpers import DiesAfter, Killed


def _problem(seed: int = 0) -> tuple[Features, np.ndarray, Features, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(240, 16)).astype(np.float16)
    y = (x[:, :4].astype(np.float32) + 0.3 * rng.normal(size=(240, 4)) > 0).astype(np.float32)
    return Features({"text": x[:200]}), y[:200], Features({"text": x[200:]}), y[200:]


def _fit(run_log: RunLog | None, cfg: TrainConfig):
    tr, ytr, va, yva = _problem()
    torch.manual_seed(123)  # head init; fit_head reseeds its own streams
    head = create_head("text", {"text": 16}, 4, hidden=32, dropout=0.3)
    return fit_head(head, tr, ytr, va, yva, cfg, progress=False, run_log=run_log)


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=12, patience=100, batch_size=32, lr=3e-3)
    straight = _fit(None, cfg)
    with pytest.raises(Killed):
        _fit(DiesAfter(tmp_path, 5), cfg)
    state = RunLog(tmp_path).load("head")
    assert state is not None and state.epoch == 5 and not state.done
    resumed = _fit(RunLog(tmp_path), cfg)
    assert [h.epoch for h in resumed.history] == list(range(1, 13))
    assert resumed.history_dicts() == straight.history_dicts()
    for k, v in straight.head.state_dict().items():
        assert torch.equal(v, resumed.head.state_dict()[k]), k
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 13)) and rows[0]["stage"] == "head"


EARLY_STOP = TrainConfig(epochs=40, patience=3, batch_size=32, lr=3e-3)


@pytest.fixture(scope="module")
def early_stopped():
    """The uninterrupted run with early stopping, shared by the kill points below."""
    return _fit(None, EARLY_STOP)


@pytest.mark.parametrize("kill", ["while-stale", "epoch-before-stop", "at-stop"])
def test_resume_with_early_stopping_equals_uninterrupted(tmp_path: Path, early_stopped, kill: str) -> None:
    """patience < epochs, and the run really stops early; a kill while epochs without improvement
    are being counted, or at the stopping epoch itself, resumes to the same stop and weights."""
    cfg, straight = EARLY_STOP, early_stopped
    stopped = straight.history[-1].epoch
    assert stopped < cfg.epochs and stopped == straight.best_epoch + cfg.patience  # early stop
    best = -1.0
    stale_epochs = []  # epochs that did not improve on the best so far
    for h in straight.history:
        if h.val_samples_f1 > best + 1e-6:
            best = h.val_samples_f1
        else:
            stale_epochs.append(h.epoch)
    k = {"while-stale": stale_epochs[0], "epoch-before-stop": stopped - 1, "at-stop": stopped}[kill]
    assert k < stopped or kill == "at-stop"
    with pytest.raises(Killed):
        _fit(DiesAfter(tmp_path, k), cfg)
    state = RunLog(tmp_path).load("head")
    assert state is not None and state.epoch == k and state.done == (k == stopped)
    assert kill == "at-stop" or state.stale > 0  # the kill landed inside a patience count
    resumed = _fit(RunLog(tmp_path), cfg)
    assert resumed.history_dicts() == straight.history_dicts()
    assert resumed.best_epoch == straight.best_epoch
    for key, v in straight.head.state_dict().items():
        assert torch.equal(v, resumed.head.state_dict()[key]), key


def test_finished_stage_is_not_retrained(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=4, patience=100, batch_size=64)
    first = _fit(RunLog(tmp_path), cfg)
    again = _fit(RunLog(tmp_path), cfg)
    assert again.history_dicts() == first.history_dicts()
    assert len(list((tmp_path / "checkpoints").glob("*.safetensors"))) == 1  # old epochs pruned


def test_loop_state_round_trips_and_older_checkpoints_still_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rng.normal(size=3)
    state = StageState(
        epoch=2, best_epoch=1, best_f1=0.5, stale=1, done=False, history=[], model={},
        best_model={}, optimizer={"state": {}, "param_groups": []},
        rng={"augment": numpy_rng_tensor(rng)}, scheduler={"last_epoch": 7, "_last_lr": [0.1]},
        scaler={"scale": 1024.0, "_growth_tracker": 3}, seconds=[1.5, 2.25])
    RunLog(tmp_path).save("s", state)
    back = RunLog(tmp_path).load("s")
    assert back is not None and back.scheduler == state.scheduler and back.scaler == state.scaler
    assert back.seconds == [1.5, 2.25]
    again = np.random.default_rng(0)
    set_numpy_rng(again, back.rng["augment"])
    assert again.normal() == rng.normal()  # the stream continues where it was saved
    # a checkpoint written before the loop kept these: none, not an error
    meta = tmp_path / "checkpoints" / "s.json"
    old = json.loads(meta.read_text())
    for key in ("scheduler", "scaler", "seconds"):
        del old[key]
    meta.write_text(json.dumps(old))
    back = RunLog(tmp_path).load("s")
    assert back is not None and back.scheduler is None and back.scaler is None and back.seconds == []


def test_corrupt_checkpoint_metadata_is_a_clear_error(tmp_path: Path) -> None:
    from mmtag.errors import MmtagError

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/head.json").write_text("{not json")
    with pytest.raises(MmtagError, match="corrupt checkpoint"):
        RunLog(tmp_path).load("head")


# ------------------------------------------------------------------ the real CLI, killed
def _mmtag(*args: object, cache: str) -> list[str]:
    return [sys.executable, "-m", "mmtag", "-q", *map(str, args), "--cache-dir", cache]


def _run_dirs(run: Path) -> list[Path]:
    """Where a run being trained into RUN may live: RUN itself, or a sibling named after it
    (`.RUN.partial`, a staging directory) while a finished run at RUN is being replaced."""
    if not run.parent.is_dir():
        return []
    return sorted(p for p in run.parent.iterdir() if p.is_dir() and
                  (p.name == run.name or p.name.startswith((run.name + ".", "." + run.name + "."))))


def _checkpoint_epoch(run: Path) -> int:
    """The furthest epoch any checkpoint of the run in progress has recorded (0: none yet)."""
    epoch = 0
    for d in _run_dirs(run):
        for meta in d.glob("**/checkpoints/*.json"):
            try:
                epoch = max(epoch, int(json.loads(meta.read_text()).get("epoch", 0)))
            except (OSError, ValueError):
                continue  # removed or replaced while being read: look again next time
    return epoch


def _shards(cache: Path) -> int:
    return len(list(cache.glob("**/*.safetensors"))) if cache.is_dir() else 0


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (polling the filesystem), failing the test if the
    run ends first: every kill provably lands inside a run that was still going."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"training ended before {what}: nothing was interrupted"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    assert proc.poll() is None, f"training ended before it could be killed after {what}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_mid_training_then_resume_gives_same_metrics(tiny, tmp_path: Path, cache_dir: str) -> None:
    # batch size 4 makes each epoch take long enough to be killed inside one; two folds are
    # enough stages to resume across (a fold's checkpoints, then the next fold's)
    opts = ["--images", tiny.images, "--modalities", "text", "--epochs", "12", "--patience", "12",
            "--batch-size", "4", "--hidden", "64", "--workers", "0", "--folds", "2"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = subprocess.run(_mmtag("train", tiny.train_csv, "--out", ref, *opts, cache=cache_dir),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr

    proc = subprocess.Popen(_mmtag("train", tiny.train_csv, "--out", run, *opts, cache=cache_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: _checkpoint_epoch(run) >= 3, "epoch 3's checkpoint")
    assert not (run / "manifest.json").exists()
    assert 3 <= _checkpoint_epoch(run) < 12

    r = subprocess.run([sys.executable, "-m", "mmtag", "-q", "train", "--resume", run],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, MMTAG_CACHE=cache_dir))
    assert r.returncode == 0, r.stderr
    want = json.loads((ref / "metrics.json").read_text())
    got = json.loads((run / "metrics.json").read_text())
    assert got["validation"] == want["validation"]
    assert got["history"] == want["history"]
    assert (run / "report.html").is_file() and not (run / "checkpoints").exists()
    # every stage (each fold, then the stacker) logged the same epochs as the uninterrupted run
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert rows == list(csv.DictReader(open(ref / "metrics.csv")))
    assert len({r["stage"] for r in rows}) > 1


def test_train_config_yaml_reproduces_the_run(tiny, tmp_path: Path, cache_dir: str) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    r = subprocess.run(_mmtag("train", tiny.train_csv, "--images", tiny.images, "--out", first,
                              "--epochs", "8", "--hidden", "64", "--workers", "0", "--fusion", "mean",
                              "--folds", "2",
                              cache=cache_dir), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(_mmtag("train", "--config", first / "config.yaml", "--out", second,
                              cache=cache_dir), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    a = json.loads((first / "metrics.json").read_text())
    b = json.loads((second / "metrics.json").read_text())
    assert a["validation"] == b["validation"] and a["history"] == b["history"]


def test_sigkill_at_random_points_then_rerun_or_resume(tiny, tmp_path: Path) -> None:
    """Kill trials at seeded random points of a run with early stopping (patience < epochs, and
    it does stop early): during feature extraction (once the first cache shard of a cold cache
    is written) and after a random epoch's checkpoint. Each kill is shown to interrupt the run;
    rerun or resume must then end identical to the uninterrupted run."""
    opts = ["--images", tiny.images, "--epochs", "30", "--patience", "3", "--batch-size", "4",
            "--hidden", "64", "--workers", "0", "--folds", "2"]
    ref = tmp_path / "ref"
    r = subprocess.run(_mmtag("train", tiny.train_csv, "--out", ref, *opts, cache=str(tmp_path / "c-ref")),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    want = json.loads((ref / "metrics.json").read_text())
    stopped = want["history"][-1]["epoch"]
    assert stopped < 30, "the reference run must stop early for this test to cover early stopping"
    rng = np.random.default_rng(7)
    kills = [("a cache shard", 0), *(("checkpoint", int(e)) for e in rng.integers(1, stopped, size=2))]
    for trial, (kind, epoch) in enumerate(kills):
        run, cache = tmp_path / f"trial{trial}", tmp_path / f"c{trial}"
        cmd = _mmtag("train", tiny.train_csv, "--out", run, *opts, cache=str(cache))
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kind == "checkpoint":
            _kill_when(proc, lambda: _checkpoint_epoch(run) >= epoch, f"epoch {epoch}'s checkpoint")
            assert _checkpoint_epoch(run) >= epoch, trial
        else:
            _kill_when(proc, lambda: _shards(cache) > 0, "the first cache shard")
        assert not (run / "manifest.json").exists(), trial  # interrupted: not a finished run
        # killed before the config was written: start again; afterwards: resume
        started = any((d / "config.yaml").is_file() for d in _run_dirs(run))
        again = [sys.executable, "-m", "mmtag", "-q", "train", "--resume", run] if started else cmd
        r = subprocess.run(again, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, MMTAG_CACHE=str(cache)))
        assert r.returncode == 0, (trial, r.stderr)
        got = json.loads((run / "metrics.json").read_text())
        assert got["validation"] == want["validation"], trial
        assert got["history"] == want["history"], trial


def test_tensorboard_logs_every_stage_into_the_run(tiny, tmp_path: Path, make_config) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mmtag import api

    run = tmp_path / "run"
    api.train(tiny.train_csv, None, run, make_config(**{"model.modalities": ["text"], "train.epochs": 3}),
              progress=False, tensorboard=True)
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    logged = {row["stage"] for row in csv.DictReader(open(run / "metrics.csv"))}
    tags = events.Tags()["scalars"]
    assert logged and {tag.split("/")[0] for tag in tags} == logged
    assert all(len(events.Scalars(tag)) == 3 for tag in tags)  # one point per epoch
