"""The one training loop: head training on it, the best-epoch rules, and a minimal trainee with
a random stream of its own, an LR schedule and clipping that resumes to the uninterrupted run."""
from __future__ import annotations

import io
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mmtag.config import TrainConfig
from mmtag.features import Features
from mmtag.heads import create_head
from mmtag.training.checkpoint import RunLog, numpy_rng_tensor, set_numpy_rng
from mmtag.training.loop import (EpochLog, Progress, Trainee, fit_head, higher_f1,
                                 higher_f1_then_lower_loss, stage_label, train_loop)
from mmtag.training.optim import make_optimizer, warmup_linear_scheduler
from training_helpers import DiesAfter, Killed


def _toy(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float16)
    y = np.stack([x[:, 0] > 0, x[:, 1] > 0.5], 1).astype(np.float32)
    y[y.sum(1) == 0, 0] = 1
    return Features({"text": x}), y


@pytest.mark.parametrize("optimizer, oversample", [("adamw", False), ("adam", True)])
def test_fit_head_learns_and_keeps_best_epoch(optimizer, oversample):
    tr, ytr = _toy(400, 0)
    va, yva = _toy(100, 1)
    cfg = TrainConfig(epochs=30, patience=30, batch_size=64, lr=3e-3, optimizer=optimizer,
                      oversample=oversample)
    torch.manual_seed(0)
    head = create_head("text", {"text": 8}, 2, hidden=32, dropout=0.0)
    result = fit_head(head, tr, ytr, va, yva, cfg, progress=False)
    f1s = [e.val_samples_f1 for e in result.history]
    assert f1s[result.best_epoch - 1] == pytest.approx(max(f1s)) and max(f1s) > 0.85
    assert result.history[-1].train_loss < result.history[0].train_loss


def _log(f1: float, val_loss: float) -> EpochLog:
    return EpochLog(epoch=1, train_loss=1.0, val_loss=val_loss, val_samples_f1=f1, threshold=0.5)


def test_best_rules():
    assert higher_f1(_log(0.0, 1.0), None)  # anything beats no best yet
    assert higher_f1(_log(0.5 + 2e-6, 1.0), _log(0.5, 1.0))
    assert not higher_f1(_log(0.5 + 1e-7, 0.1), _log(0.5, 1.0))  # the loss never decides
    assert higher_f1_then_lower_loss(_log(0.0, 9.0), None)
    assert higher_f1_then_lower_loss(_log(0.5 + 1e-8, 0.9), _log(0.5, 1.0))  # an F1 tie: the loss
    assert not higher_f1_then_lower_loss(_log(0.5, 1.0), _log(0.5, 1.0))
    assert not higher_f1_then_lower_loss(_log(0.6, 0.1), _log(0.7, 5.0))


