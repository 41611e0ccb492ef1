"""Per-epoch checkpoints and logs of a run directory, so `mmtag train --resume RUN` continues.

    RUN/checkpoints/<stage>.json                 epoch, best epoch, history, optimizer settings,
                                                 LR schedule and grad-scaler state
    RUN/checkpoints/<stage>-<epoch>.safetensors  model, best model, optimizer tensors, RNG states
    RUN/metrics.csv                              one row per epoch of every stage
    RUN/tensorboard/                             the same scalars, with --tensorboard
    RUN/train.log                                a line per stage and epoch, and warnings:
                                                 `mmtag train` writes it (`mmtag.progress`)

A stage is one run of `training.loop.train_loop`: a `fit_head` call (the head; or a late-fusion
branch; or a pseudo-label round) or an encoder fine-tuning (`finetune_text`/`finetune_image`).
The JSON is written after its tensors, and names them, so a kill at any instant leaves the
previous complete checkpoint in force. No pickle: tensors in safetensors, the rest in JSON.

RUN here is the directory a run trains in: the run directory itself, or `.RUN.partial` beside it
while a finished run there is being replaced (see `mmtag.rundir`). The finished run is assembled
elsewhere and takes its place, so checkpoints never reach a finished run.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import MmtagError
from ..io import atomic_write_text, atomic_write_with, load_json

log = logging.getLogger("mmtag")

# val_metric: the F1 of the run's metric (--metric), what the best epoch is chosen by
METRIC_FIELDS = ["stage", "epoch", "train_loss", "val_loss", "val_samples_f1", "threshold", "val_metric"]


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether any stage of the run in `run_dir` finished an epoch (so `--resume` has work saved)."""
    return any((Path(run_dir) / "checkpoints").glob("*.json"))


def numpy_rng_tensor(rng: np.random.Generator) -> torch.Tensor:
    """A numpy Generator's state as a tensor a checkpoint can hold (its bit generator's state
    is a dict of ints wider than any tensor dtype: kept as the bytes of its JSON)."""
    text = json.dumps(rng.bit_generator.state)
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)


def set_numpy_rng(rng: np.random.Generator, state: torch.Tensor) -> None:
    """Put `rng` back in the state `numpy_rng_tensor` recorded."""
    rng.bit_generator.state = json.loads(bytes(state.numpy()).decode())


@dataclass
class StageState:
    """Where a stage stood after its last finished epoch."""

    epoch: int
    best_epoch: int
    best_f1: float
    stale: int
    done: bool
    history: list[dict[str, float]]
    model: dict[str, torch.Tensor]
    best_model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]
    # JSON-able states of the loop's other stateful parts (None: the stage has none), and each
    # finished epoch's wall-clock seconds (kept apart from `history`, which must be reproducible).
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    seconds: list[float] = field(default_factory=list)


@dataclass
class RunLog:
    """Checkpoints + metrics.csv (+ TensorBoard) of one run directory."""

    run_dir: Path
    tensorboard: bool = False
    _writer: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tensorboard:
            self._tensorboard()  # fail now, not after the first epoch, when it is missing

    @property
    def directory(self) -> Path:
        return self.run_dir / "checkpoints"

    # ------------------------------------------------------------------ checkpoints
    def save(self, stage: str, state: StageState) -> None:
        """Write the stage's checkpoint after an epoch (tensors first, then the JSON naming them)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v for k, v in state.model.items()}
        tensors |= {f"best.{k}": v for k, v in state.best_model.items()}
        tensors |= {f"rng.{k}": v for k, v in state.rng.items()}
        opt_meta: dict[str, Any] = {"param_groups": state.optimizer["param_groups"], "state": {}}
        for idx, entry in state.optimizer["state"].items():
            opt_meta["state"][str(idx)] = []
            for key, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"opt.{idx}.{key}"] = value
                    opt_meta["state"][str(idx)].append(key)
        tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
        name = f"{stage}-{state.epoch}.safetensors"
        atomic_write_with(self.directory / name, lambda p: save_file(tensors, str(p)))
        previous = self._meta(stage)
        atomic_write_text(self.directory / f"{stage}.json", json.dumps({
            "tensors": name, "epoch": state.epoch, "best_epoch": state.best_epoch,
            "best_f1": state.best_f1, "stale": state.stale, "done": state.done,
            "history": state.history, "optimizer": opt_meta, "scheduler": state.scheduler,
            "scaler": state.scaler, "seconds": state.seconds}, indent=1))
        if previous and previous["tensors"] != name:
            (self.directory / previous["tensors"]).unlink(missing_ok=True)

    def load(self, stage: str) -> StageState | None:
        """The stage's last checkpoint, or None when it never finished an epoch."""
        meta = self._meta(stage)
        if meta is None:
            return None
        path = self.directory / meta["tensors"]
        try:
            tensors = load_file(str(path))
        except Exception as exc:
            raise MmtagError(f"{path}: unreadable checkpoint ({exc.__class__.__name__})") from None
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for idx, keys in meta["optimizer"]["state"].items():
            opt_state[int(idx)] = {k: tensors[f"opt.{idx}.{k}"] for k in keys}

        def group(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        return StageState(
            epoch=int(meta["epoch"]), best_epoch=int(meta["best_epoch"]), best_f1=float(meta["best_f1"]),
            stale=int(meta["stale"]), done=bool(meta["done"]), history=meta["history"],
            model=group("model."), best_model=group("best."),
            optimizer={"state": opt_state, "param_groups": meta["optimizer"]["param_groups"]},
            rng=group("rng."),
            # .get: checkpoints written before these were kept lack them
            scheduler=meta.get("scheduler"), scaler=meta.get("scaler"),
            seconds=[float(s) for s in meta.get("seconds", [])])

    def _meta(self, stage: str) -> dict[str, Any] | None:
        path = self.directory / f"{stage}.json"
        if not path.is_file():
            return None
        try:
            return load_json(path, "checkpoint metadata file")
        except (OSError, ValueError):  # ValueError: invalid JSON, bytes that are not UTF-8
            raise MmtagError(f"{path}: corrupt checkpoint metadata") from None

    # ------------------------------------------------------------------ logs
    def log_epoch(self, stage: str, row: dict[str, float]) -> None:
        """Rewrite metrics.csv with every stage's epochs so far (atomic), and TensorBoard."""
        rows = self._metric_rows()
        rows = [r for r in rows if not (r["stage"] == stage and int(r["epoch"]) >= int(row["epoch"]))]
        rows.append({"stage": stage, **{k: row[k] for k in METRIC_FIELDS[1:]}})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.run_dir / "metrics.csv", buf.getvalue())
        if self.tensorboard:
            writer_tb = self._tensorboard()
            for key in METRIC_FIELDS[2:]:
                writer_tb.add_scalar(f"{stage}/{key}", float(row[key]), int(row["epoch"]))
            writer_tb.flush()

    def _metric_rows(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.csv"
        if not path.is_file():
            return []
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    def _tensorboard(self) -> Any:
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MmtagError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
