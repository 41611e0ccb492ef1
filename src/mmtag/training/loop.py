"""Training a head on cached features: BCE-with-logits, AdamW, early stopping on validation
sample-F1 (at its tuned global threshold), best weights kept. Seeded and deterministic on CPU."""
from __future__ import annotations

import copy
import logging
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import dist
from .checkpoint import RunLog, StageState
from ..config import TrainConfig
from ..errors import MmtagError
from ..features import Features
from ..heads import FeatureBatch, Head
from ..decision.metrics import samples_f1
from ..decision.thresholds import decide, tune_global

log = logging.getLogger("mmtag")


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float
    val_samples_f1: float
    threshold: float


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


def batch_of(features: Features, needs: tuple[str, ...], index: np.ndarray | slice) -> FeatureBatch:
    """Rows `index` of the kinds in `needs`, as float32 tensors."""
    return FeatureBatch({kind: torch.from_numpy(np.asarray(features[kind][index], dtype=np.float32))
                         for kind in needs})


def to_device(batch: FeatureBatch, device: torch.device) -> FeatureBatch:
    return batch if device.type == "cpu" else batch.to(device)


def predict_outputs(head: Head, features: Features,
                    batch_size: int = 1024) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Head logits and each branch's logits for every row, in order (on the head's device)."""
    head.eval()
    device = next(head.parameters()).device
    n = len(features)
    logits: list[np.ndarray] = []
    branches: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            batch = batch_of(features, head.needs, slice(start, min(start + batch_size, n)))
            out = head(to_device(batch, device))
            logits.append(out.logits.float().cpu().numpy())
            for name, value in out.branches.items():
                branches.setdefault(name, []).append(value.float().cpu().numpy())
    return np.concatenate(logits), {k: np.concatenate(v) for k, v in branches.items()}


def predict_logits(head: Head, features: Features, batch_size: int = 1024) -> np.ndarray:
    """Head logits for every row, in order."""
    return predict_outputs(head, features, batch_size)[0]


def _loss(head: nn.Module, batch: FeatureBatch, y: torch.Tensor, criterion: nn.Module) -> torch.Tensor:
    out = head(batch)
    loss = criterion(out.logits.float(), y)
    for branch in out.branches.values():
        loss = loss + criterion(branch.float(), y)
    return loss


# The optimisers a config may name (head training and fine-tuning alike): `adam` adds the L2
# penalty to the gradient, `adamw` decouples the weight decay. config.py reads the names here.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adam": torch.optim.Adam,
                                                      "adamw": torch.optim.AdamW}


def make_optimizer(name: str, params: list[dict] | object, lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """The registered optimiser `name` over `params` (a list of parameters or of groups)."""
    if name not in OPTIMIZERS:
        raise MmtagError(f"unknown optimizer '{name}'; available: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay)  # type: ignore[arg-type]


def repeat_factors(y: np.ndarray, threshold: float = 0.05) -> np.ndarray:
    """Per-row repeat factors for rare labels, LVIS-style repeat-factor sampling (Gupta et al.
    2019): a label on a fraction f < threshold of rows gets r = sqrt(threshold / f), and a row
    repeats as often as its rarest label asks. Common-label rows keep factor 1."""
    freq = y.mean(axis=0)
    per_class = np.where(freq > 0, np.sqrt(threshold / np.maximum(freq, 1e-12)), 1.0)
    per_class = np.maximum(per_class, 1.0)
    return np.where(y > 0, per_class[None, :], 1.0).max(axis=1)


def epoch_order(n: int, factors: np.ndarray | None, generator: torch.Generator) -> np.ndarray:
    """A shuffled epoch of row indices; with repeat factors, rows are repeated by stochastic
    rounding (factor 2.3 → 2 copies, or 3 with probability 0.3)."""
    if factors is None:
        return torch.randperm(n, generator=generator).numpy()
    u = torch.rand(n, generator=generator).numpy()
    copies = np.floor(factors + u).astype(np.int64)
    rows = np.repeat(np.arange(n), copies)
    return rows[torch.randperm(len(rows), generator=generator).numpy()]


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


def fit_head(head: Head, train: Features, y_train: np.ndarray, val: Features, y_val: np.ndarray,
             cfg: TrainConfig, *, criterion: nn.Module | None = None,
             views: list[Features] | None = None, progress: bool = True,
             run_log: RunLog | None = None, stage: str = "head") -> FitResult:
    """Train `head` and return it with the weights of its best validation epoch.

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
    ctx = dist.context()
    seed_everything(cfg.seed)
    # Re-seed after construction too: the head was built outside, and the shuffling and dropout
    # streams must not depend on what else consumed random numbers before this call.
    generator = torch.Generator().manual_seed(cfg.seed)
    criterion = criterion if criterion is not None else nn.BCEWithLogitsLoss()
    head.to(ctx.device)
    criterion.to(ctx.device)
    model = dist.wrap(head)
    scaler = torch.amp.GradScaler("cuda", enabled=ctx.amp)
    optimizer = make_optimizer(cfg.optimizer, head.parameters(), cfg.lr, cfg.weight_decay)
    factors = repeat_factors(y_train) if cfg.oversample else None
    yt = torch.from_numpy(y_train.astype(np.float32))
    yv = torch.from_numpy(y_val.astype(np.float32))
    n = len(y_train)
    result = FitResult(head=head)
    best_f1, best_state, stale = -1.0, copy.deepcopy(head.state_dict()), 0
    start = 1
    saved = dist.broadcast(run_log.load(stage) if run_log is not None else None)
    if saved is not None:
        head.load_state_dict(saved.model)
        optimizer.load_state_dict(saved.optimizer)
        torch.set_rng_state(saved.rng["torch"])
        generator.set_state(saved.rng["generator"])
        result.history = [EpochLog(**h) for h in saved.history]  # type: ignore[arg-type]
        best_f1, best_state, stale = saved.best_f1, saved.best_model, saved.stale
        result.best_epoch, start = saved.best_epoch, saved.epoch + 1
        if saved.done:
            start = cfg.epochs + 1  # finished before the interruption: nothing left to train
        else:
            log.info("%s: resuming after epoch %d", stage, saved.epoch)
    bar = tqdm(range(start, cfg.epochs + 1), desc="training", unit="epoch", disable=not progress)
    for epoch in bar:
        head.train()
        perm = epoch_order(n, factors, generator)
        choice = (torch.randint(0, len(views) + 1, (n,), generator=generator).numpy()
                  if views else None)
        total, seen = 0.0, 0
        for start in range(0, len(perm), cfg.batch_size):
            global_idx = np.sort(perm[start:start + cfg.batch_size])
            if len(global_idx) < ctx.world:
                continue  # a tail too short to give every rank a row (only when distributed)
            idx = dist.local_batch(global_idx)
            batch = (batch_of(train, head.needs, idx) if choice is None
                     else views_batch([train, *views], choice, head.needs, idx))  # type: ignore[list-item]
            with ctx.autocast():
                loss = _loss(model, to_device(batch, ctx.device), yt[idx].to(ctx.device), criterion)
            optimizer.zero_grad(set_to_none=True)
            # × 1.0 in a single process: the same code path, bit-identical results
            scaler.scale(loss * dist.loss_scale(len(idx), len(global_idx))).backward()
            scaler.step(optimizer)
            scaler.update()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        total, total_n = dist.sum_over_ranks(total, seen)
        val_logits = torch.from_numpy(predict_logits(head, val))
        with torch.no_grad():
            val_loss = float(criterion(val_logits.to(ctx.device), yv.to(ctx.device)))
        probs = torch.sigmoid(val_logits).numpy()
        thr = tune_global(probs, y_val)
        f1 = samples_f1(y_val, decide(probs, thr))
        result.history.append(EpochLog(epoch, total / total_n, val_loss, f1, float(thr.values[0])))
        bar.set_postfix(loss=f"{total / total_n:.4f}", val_f1=f"{f1:.4f}")
        stop = False
        if f1 > best_f1 + 1e-6:
            best_f1, best_state, stale, result.best_epoch = f1, copy.deepcopy(head.state_dict()), 0, epoch
        else:
            stale += 1
            stop = stale >= cfg.patience
        # Ranks compute the same validation numbers, but one decision keeps them in lockstep.
        stop = dist.broadcast(stop)
        if run_log is not None:
            run_log.log_epoch(stage, asdict(result.history[-1]))
            run_log.save(stage, StageState(
                epoch=epoch, best_epoch=result.best_epoch, best_f1=best_f1, stale=stale,
                done=stop or epoch == cfg.epochs, history=result.history_dicts(),
                model=head.state_dict(), best_model=best_state, optimizer=optimizer.state_dict(),
                rng={"torch": torch.get_rng_state(), "generator": generator.get_state()}))
        if stop:
            log.info("early stop at epoch %d (best %d, val sample-F1 %.4f)",
                     epoch, result.best_epoch, best_f1)
            break
    bar.close()
    head.load_state_dict(best_state)
    head.cpu().eval()
    return result
