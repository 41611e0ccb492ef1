"""Stage one of two-stage training: fine-tune an encoder on the multi-label task.

A temporary task head (dropout + linear on the pooled output) is trained together with the
encoder's trainable part; the head is then thrown away and the encoder, restored to its best
validation epoch, is finalized again (fp16-rounded, frozen, re-hashed). Its new `encoder_id` is
the feature-cache key, so the normal pipeline caches the fine-tuned features separately from the
pretrained ones and fits its fusion head on them.

Text encoders train the whole transformer; image encoders only their last `unfreeze_blocks` MBConv
blocks plus the head conv/BN, with the frozen BatchNorm layers kept in eval mode (their running
statistics are ImageNet's and a small task batch would only corrupt them).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import dist
from ..data.augment import ImageAugment, TextAugment
from ..config import FinetuneConfig
from ..data import (Dataset, ImageBatch, ImageItems, image_batches, image_loader,
                   normalize_images)
from ..encoders import Encoder, ImageEncoder, TextEncoder
from ..errors import MmtagError
from ..decision.metrics import samples_f1
from ..decision.thresholds import decide, tune_global
from .loop import make_optimizer

log = logging.getLogger("mmtag")

HEAD_DROPOUT = 0.1  # dropout before the temporary task head's linear layer
GRAD_CLIP = 1.0  # max global grad norm, the usual guard for transformer fine-tuning


@dataclass
class FinetuneResult:
    """The fine-tuned, finalized encoder (best validation epoch) and the per-epoch history."""

    encoder: Encoder
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0  # 1-based epoch whose weights the encoder carries


# ---------------------------------------------------------------------------- public API
def finetune_text(encoder: TextEncoder, captions: list[str], y: np.ndarray, val_captions: list[str],
                  y_val: np.ndarray, cfg: FinetuneConfig, *, loss: nn.Module | None = None,
                  seed: int = 0, augment: TextAugment | None = None,
                  progress: bool = True) -> FinetuneResult:
    """Fine-tune a copy of the whole text transformer on (captions, y); `encoder` is untouched.
    With `augment` (e.g. synonym replacement), training captions are rewritten with a fresh
    seed each time they are drawn; validation captions never are."""
    if not isinstance(encoder, TextEncoder):
        raise MmtagError(f"finetune_text needs a text encoder, got {type(encoder).__name__}")
    y, y_val = _check_inputs(len(captions), y, len(val_captions), y_val, cfg)
    torch.manual_seed(seed)
    enc = copy.deepcopy(encoder)
    params = [p for m in enc.trainable_groups() for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    device = dist.context().device
    net = dist.wrap(enc.to(device))

    def set_train() -> None:
        enc.train()

    rng = np.random.default_rng(seed + 1)  # augmentation stream, separate from shuffling

    def tokens(batch: list[str]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in enc.tokenize(batch).items()}

    def train_batches(batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for idx in batches:
            batch = [captions[i] for i in idx]
            if augment is not None:
                batch = [augment(c, rng) for c in batch]
            yield idx, net(**tokens(batch))

    def val_batches() -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        # Length-sorted batches waste less compute on padding; results go back by index.
        order = np.argsort([len(c) for c in val_captions], kind="stable")
        size = max(2 * cfg.batch_size, 64)
        for start in range(0, len(order), size):
            idx = order[start:start + size]
            yield idx, enc(**tokens([val_captions[i] for i in idx]))

    return _train(enc, params, set_train, train_batches, val_batches,
                  len(captions), y, y_val, cfg, loss=loss, seed=seed, progress=progress,
                  source=encoder)


def finetune_image(encoder: ImageEncoder, images: Sequence[Path] | Dataset, y: np.ndarray,
                   val_images: Sequence[Path] | Dataset, y_val: np.ndarray, cfg: FinetuneConfig, *,
                   loss: nn.Module | None = None, seed: int = 0, workers: int = 2,
                   augment: ImageAugment | None = None, progress: bool = True) -> FinetuneResult:
    """Fine-tune a copy of the image encoder's last `cfg.unfreeze_blocks` blocks + head conv/BN.

    `images` and `val_images` are image files, or Datasets (then an image that cannot be decoded
    is reported with its CSV row, as feature extraction reports it). Images are decoded in
    `workers` DataLoader processes by the one image loader (`data.ImageItems`); with `augment`
    (see mmtag.augment, e.g. random resized crop + flip) every training view is augmented with
    its own seed. Validation uses the plain view.
    """
    if not isinstance(encoder, ImageEncoder):
        raise MmtagError(f"finetune_image needs an image encoder, got {type(encoder).__name__}")
    y, y_val = _check_inputs(len(images), y, len(val_images), y_val, cfg)
    if workers < 0:
        raise MmtagError(f"workers must be >= 0, got {workers}")
    torch.manual_seed(seed)
    enc = copy.deepcopy(encoder)
    trainable = enc.trainable_groups(cfg.unfreeze_blocks)
    params = [p for m in trainable for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    device = dist.context().device
    net = dist.wrap(enc.to(device))
    size = int(enc.image_size)
    rng = torch.Generator().manual_seed(seed + 1)  # augmentation seeds, separate from shuffling
    train_items = _image_items(images, size, augment)
    val_items = _image_items(val_images, size)

    def set_train() -> None:
        enc.eval()  # frozen blocks (and their BatchNorm statistics) stay in eval mode
        for m in trainable:
            m.train()

    def forward(model: nn.Module, items: ImageItems,
                batch: ImageBatch) -> tuple[np.ndarray, torch.Tensor]:
        if batch.errors:
            raise items.error(*batch.errors[0])
        assert batch.images is not None
        # Normalised here, on the CPU, before the move: the float operations fine-tuning has
        # always used, so the weights it produces do not depend on the device's division.
        x = normalize_images(batch.images)
        idx = np.asarray(batch.items, dtype=np.int64)
        return idx, model(x.to(device).contiguous(memory_format=torch.channels_last))[0]

    def train_batches(batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        # One augmentation seed per row drawn, in batch order, whichever worker decodes it.
        n_rows = sum(len(b) for b in batches)
        seeds = iter(torch.randint(0, 2**62, (n_rows,), generator=rng).tolist())
        items = [[(int(i), int(next(seeds)) if augment is not None else None) for i in b]
                 for b in batches]
        for batch in image_loader(train_items, items, workers):
            yield forward(net, train_items, batch)

    def val_batches() -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        plain = image_batches([None] * len(val_items), max(2 * cfg.batch_size, 64))
        for batch in image_loader(val_items, plain, workers):
            yield forward(enc, val_items, batch)

    return _train(enc, params, set_train, train_batches, val_batches, len(images), y, y_val, cfg,
                  loss=loss, seed=seed, progress=progress, source=encoder)


def _image_items(images: Sequence[Path] | Dataset, size: int,
                 augment: ImageAugment | None = None) -> ImageItems:
    if isinstance(images, Dataset):
        return ImageItems.from_dataset(images, size, augment)
    return ImageItems(images, size, augment)


# ----------------------------------------------------------------------------- helpers
def _check_inputs(n: int, y: np.ndarray, n_val: int, y_val: np.ndarray,
                  cfg: FinetuneConfig) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float32)
    y_val = np.asarray(y_val, dtype=np.float32)
    if y.ndim != 2 or y_val.ndim != 2:
        raise MmtagError(f"labels must be (N, C) matrices, got shapes {y.shape} and {y_val.shape}")
    if len(y) != n:
        raise MmtagError(f"{n} training inputs but {len(y)} label rows")
    if len(y_val) != n_val:
        raise MmtagError(f"{n_val} validation inputs but {len(y_val)} label rows")
    if y.shape[1] != y_val.shape[1] or y.shape[1] == 0:
        raise MmtagError(f"training labels have {y.shape[1]} classes, validation {y_val.shape[1]}")
    if n == 0 or n_val == 0:
        raise MmtagError("fine-tuning needs at least one training and one validation row")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise MmtagError(f"finetune epochs and batch_size must be >= 1 "
                         f"(got {cfg.epochs}, {cfg.batch_size})")
    if not 0.0 <= cfg.warmup_frac < 1.0:
        raise MmtagError(f"finetune warmup_frac must be in [0, 1), got {cfg.warmup_frac}")
    return y, y_val


def _schedule(total_steps: int, warmup_frac: float) -> Callable[[int], float]:
    """LR factor at optimiser step s: linear warm-up to 1, then linear decay towards 0."""
    warmup = int(round(warmup_frac * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def _train(enc: Encoder, params: list[nn.Parameter], set_train: Callable[[], None],
           train_batches: Callable[[np.ndarray], Iterator[tuple[np.ndarray, torch.Tensor]]],
           val_batches: Callable[[], Iterator[tuple[np.ndarray, torch.Tensor]]],
           n: int, y: np.ndarray, y_val: np.ndarray, cfg: FinetuneConfig, *,
           loss: nn.Module | None, seed: int, progress: bool, source: Encoder) -> FinetuneResult:
    """The loop shared by both modalities: train, validate each epoch, keep the best weights."""
    ctx = dist.context()
    criterion = (loss if loss is not None else nn.BCEWithLogitsLoss()).to(ctx.device)
    head = nn.Sequential(nn.Dropout(HEAD_DROPOUT), nn.Linear(enc.dim, y.shape[1])).to(ctx.device)
    head_net = dist.wrap(head)
    scaler = torch.amp.GradScaler("cuda", enabled=ctx.amp)
    groups = [{"params": params, "lr": cfg.lr}, {"params": list(head.parameters()), "lr": cfg.head_lr}]
    optimizer = make_optimizer(cfg.optimizer, groups, cfg.lr, cfg.weight_decay)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(cfg.epochs * steps_per_epoch, cfg.warmup_frac))
    generator = torch.Generator().manual_seed(seed)
    yt = torch.from_numpy(y)
    yv = torch.from_numpy(y_val)
    clip = list(params) + list(head.parameters())

    result = FinetuneResult(encoder=enc)
    best_key: tuple[float, float] | None = None
    best_state = _clone_state(enc)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        set_train()
        head.train()
        order = torch.randperm(n, generator=generator).numpy()
        # Under torchrun each rank takes its strided share of every global batch; a tail with
        # fewer rows than ranks is dropped (never in a single process).
        global_batches = [order[k:k + cfg.batch_size] for k in range(0, n, cfg.batch_size)]
        global_batches = [b for b in global_batches if len(b) >= ctx.world]
        sizes = iter([len(b) for b in global_batches])
        total, seen = 0.0, 0
        bar = tqdm(total=n, desc=f"finetune {enc.name} {epoch}/{cfg.epochs}", unit="row",
                   disable=not progress)
        try:
            for idx, pooled in train_batches([dist.local_batch(b) for b in global_batches]):
                with ctx.autocast():
                    logits = head_net(pooled)
                target = yt[torch.from_numpy(np.asarray(idx))].to(ctx.device)
                batch_loss = criterion(logits.float(), target)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(batch_loss * dist.loss_scale(len(idx), next(sizes))).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(clip, GRAD_CLIP)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                total += float(batch_loss.detach()) * len(idx)
                seen += len(idx)
                bar.update(len(idx))
                bar.set_postfix(loss=f"{float(batch_loss.detach()):.4f}")
        finally:
            bar.close()
        total, seen = dist.sum_over_ranks(total, seen)
        train_loss = total / max(1, seen)

        val_logits = _predict(enc, head, val_batches, len(y_val), y.shape[1])
        with torch.no_grad():
            val_loss = float(criterion(val_logits.to(ctx.device), yv.to(ctx.device)))
        probs = torch.sigmoid(val_logits).numpy()
        thr = tune_global(probs, y_val)
        f1 = samples_f1(y_val, decide(probs, thr))
        seconds = time.perf_counter() - t0
        result.history.append({"epoch": float(epoch), "train_loss": train_loss, "val_loss": val_loss,
                               "val_samples_f1": f1, "threshold": float(thr.values[0]),
                               "seconds": seconds})
        log.info("finetune %s epoch %d: train loss %.4f, val loss %.4f, val sample-F1 %.4f (%.0f s)",
                 enc.name, epoch, train_loss, val_loss, f1, seconds)
        # Best = highest validation sample-F1; a tie (common on small validation sets) goes to
        # the lower validation loss.
        key = (round(f1, 6), -val_loss)
        if best_key is None or key > best_key:
            best_key, best_state, result.best_epoch = key, _clone_state(enc), epoch

    enc.load_state_dict(best_state)
    enc.cpu()  # the bundle and the hash are made from CPU weights; Tagger moves it back
    enc.finalize()
    enc.source = {**source.source, "finetuned_from": source.weights_sha256}
    return result


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _predict(enc: Encoder, head: nn.Module,
             val_batches: Callable[[], Iterator[tuple[np.ndarray, torch.Tensor]]],
             n: int, c: int) -> torch.Tensor:
    enc.eval()
    head.eval()
    out = torch.empty(n, c)
    with torch.inference_mode(), dist.context().autocast():
        for idx, pooled in val_batches():
            out[torch.from_numpy(np.asarray(idx))] = head(pooled).float().cpu()
    return out.clone()  # a normal tensor, usable outside inference mode
