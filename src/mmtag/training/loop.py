"""The one training loop, and head training on cached features built on it.

`train_loop` runs the epochs of whatever trains on the multi-label task (a `Trainee`: a head on
cached features here, an encoder with a temporary task head in `training.finetune`): batches
split across torchrun ranks, gradient scaling under `--amp`, validation F1 (the run's metric,
`--metric`: sample-F1 by default) at its tuned global threshold every epoch, the best epoch's
weights kept by a rule the caller picks, optional
early stopping, and per-epoch checkpoints through `RunLog` that a resumed run continues from to
exactly the uninterrupted result. Seeded and deterministic on CPU. It reports through
`mmtag.progress`: a labelled bar in a terminal, a line per stage and epoch (losses, val F1,
elapsed, ETA) elsewhere, and those lines in the run's train.log always.

`fit_head` trains a head with BCE-with-logits (or the given loss), AdamW by default, and early
stopping on validation F1 of the configured metric (`train.metric`).
"""
from __future__ import annotations

import copy
import random
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .. import dist
from ..config import TrainConfig
from ..decision.metrics import metric_title, samples_f1
from ..decision.thresholds import SAMPLES, decide, metric_score, tune_global
from ..features import Features
from ..heads import HEADS, FeatureBatch, Head
from ..heads.scoring import batch_of, predict_logits, to_device
from ..progress import Bar, Mode, duration, eta, line, mode
from .checkpoint import RunLog, StageState
from .optim import make_optimizer
from .sampling import epoch_order, repeat_factors

@dataclass
class EpochLog:
    """One finished epoch: mean training loss, and validation loss, sample-F1 and the run's
    metric (`val_metric`, what the best epoch is chosen by) at the global threshold tuned for
    that metric."""

    epoch: int
    train_loss: float
    val_loss: float
    val_samples_f1: float
    threshold: float
    # the F1 of the run's metric (`--metric`); histories written before it was kept chose by
    # sample-F1, so a missing one reads as val_samples_f1
    val_metric: float | None = None

    def __post_init__(self) -> None:
        if self.val_metric is None:
            self.val_metric = self.val_samples_f1


@dataclass
class FitResult:
    """The trained head (best epoch's weights) and the per-epoch history."""

    head: Head
    history: list[EpochLog] = field(default_factory=list)
    best_epoch: int = 0

    def history_dicts(self) -> list[dict[str, float]]:
        return [asdict(e) for e in self.history]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _loss(head: nn.Module, batch: FeatureBatch, y: torch.Tensor, criterion: nn.Module) -> torch.Tensor:
    out = head(batch)
    loss = criterion(out.logits.float(), y)
    for branch in out.branches.values():
        loss = loss + criterion(branch.float(), y)
    return loss


def views_batch(views: list[Features], choice: np.ndarray, needs: tuple[str, ...],
                idx: np.ndarray) -> FeatureBatch:
    """Rows `idx`, each taken from the view `choice[row]` (view 0 = the plain features; a view
    lacking a kind, e.g. an unaugmented modality, falls back to the plain one)."""
    out: dict[str, torch.Tensor] = {}
    for kind in needs:
        plain = views[0][kind]
        arr = np.empty((len(idx),) + plain.shape[1:], dtype=np.float32)
        picked = choice[idx]
        for v in np.unique(picked):
            source = views[v].get(kind)
            source = plain if source is None else source
            mask = picked == v
            arr[mask] = source[idx[mask]]
        out[kind] = torch.from_numpy(arr)
    return FeatureBatch(out)


