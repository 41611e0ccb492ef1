"""The one training loop: head training on it, the best-epoch rules, and a minimal trainee with
a random stream of its own, an LR schedule and clipping that resumes to the uninterrupted run."""
from __future__ import annotations

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
                                 higher_f1_then_lower_loss, train_loop)
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
