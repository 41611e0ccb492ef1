"""Shared by the training tests: a run "killed" right after a checkpoint, and a counting loss."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmtag.training.checkpoint import RunLog, StageState


class Killed(Exception):
    pass


class DiesAfter(RunLog):
    """A RunLog whose process "dies" right after writing epoch `k`'s checkpoint, once: the
    next call with the same RunLog is the resumed run, which lives on."""

    def __init__(self, run_dir: Path, k: int) -> None:
        super().__init__(run_dir)
        self.k = k

    def save(self, stage: str, state: StageState) -> None:
        super().save(stage, state)
        if state.epoch == self.k:
            self.k = -1
            raise Killed


class CountingBCE(nn.Module):
    """BCE-with-logits that counts its calls (to show a loss was used, or not)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.bce(logits, y)