# ----------------------------------------------------------- a trainee of the test's own
class Noisy(Trainee):
    """A dropout + linear model whose inputs get noise from a numpy stream of its own, trained
    with an LR schedule and gradient clipping: every piece of state the loop must checkpoint."""

    def __init__(self, seed: int, epochs: int) -> None:
        data = np.random.default_rng(0)
        self.x = torch.from_numpy(data.standard_normal((90, 6)).astype(np.float32))
        self.y = (self.x[:, :3] + 0.5 * torch.from_numpy(data.standard_normal((90, 3)).astype(
            np.float32)) > 0).float()
        self.xv = torch.from_numpy(data.standard_normal((30, 6)).astype(np.float32))
        self.yv = (self.xv[:, :3] > 0).float().numpy()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Dropout(0.3), nn.Linear(6, 3))
        self.optimizer = make_optimizer("adamw", self.net.parameters(), 0.05, 0.01)
        self.scheduler = warmup_linear_scheduler(self.optimizer, epochs * 6, 0.2)
        self.clip = list(self.net.parameters())
        self.max_grad_norm = 0.5
        self.noise = np.random.default_rng(seed + 1)
        self.criterion = nn.BCEWithLogitsLoss()

    def train_mode(self) -> None:
        self.net.train()

    def epoch_batches(self, generator: torch.Generator) -> list[np.ndarray]:
        order = torch.randperm(len(self.x), generator=generator).numpy()
        return [order[k:k + 16] for k in range(0, len(order), 16)]

    def batch_losses(self, batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for idx in batches:
            noise = torch.from_numpy(self.noise.normal(size=(len(idx), 6)).astype(np.float32))
            yield idx, self.criterion(self.net(self.x[idx] + noise), self.y[idx])

    def val_logits(self) -> torch.Tensor:
        self.net.eval()
        with torch.no_grad():
            return self.net(self.xv)

    def state(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict(state)

    def rng_state(self) -> dict[str, torch.Tensor]:
        return {"noise": numpy_rng_tensor(self.noise)}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        set_numpy_rng(self.noise, state["noise"])


def _run(run_log: RunLog | None, epochs: int = 5, patience: int | None = None):
    trainee = Noisy(3, epochs)
    result = train_loop(trainee, trainee.yv, trainee.criterion, epochs=epochs, seed=7,
                        better=higher_f1_then_lower_loss, patience=patience, run_log=run_log,
                        stage="noisy", progress=Progress(show=False))
    return trainee, result


def test_trainee_resumes_to_the_uninterrupted_run(tmp_path: Path) -> None:
    straight_trainee, straight = _run(None)
    with pytest.raises(Killed):
        _run(DiesAfter(tmp_path, 2))
    saved = RunLog(tmp_path).load("noisy")
    assert saved is not None and saved.epoch == 2 and saved.scheduler is not None
    assert saved.scheduler["last_epoch"] == 12 and set(saved.rng) >= {"torch", "generator", "noise"}
    trainee, resumed = _run(RunLog(tmp_path))
    assert resumed.history == straight.history and resumed.best_epoch == straight.best_epoch
    assert len(resumed.seconds) == 5
    for k, v in straight_trainee.net.state_dict().items():
        assert torch.equal(v, trainee.net.state_dict()[k]), k
    # the trainee's own stream continued where it stopped, not from its seed
    assert trainee.noise.bit_generator.state == straight_trainee.noise.bit_generator.state
    assert trainee.scheduler.state_dict() == straight_trainee.scheduler.state_dict()


def test_trainee_finished_stage_is_not_retrained(tmp_path: Path) -> None:
    _, first = _run(RunLog(tmp_path), epochs=3)
    trainee, again = _run(RunLog(tmp_path), epochs=3)
    assert again.history == first.history and again.seconds == first.seconds
    assert trainee.scheduler.last_epoch == 18  # restored, not stepped again


def test_patience_stops_and_keeps_the_best_weights() -> None:
    trainee, result = _run(None, epochs=40, patience=2)
    assert len(result.history) < 40 and len(result.history) == result.best_epoch + 2
    best = result.history[result.best_epoch - 1]
    assert all(not higher_f1_then_lower_loss(e, best) for e in result.history)
    # the trainee holds the best epoch's weights, not the last epoch's
    val_loss = float(trainee.criterion(trainee.val_logits(), torch.from_numpy(trainee.yv)))
    assert val_loss == best.val_loss != result.history[-1].val_loss


# ------------------------------------------------------------------ progress
EPOCH_LINE = re.compile(r"noisy head: epoch (\d+)/40, train loss \d+\.\d{4}, val loss \d+\.\d{4}, "
                        r"val F1 \d\.\d{4} \(best \d\.\d{4} at epoch \d+\), elapsed \d\d:\d\d, "
                        r"ETA \d\d:\d\d")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _progress_run(progress: Progress, run_log: RunLog | None = None, epochs: int = 40):
    trainee = Noisy(3, epochs)
    return train_loop(trainee, trainee.yv, trainee.criterion, epochs=epochs, seed=7,
                      better=higher_f1_then_lower_loss, patience=2, run_log=run_log,
                      stage="noisy", progress=progress)


def _shown(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mmtag.progress"]


def test_off_a_terminal_each_stage_and_epoch_is_one_plain_line(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)  # CI, nohup, `| tee`: not a terminal
    with caplog.at_level(logging.INFO, logger="mmtag.progress"):
        result = _progress_run(Progress(label="noisy head"))
    lines = _shown(caplog)
    assert lines[0] == "noisy head: training up to 40 epochs (stage noisy)"
    epochs = [int(m[1]) for m in map(EPOCH_LINE.fullmatch, lines[1:-1]) if m]
    assert epochs == list(range(1, len(result.history) + 1)) == list(range(1, len(lines) - 1))
    assert len(result.history) < 40  # stopped early: the last line says so
    assert lines[-1].startswith(f"noisy head: early stop at epoch {len(result.history)}/40, "
                                f"best epoch {result.best_epoch} (val F1 ")
    assert "\r" not in piped.getvalue()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mmtag.progress"):
        _progress_run(Progress(label="noisy head", show=False))
    assert _shown(caplog) == []  # -q: none on the console (train.log still gets them)


def test_in_a_terminal_an_early_stop_closes_the_bar_full(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with caplog.at_level(logging.INFO, logger="mmtag.progress"):
        result = _progress_run(Progress(label="noisy head"))
    n = len(result.history)
    assert n < 40
    last = terminal.getvalue().rstrip("\n").split("\r")[-1]
    assert last.startswith("noisy head: 100%") and f"{n}/{n} " in last, last
    assert _shown(caplog) == []  # the bar says it all


def test_long_epochs_get_a_row_bar_and_their_epoch_lines_in_a_terminal(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Fine-tuning's way: a bar over each epoch's rows, and each epoch's line above the bars."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with caplog.at_level(logging.INFO, logger="mmtag.progress"):
        result = _progress_run(Progress(label="noisy head", per_row=True, log_epochs=True),
                               epochs=3)
    assert "noisy head epoch 3/3: 100%" in terminal.getvalue() and "90/90" in terminal.getvalue()
    assert [m[1] for m in map(re.compile(r"noisy head: epoch (\d)/3, ").match, _shown(caplog))
            if m] == ["1", "2", "3"][:len(result.history)]


def test_a_resumed_stage_says_where_it_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with pytest.raises(Killed):
        _run(DiesAfter(tmp_path, 2))
    with caplog.at_level(logging.INFO, logger="mmtag.progress"):
        _progress_run(Progress(label="noisy head"), run_log=RunLog(tmp_path), epochs=5)
        _progress_run(Progress(label="noisy head"), run_log=RunLog(tmp_path), epochs=5)
    lines = _shown(caplog)
    assert lines[0] == "noisy head: resuming after epoch 2/5 (stage noisy)"
    assert lines[1].startswith("noisy head: epoch 3/5, ")
    assert lines[-1].startswith("noisy head: finished before the interruption (best epoch ")


@pytest.mark.parametrize("stage, label", [
    ("head", "head concat"), ("fold2-head", "fold 2/5 head concat"),
    ("fold3-pseudo-1", "fold 3/5 pseudo-1 (head concat)"), ("branch-text", "branch-text (head concat)")])
def test_stage_labels_say_what_trains(stage: str, label: str) -> None:
    head = create_head("concat", {"image": 4, "text": 4}, 2, hidden=8, dropout=0.0)
    assert stage_label(stage, head, 5) == label


# ------------------------------------------------------------------ --metric
class Scripted(Trainee):
    """A trainee whose validation scores are scripted per epoch (its one weight trains on a
    constant loss): the loop's choice of epoch is all that is tested."""

    def __init__(self, scores: list[np.ndarray]) -> None:
        self.scores, self.epoch = scores, 0
        self.w = nn.Parameter(torch.zeros(1))
        self.optimizer = make_optimizer("adamw", [self.w], 0.01, 0.0)

    def train_mode(self) -> None:
        self.epoch += 1

    def epoch_batches(self, generator: torch.Generator) -> list[np.ndarray]:
        return [np.arange(4)]

    def batch_losses(self, batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for idx in batches:
            yield idx, (self.w ** 2).sum() + 1.0

    def val_logits(self) -> torch.Tensor:
        p = np.clip(self.scores[self.epoch - 1], 1e-6, 1 - 1e-6)
        return torch.from_numpy(np.log(p / (1 - p)).astype(np.float32))

    def state(self) -> dict[str, torch.Tensor]:
        return {"w": self.w.detach(), "epoch": torch.tensor(self.epoch)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        pass


def _common_then_rare() -> tuple[np.ndarray, list[np.ndarray]]:
    """20 rows of a common label, 2 of them also a rare one. Epoch 1 never predicts the rare label
    (sample-F1 0.9667, macro-F1 0.5); epoch 2 finds it at the cost of 6 false positives (the same
    sample-F1 at its best threshold, macro-F1 0.7); epoch 3 is epoch 1 again."""
    y = np.zeros((20, 2), dtype=np.float32)
    y[:, 0] = 1
    y[:2, 1] = 1
    first = np.stack([np.full(20, 0.9), np.full(20, 0.1)], axis=1)
    second = first.copy()
    second[:8, 1] = 0.8
    return y, [first, second, first]


@pytest.mark.parametrize("metric, best_epoch", [("samples", 1), ("micro", 1), ("macro", 2)])
def test_the_best_epoch_is_chosen_by_the_metric_asked_for(metric: str, best_epoch: int) -> None:
    from mmtag.decision.metrics import macro_f1, micro_f1, samples_f1
    from mmtag.decision.thresholds import decide, tune_global

    y, scores = _common_then_rare()
    result = train_loop(Scripted(scores), y, nn.BCEWithLogitsLoss(), epochs=3, seed=0,
                        better=higher_f1, metric=metric, progress=Progress(show=False))
    assert result.best_epoch == best_epoch
    score = {"samples": samples_f1, "micro": micro_f1, "macro": macro_f1}[metric]
    for entry, probs in zip(result.history, scores):
        decided = decide(probs.astype(np.float32), tune_global(probs.astype(np.float32), y, metric=metric))
        assert entry.val_metric == pytest.approx(score(y, decided))
        assert entry.val_samples_f1 == pytest.approx(samples_f1(y, decided))  # kept, as before
    if metric == "samples":
        assert all(e.val_metric == e.val_samples_f1 for e in result.history)


def test_a_history_written_before_the_metric_was_kept_reads_as_sample_f1(tmp_path: Path) -> None:
    old = {"epoch": 2, "train_loss": 1.0, "val_loss": 0.5, "val_samples_f1": 0.7, "threshold": 0.4}
    entry = EpochLog(**old)
    assert entry.val_metric == 0.7
    assert higher_f1(entry, EpochLog(**{**old, "val_samples_f1": 0.6}))


def test_fit_head_chooses_its_epoch_by_the_configured_metric() -> None:
    tr, ytr = _toy(200, 0)
    va, yva = _toy(60, 1)
    torch.manual_seed(0)
    head = create_head("text", {"text": 8}, 2, hidden=16, dropout=0.0)
    cfg = TrainConfig(epochs=6, patience=6, batch_size=64, lr=3e-3, metric="macro")
    result = fit_head(head, tr, ytr, va, yva, cfg, progress=False)
    figures = [e.val_metric for e in result.history]
    assert result.best_epoch == 1 + int(np.argmax(np.round(figures, 9)))
    assert any(e.val_metric != e.val_samples_f1 for e in result.history)  # macro-F1, not sample-F1
