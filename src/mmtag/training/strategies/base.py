"""Training strategies: the registry, and the state they work on.

A strategy is one way to train (part of) a model, in one of three phases the trainer runs in
order: `encoders` (before features: replace encoders, e.g. fine-tuning), `head` (train the head
on features: exactly one runs) and `refine` (improve a trained head, e.g. self-training). A
built-in strategy switches itself on from the inputs it needs (`--finetune`, `--extra-text`,
`--unlabeled`); any strategy can also be asked for by name (`train.strategies`). Adding one is
one file: a `Strategy` subclass with `@register_strategy("name")`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ... import registries
from ...config import Config
from ...data import Dataset, LabelSpace
from ...errors import MmtagError
from ...features import Features
from ...heads import Head, create_head
from ..checkpoint import RunLog
from ..loop import FitResult, fit_head, seed_everything
from ..losses import create_loss

if TYPE_CHECKING:
    from ...features.pipeline import Featurizer

PHASES = ("encoders", "head", "refine")


@dataclass
class TrainInputs:
    """The data a training run was given; strategies switch on from what is there."""

    train: Dataset
    val: Dataset | None = None
    unlabeled: Dataset | None = None
    extra_text: Dataset | None = None


@dataclass
class TrainState:
    """What the strategies of one run read and write, phase after phase.

    The `encoders` phase sees the datasets (`train_data`, `val_data`) and the label space; the
    later phases also the features (`train`, `val`) and their label matrices, and leave their
    result in `result`.
    """

    config: Config
    featurizer: "Featurizer"
    inputs: TrainInputs
    label_space: LabelSpace
    train_data: Dataset
    val_data: Dataset
    run_log: RunLog | None = None
    progress: bool = True
    dims: dict[str, int] = field(default_factory=dict)
    train: Features | None = None
    val: Features | None = None
    y_train: np.ndarray | None = None
    y_val: np.ndarray | None = None
    views: list[Features] | None = None
    result: FitResult | None = None
    log: dict[str, object] = field(default_factory=dict)  # what strategies report (bundle extras)
    stage_prefix: str = ""  # cross-fitting: "fold2-", so each fold's checkpoints are its own

    @property
    def head_name(self) -> str:
        return self.config.model.head_name()

    def new_head(self, name: str | None = None) -> Head:
        """A fresh head (default: the configured one) for this run's features and labels."""
        return create_head(name or self.head_name, self.dims, len(self.label_space),
                           self.config.model)

    def fit(self, train: Features, y_train: np.ndarray, *, head: Head | None = None,
            views: list[Features] | None = None, stage: str = "head") -> FitResult:
        """Train a head (default: a fresh one of the configured kind; seeded before it is built)
        on `train`, with early stopping on this run's validation features."""
        cfg = self.config
        assert self.val is not None and self.y_val is not None, "features come before the head"
        if head is None:
            seed_everything(cfg.train.seed)
            head = self.new_head()
        return fit_head(head, train, y_train, self.val, self.y_val, cfg.train,
                        criterion=create_loss(cfg.train.loss, y_train), views=views,
                        progress=self.progress, run_log=self.run_log,
                        stage=self.stage_prefix + stage)


class Strategy:
    """One way to train; see the module docstring. Subclasses set `phase` and implement `run`."""

    name: ClassVar[str] = ""
    phase: ClassVar[str] = "head"

    @classmethod
    def active(cls, config: Config, inputs: TrainInputs) -> bool:
        """Whether this run uses the strategy. By default: when `train.strategies` names it."""
        return cls.name in config.train.strategies

    def run(self, state: TrainState) -> None:
        raise NotImplementedError


STRATEGIES = registries.STRATEGIES  # the built-ins are declared there; `planning` looks them up


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    def deco(cls: type[Strategy]) -> type[Strategy]:
        if cls.phase not in PHASES:
            raise MmtagError(f"strategy {name!r}: phase must be one of {', '.join(PHASES)}")
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return deco