# ------------------------------------------------------------------------- the one loop
class Trainee(ABC):
    """What `train_loop` trains: its weights and optimiser, and how one epoch's batches, their
    losses and the validation logits come about. The loop owns the rest: epochs, the shuffling
    generator, gradient scaling, validation metrics, best weights, checkpoints and resuming."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None  # stepped after every step
    clip: list[nn.Parameter] | None = None  # parameters whose global gradient norm is clipped
    max_grad_norm: float = 1.0

    @abstractmethod
    def train_mode(self) -> None:
        """Put the trained modules in training mode (before each epoch)."""

    @abstractmethod
    def epoch_batches(self, generator: torch.Generator) -> list[np.ndarray]:
        """The epoch's global batches of training rows, in order, drawn from `generator` (the
        loop's shuffling stream; per-epoch draws of the trainee's own come from it too)."""

    @abstractmethod
    def batch_losses(self, batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """For each of this rank's `batches`, in order: its rows and their mean loss (with grad)."""

    @abstractmethod
    def val_logits(self) -> torch.Tensor:
        """Logits of every validation row, in order, as a CPU tensor outside inference mode."""

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint saves (live tensors: checkpoints copy them)."""

    @abstractmethod
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights `state()` or `snapshot()` returned (possibly through a checkpoint)."""

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of `state()` that further training leaves alone: the best epoch's weights."""
        return {k: v.detach().clone() for k, v in self.state().items()}

    def rng_state(self) -> dict[str, torch.Tensor]:
        """The states of random streams of its own (beyond torch's global one and the loop's
        shuffling generator), for checkpoints; keys other than torch, cuda and generator."""
        return {}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `rng_state` returned (`state` may hold the loop's streams too)."""


BestRule = Callable[[EpochLog, EpochLog | None], bool]  # (this epoch, best so far) → better?


def higher_f1(epoch: EpochLog, best: EpochLog | None) -> bool:
    """Better = a validation F1 of the run's metric (`val_metric`; sample-F1 by default) higher
    than the best so far by more than 1e-6."""
    best_f1 = _figure(best) if best is not None else -1.0
    return _figure(epoch) > best_f1 + 1e-6


def higher_f1_then_lower_loss(epoch: EpochLog, best: EpochLog | None) -> bool:
    """Better = a higher validation F1 of the run's metric (to 6 decimals); a tie (common on
    small validation sets) goes to the lower validation loss."""
    def key(e: EpochLog) -> tuple[float, float]:
        return round(_figure(e), 6), -e.val_loss

    return best is None or key(epoch) > key(best)


def _figure(e: EpochLog) -> float:
    return e.val_samples_f1 if e.val_metric is None else e.val_metric


@dataclass(frozen=True)
class Progress:
    """How `train_loop` reports its progress (nothing it computes depends on this).

    Every stage and every epoch gives a line (label, epoch, losses, val F1, elapsed, ETA) to
    train.log, and to the console where no bar shows it (`mmtag.progress`); `show=False`
    (`-q`) keeps them off the console only."""

    label: str = "training"
    per_row: bool = False  # a bar over each epoch's rows (few long epochs), else one over epochs
    log_epochs: bool = False  # in a terminal too, each epoch's line above the bars (long epochs)
    show: bool = True


@dataclass
class LoopResult:
    """The per-epoch history, each epoch's wall-clock seconds, and the best epoch (1-based; its
    weights are what the trainee holds when `train_loop` returns)."""

    history: list[EpochLog] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    best_epoch: int = 0


def train_loop(trainee: Trainee, y_val: np.ndarray, criterion: nn.Module, *, epochs: int,
               seed: int, better: BestRule, patience: int | None = None,
               run_log: RunLog | None = None, stage: str = "head",
               progress: Progress = Progress(), metric: str = SAMPLES) -> LoopResult:
    """Train `trainee` for up to `epochs` epochs and leave it holding its best epoch's weights.

    Each epoch: the trainee's batches (shuffled by a generator seeded with `seed`) are trained
    on, then the validation logits are scored with `criterion`, and with `metric` (sample-F1
    unless told; `val_metric`) and sample-F1 against `y_val` at the global threshold
    `tune_global` picks for `metric`; `better(epoch, best)` says whether the epoch's weights
    replace the best so far. With `patience`, training stops after that many
    epochs in a row without a better one.

    With `run_log`, every epoch is logged and checkpointed under `stage` (weights, best weights,
    optimizer, LR schedule, grad scaler, every random stream), and a checkpoint left by an
    interrupted run is continued from: the result equals that of an uninterrupted run (but for
    the wall-clock seconds). A finished stage's checkpoint is not trained on again.

    Under torchrun every rank calls this with the same data: each global batch is split across
    ranks, DDP averages the gradients (weighted so the step equals the single-process one), and
    only rank 0 should pass `run_log`.
    """
    ctx = dist.context()
    generator = torch.Generator().manual_seed(seed)
    scaler = torch.amp.GradScaler("cuda", enabled=ctx.amp)
    optimizer = trainee.optimizer
    yv = torch.from_numpy(y_val.astype(np.float32))
    result = LoopResult()
    best_state, stale = trainee.snapshot(), 0
    start = 1
    saved = dist.broadcast(run_log.load(stage) if run_log is not None else None)
    if saved is not None:
        trainee.load_state(saved.model)
        optimizer.load_state_dict(saved.optimizer)
        if trainee.scheduler is not None and saved.scheduler is not None:
            trainee.scheduler.load_state_dict(saved.scheduler)
        if scaler.is_enabled() and saved.scaler:
            scaler.load_state_dict(saved.scaler)
        torch.set_rng_state(saved.rng["torch"])
        if "cuda" in saved.rng and ctx.device.type == "cuda":
            torch.cuda.set_rng_state(saved.rng["cuda"], ctx.device)
        generator.set_state(saved.rng["generator"])
        trainee.set_rng_state(saved.rng)
        result.history = [EpochLog(**h) for h in saved.history]  # type: ignore[arg-type]
        # checkpoints written before the seconds were kept have none: unknown, not zero
        result.seconds = saved.seconds + [float("nan")] * (len(saved.history) - len(saved.seconds))
        best_state, stale = saved.best_model, saved.stale
        result.best_epoch, start = saved.best_epoch, saved.epoch + 1
        if saved.done:
            start = epochs + 1  # finished before the interruption: nothing left to train
    label = progress.label
    f1_name = "F1" if metric == SAMPLES else metric_title(metric)  # what the lines quote
    if saved is not None and saved.done:
        line(f"{label}: finished before the interruption (best epoch {saved.best_epoch}, "
             f"val {f1_name} {saved.best_f1:.4f})", show=progress.show)
    elif saved is not None:
        line(f"{label}: resuming after epoch {saved.epoch}/{epochs} (stage {stage})",
             show=progress.show)
    else:
        line(f"{label}: training up to {epochs} epochs (stage {stage})", show=progress.show)
    # In a terminal a bar over the epochs (over each epoch's rows with `per_row`); elsewhere the
    # epoch lines say the same, on the console (`log_epochs`: in a terminal too) and in train.log.
    bar = Bar(label=label, total=epochs, initial=start - 1, unit="epoch", lines=False,
              show=progress.show and not progress.per_row)
    shown = mode(progress.show)
    console = shown is Mode.LINES or (progress.log_epochs and shown is Mode.BARS)
    stage_t0, stop = time.perf_counter(), False
    for epoch in range(start, epochs + 1):
        t0 = time.perf_counter()
        trainee.train_mode()
        # Under torchrun each rank takes its strided share of every global batch; a tail with
        # fewer rows than ranks is dropped (never in a single process).
        global_batches = [b for b in trainee.epoch_batches(generator) if len(b) >= ctx.world]
        local_batches = [dist.local_batch(b) for b in global_batches]
        sizes = iter([len(b) for b in global_batches])
        total, seen = 0.0, 0
        rows = Bar(label=f"{label} epoch {epoch}/{epochs}", unit="row",
                   total=sum(len(b) for b in local_batches),
                   show=progress.show and progress.per_row, lines=progress.per_row)
        try:
            for idx, loss in trainee.batch_losses(local_batches):
                optimizer.zero_grad(set_to_none=True)
                # × 1.0 in a single process: the same code path, bit-identical results
                scaler.scale(loss * dist.loss_scale(len(idx), next(sizes))).backward()
                if trainee.clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainee.clip, trainee.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                if trainee.scheduler is not None:
                    trainee.scheduler.step()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
                rows.update(len(idx))
                if not rows.disable:
                    rows.set_postfix(loss=f"{float(loss.detach()):.4f}")
        finally:
            rows.close()
        total, seen = dist.sum_over_ranks(total, seen)
        train_loss = total / max(1, seen)

        val_logits = trainee.val_logits()
        with torch.no_grad():
            val_loss = float(criterion(val_logits.to(ctx.device), yv.to(ctx.device)))
        probs = torch.sigmoid(val_logits).numpy()
        thr = tune_global(probs, y_val, metric=metric)
        decided = decide(probs, thr)
        sample_f1 = samples_f1(y_val, decided)
        f1 = sample_f1 if metric == SAMPLES else metric_score(metric)(y_val, decided)
        entry = EpochLog(epoch, train_loss, val_loss, sample_f1, float(thr.values[0]), f1)
        result.history.append(entry)
        result.seconds.append(time.perf_counter() - t0)
        stop = False
        if better(entry, _best(result)):
            best_state, stale, result.best_epoch = trainee.snapshot(), 0, epoch
        else:
            stale += 1
            stop = patience is not None and stale >= patience
        if patience is not None:
            # Ranks compute the same validation numbers, but one decision keeps them in lockstep.
            stop = dist.broadcast(stop)
        best = _best(result)
        best_f1 = _figure(best) if best is not None else -1.0
        bar.set_postfix(loss=f"{train_loss:.4f}", val_f1=f"{f1:.4f}", refresh=False)
        bar.update(1)
        elapsed = time.perf_counter() - stage_t0
        left = 0 if stop else epochs - epoch
        line(f"{label}: epoch {epoch}/{epochs}, train loss {train_loss:.4f}, val loss "
             f"{val_loss:.4f}, val {f1_name} {f1:.4f} (best {best_f1:.4f} at epoch "
             f"{result.best_epoch}), elapsed {duration(elapsed)}, ETA "
             f"{duration(eta(elapsed, epoch - start + 1, epoch - start + 1 + left))}",
             console=console)
        if run_log is not None:
            run_log.log_epoch(stage, asdict(entry))
            rng = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
            if ctx.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(ctx.device)
            run_log.save(stage, StageState(
                epoch=epoch, best_epoch=result.best_epoch, best_f1=best_f1, stale=stale,
                done=stop or epoch == epochs, history=[asdict(h) for h in result.history],
                model=trainee.state(), best_model=best_state, optimizer=optimizer.state_dict(),
                rng=rng | trainee.rng_state(),
                scheduler=trainee.scheduler.state_dict() if trainee.scheduler is not None else None,
                scaler=scaler.state_dict() if scaler.is_enabled() else None,
                seconds=list(result.seconds)))
        if stop:
            break
    bar.finish()  # an early stop is the end: the bar closes full, not part-way
    if start <= epochs:
        best = _best(result)
        line(f"{label}: {'early stop at' if stop else 'done after'} epoch {epoch}/{epochs}, "
             f"best epoch {result.best_epoch} (val {f1_name} "
             f"{_figure(best) if best is not None else float('nan'):.4f}), "
             f"elapsed {duration(time.perf_counter() - stage_t0)}", show=progress.show)
    trainee.load_state(best_state)
    return result


def _best(result: LoopResult) -> EpochLog | None:
    return result.history[result.best_epoch - 1] if result.best_epoch else None


# ------------------------------------------------------------------------ head training
class HeadTrainee(Trainee):
    """A head on cached features: rows oversampled by their rare labels (`cfg.oversample`) and,
    with `views`, each row drawn every epoch from its plain features or one of its views."""

    def __init__(self, head: Head, train: Features, y_train: np.ndarray, val: Features,
                 cfg: TrainConfig, criterion: nn.Module, views: list[Features] | None) -> None:
        ctx = dist.context()
        self.head, self.features, self.val, self.views = head, train, val, views
        self.criterion, self.batch_size = criterion, cfg.batch_size
        head.to(ctx.device)
        criterion.to(ctx.device)
        self.model = dist.wrap(head)
        self.optimizer = make_optimizer(cfg.optimizer, head.parameters(), cfg.lr, cfg.weight_decay)
        self.factors = repeat_factors(y_train) if cfg.oversample else None
        self.y = torch.from_numpy(y_train.astype(np.float32))
        self.n = len(y_train)
        self.choice: np.ndarray | None = None  # this epoch's view of each row

    def train_mode(self) -> None:
        self.head.train()

    def epoch_batches(self, generator: torch.Generator) -> list[np.ndarray]:
        perm = epoch_order(self.n, self.factors, generator)
        self.choice = (torch.randint(0, len(self.views) + 1, (self.n,), generator=generator).numpy()
                       if self.views else None)
        return [np.sort(perm[start:start + self.batch_size])
                for start in range(0, len(perm), self.batch_size)]

    def batch_losses(self, batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        ctx = dist.context()
        for idx in batches:
            batch = (batch_of(self.features, self.head.needs, idx) if self.choice is None
                     else views_batch([self.features, *self.views], self.choice,  # type: ignore[misc]
                                      self.head.needs, idx))
            with ctx.autocast():
                loss = _loss(self.model, to_device(batch, ctx.device), self.y[idx].to(ctx.device),
                             self.criterion)
            yield idx, loss

    def val_logits(self) -> torch.Tensor:
        return torch.from_numpy(predict_logits(self.head, self.val))

    def state(self) -> dict[str, torch.Tensor]:
        return self.head.state_dict()

    def snapshot(self) -> dict[str, torch.Tensor]:
        return copy.deepcopy(self.head.state_dict())

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict(state)


def fit_head(head: Head, train: Features, y_train: np.ndarray, val: Features, y_val: np.ndarray,
             cfg: TrainConfig, *, criterion: nn.Module | None = None,
             views: list[Features] | None = None, progress: bool = True,
             run_log: RunLog | None = None, stage: str = "head") -> FitResult:
    """Train `head` and return it with the weights of its best validation epoch (by validation
    F1 of `cfg.metric`).

    With `views` (augmented versions of `train`, row-aligned), each row is drawn each epoch from
    its plain features or one of its views, uniformly. With `run_log`, every epoch is logged and
    checkpointed under `stage` (head, optimizer, RNG states), and a checkpoint left by an
    interrupted run is continued from: the result equals that of an uninterrupted run.

    Under torchrun every rank calls this with the same data: each global batch of
    `cfg.batch_size` rows is split across ranks, DDP averages the gradients (weighted so the
    step equals the single-process one), and only the caller's rank 0 should pass `run_log`.
    The head trains on the context's device (`--device`), with autocast under `--amp`, and is
    returned on the CPU.
    """
    # Re-seed after construction too: the head was built outside, and the shuffling and dropout
    # streams must not depend on what else consumed random numbers before this call.
    seed_everything(cfg.seed)
    criterion = criterion if criterion is not None else nn.BCEWithLogitsLoss()
    trainee = HeadTrainee(head, train, y_train, val, cfg, criterion, views)
    label = stage_label(stage, head, cfg.folds)
    done = train_loop(trainee, y_val, criterion, epochs=cfg.epochs, seed=cfg.seed,
                      better=higher_f1, patience=cfg.patience, run_log=run_log, stage=stage,
                      progress=Progress(label=label, show=progress), metric=cfg.metric)
    head.cpu().eval()
    return FitResult(head=head, history=done.history, best_epoch=done.best_epoch)


def stage_label(stage: str, head: Head, folds: int | str = 1) -> str:
    """What a head-training stage does, for people: "head concat", "fold 2/5 head mean",
    "fold 2/5 pseudo-1 (head concat)" (the stage names the checkpoints: "fold2-head", ...)."""
    name = next((n for n, cls in HEADS.items() if cls is type(head)), type(head).__name__)
    fold = re.fullmatch(r"fold(\d+)-(.+)", stage)
    prefix, rest = (f"fold {fold[1]}/{folds} ", fold[2]) if fold else ("", stage)
    return f"{prefix}head {name}" if rest == "head" else f"{prefix}{rest} (head {name})"
