"""Stage one of two-stage training: fine-tune an encoder on the multi-label task.

A temporary task head (dropout + linear on the pooled output) is trained together with the
encoder's trainable part; the head is then thrown away and the encoder, restored to its best
validation epoch, is finalized again (fp16-rounded, frozen, re-hashed). Its new `encoder_id` is
the feature-cache key, so the normal pipeline caches the fine-tuned features separately from the
pretrained ones and fits its fusion head on them.

Text encoders train the whole transformer, or with `top_layers` = N only its last N layers: the
frozen lower layers then run once per caption before training (their states kept in memory, fp16,
trimmed to each caption's length), and each step runs only the top layers on length-bucketed
batches, several times faster on a CPU. Image encoders train only their last `unfreeze_blocks`
MBConv blocks plus the head conv/BN, with the frozen BatchNorm layers kept in eval mode (their
running statistics are ImageNet's and a small task batch would only corrupt them).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import dist
from ..data.augment import ImageAugment, TextAugment
from ..config import FinetuneConfig
from ..data import (Dataset, ImageBatch, ImageItems, image_batches, image_loader,
                   normalize_images)
from ..encoders import Encoder, HFTextEncoder, ImageEncoder, TextEncoder
from ..errors import MmtagError
from .checkpoint import RunLog, numpy_rng_tensor, set_numpy_rng
from .loop import Progress, Trainee, higher_f1_then_lower_loss, train_loop
from .optim import make_optimizer, warmup_linear_scheduler

HEAD_DROPOUT = 0.1  # dropout before the temporary task head's linear layer
GRAD_CLIP = 1.0  # max global grad norm, the usual guard for transformer fine-tuning
# Top-layer fine-tuning sorts each random chunk of this many batches' rows by length before cutting
# it into batches: padding nearly vanishes, and which rows meet in a batch still changes per epoch.
BUCKET_BATCHES = 50
LOWER_BATCH = 128  # captions per batch when their lower-layer states are computed


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
                  progress: bool = True, run_log: RunLog | None = None,
                  stage: str = "finetune-text", metric: str = "samples") -> FinetuneResult:
    """Fine-tune a copy of the whole text transformer on (captions, y); `encoder` is untouched.
    The epoch kept is the one of the best validation F1 of `metric` (`--metric`).
    With `augment` (e.g. synonym replacement), training captions are rewritten with a fresh
    seed each time they are drawn; validation captions never are. With `run_log`, every epoch
    is checkpointed under `stage` and an interrupted run resumes to the uninterrupted result.

    With `cfg.top_layers` = N > 0 only the last N transformer layers (and the head) train: see
    `_finetune_text_top`."""
    if not isinstance(encoder, TextEncoder):
        raise MmtagError(f"finetune_text needs a text encoder, got {type(encoder).__name__}")
    y, y_val = _check_inputs(len(captions), y, len(val_captions), y_val, cfg)
    if cfg.top_layers > 0:
        return _finetune_text_top(encoder, captions, y, val_captions, y_val, cfg, loss=loss,
                                 seed=seed, augment=augment, progress=progress, run_log=run_log,
                                 stage=stage, metric=metric)
    torch.manual_seed(seed)
    enc = copy.deepcopy(encoder)
    trainable = enc.trainable_groups()
    params = _unfreeze(trainable)
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

    return _finetune(EncoderTrainee(enc, trainable, params, set_train, train_batches, val_batches,
                                    y, len(y_val), cfg, _criterion(loss), augment_rng=rng),
                     y_val, cfg, seed=seed, progress=progress, source=encoder, run_log=run_log,
                     stage=stage, metric=metric)


def _finetune_text_top(encoder: TextEncoder, captions: list[str], y: np.ndarray,
                      val_captions: list[str], y_val: np.ndarray, cfg: FinetuneConfig, *,
                      loss: nn.Module | None = None, seed: int = 0,
                      augment: TextAugment | None = None, progress: bool = True,
                      run_log: RunLog | None = None,
                      stage: str = "finetune-text", metric: str = "samples") -> FinetuneResult:
    """Fine-tune a copy of the text encoder's last `cfg.top_layers` transformer layers; the
    embeddings and lower layers stay as they are, so their output is computed once per caption
    (`LowerStates`) and every epoch runs only the top layers, on length-bucketed batches. The
    optimiser, schedule, clipping, best-epoch restore and checkpoints are those of the whole-
    encoder path (one `EncoderTrainee`, one `train_loop`); the result is a complete finalized
    encoder whose top layers changed."""
    top = cfg.top_layers
    if not isinstance(encoder, HFTextEncoder):
        raise MmtagError(f"--ft-top-layers {top}: text encoder '{encoder.name}' cannot run its "
                         "lower layers apart from its top ones; use --ft-top-layers 0 to "
                         "fine-tune all of it")
    if augment is not None:
        raise MmtagError(f"--ft-top-layers {top} computes each caption's lower-layer states once, "
                         "so captions cannot be rewritten every epoch: drop --text-aug, or use "
                         "--ft-top-layers 0")
    y, y_val = _check_inputs(len(captions), y, len(val_captions), y_val, cfg)
    encoder.trainable_groups(top)  # a bad top_layers fails here, before the copy and the states
    torch.manual_seed(seed)
    enc = copy.deepcopy(encoder)
    trainable = enc.trainable_groups(top)
    params = _unfreeze(trainable)
    device = dist.context().device
    enc.to(device)
    enc.eval()  # the lower states are the frozen layers' inference output: no dropout
    train_states = LowerStates.compute(enc, captions, top, device)
    val_states = LowerStates.compute(enc, val_captions, top, device)
    upper = _Upper(enc, top)
    net = dist.wrap(upper)

    def set_train() -> None:
        enc.eval()  # embeddings and lower layers never run while training
        for m in trainable:
            m.train()

    def train_batches(batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for idx in batches:
            yield idx, net(*train_states.batch(idx, device))

    def val_batches() -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        order = np.argsort(val_states.lengths, kind="stable")
        size = max(2 * cfg.batch_size, 64)
        for start in range(0, len(order), size):
            idx = order[start:start + size]
            yield idx, upper(*val_states.batch(idx, device))

    # No augmentation stream is drawn from; one is kept so checkpoints look like the full path's.
    trainee = TopLayersTrainee(enc, trainable, params, set_train, train_batches, val_batches, y,
                               len(y_val), cfg, _criterion(loss),
                               augment_rng=np.random.default_rng(seed + 1),
                               lengths=train_states.lengths)
    return _finetune(trainee, y_val, cfg, seed=seed, progress=progress, source=encoder,
                     run_log=run_log, stage=stage, metric=metric)


@dataclass
class LowerStates:
    """Each caption's hidden states after the frozen lower layers, kept at fp16 and trimmed to
    its tokens: one (total tokens, D) tensor, caption i at rows offsets[i] + range(lengths[i])."""

    states: torch.Tensor
    offsets: np.ndarray
    lengths: np.ndarray

    @classmethod
    def compute(cls, enc: HFTextEncoder, captions: list[str], top: int,
                device: torch.device) -> "LowerStates":
        # Length-sorted batches: little padding computed. The result is in caption order.
        order = np.argsort([len(c) for c in captions], kind="stable")
        parts: list[torch.Tensor | None] = [None] * len(captions)
        for start in range(0, len(order), LOWER_BATCH):
            idx = order[start:start + LOWER_BATCH]
            tokens = {k: v.to(device) for k, v in enc.tokenize([captions[i] for i in idx]).items()}
            hidden = enc.lower_states(tokens["input_ids"], tokens["attention_mask"], top)
            keep = tokens["attention_mask"].bool()
            for j, i in enumerate(idx):
                # Masked selection, not a prefix: right for either padding side (positions are
                # already in the states, and attention does not care about token order).
                parts[i] = hidden[j][keep[j]].half().cpu()
        lengths = np.array([len(p) for p in parts], dtype=np.int64)  # type: ignore[arg-type]
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return cls(torch.cat(parts), offsets, lengths)  # type: ignore[arg-type]

    def batch(self, idx: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `idx` as fp32 states padded (with zeros) to the longest, and their attention mask;
        a padded position is masked out of attention and pooling, so its value never matters."""
        lengths = self.lengths[idx]
        longest = int(lengths.max())
        hidden = torch.zeros(len(idx), longest, self.states.shape[1])
        for j, i in enumerate(idx):
            hidden[j, :lengths[j]] = self.states[self.offsets[i]:self.offsets[i] + lengths[j]]
        mask = (torch.arange(longest)[None, :] < torch.from_numpy(lengths)[:, None]).long()
        return hidden.to(device), mask.to(device)


class _Upper(nn.Module):
    """The encoder's top layers + pooling as one module's forward, so DDP can wrap it."""

    def __init__(self, enc: HFTextEncoder, top: int) -> None:
        super().__init__()
        self.enc, self.top = enc, top

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.enc.upper_pooled(hidden, attention_mask, self.top)


def finetune_image(encoder: ImageEncoder, images: Sequence[Path] | Dataset, y: np.ndarray,
                   val_images: Sequence[Path] | Dataset, y_val: np.ndarray, cfg: FinetuneConfig, *,
                   loss: nn.Module | None = None, seed: int = 0, workers: int = 2,
                   augment: ImageAugment | None = None, progress: bool = True,
                   run_log: RunLog | None = None, stage: str = "finetune-image",
                   metric: str = "samples") -> FinetuneResult:
    """Fine-tune a copy of the image encoder's last `cfg.unfreeze_blocks` blocks + head conv/BN.

    `images` and `val_images` are image files, or Datasets (then an image that cannot be decoded
    is reported with its CSV row, as feature extraction reports it). Images are decoded in
    `workers` DataLoader processes by the one image loader (`data.ImageItems`); with `augment`
    (see mmtag.augment, e.g. random resized crop + flip) every training view is augmented with
    its own seed. Validation uses the plain view. With `run_log`, every epoch is checkpointed
    under `stage` and an interrupted run resumes to the uninterrupted result.
    """
    if not isinstance(encoder, ImageEncoder):
        raise MmtagError(f"finetune_image needs an image encoder, got {type(encoder).__name__}")
    y, y_val = _check_inputs(len(images), y, len(val_images), y_val, cfg)
    if workers < 0:
        raise MmtagError(f"workers must be >= 0, got {workers}")
    torch.manual_seed(seed)
    enc = copy.deepcopy(encoder)
    trainable = enc.trainable_groups(cfg.unfreeze_blocks)
    params = _unfreeze(trainable)
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

    return _finetune(EncoderTrainee(enc, trainable, params, set_train, train_batches, val_batches,
                                    y, len(y_val), cfg, _criterion(loss), augment_rng=rng),
                     y_val, cfg, seed=seed, progress=progress, source=encoder, run_log=run_log,
                     stage=stage, metric=metric)


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


def _unfreeze(trainable: list[nn.Module]) -> list[nn.Parameter]:
    """The parameters of the `trainable` modules, in order, set to require gradients."""
    params = [p for m in trainable for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def _criterion(loss: nn.Module | None) -> nn.Module:
    return (loss if loss is not None else nn.BCEWithLogitsLoss()).to(dist.context().device)


Batches = Iterator[tuple[np.ndarray, torch.Tensor]]  # (rows, pooled encoder outputs) per batch


class EncoderTrainee(Trainee):
    """An encoder's trainable modules with a temporary task head (dropout + linear) on its
    pooled output: one optimiser with a group at the encoder's and one at the head's learning
    rate, warm-up + linear decay, gradient clipping. Checkpoints hold the trainable modules' state (the frozen rest
    never changes), the head, and the augmentation stream `augment_rng` (a numpy Generator for
    captions, a torch Generator for image augmentation seeds)."""

    def __init__(self, enc: Encoder, trainable: list[nn.Module], params: list[nn.Parameter],
                 set_train: Callable[[], None],
                 train_batches: Callable[[list[np.ndarray]], Batches],
                 val_batches: Callable[[], Batches], y: np.ndarray, n_val: int,
                 cfg: FinetuneConfig, criterion: nn.Module, *,
                 augment_rng: np.random.Generator | torch.Generator) -> None:
        ctx = dist.context()
        self.enc, self.set_train, self.criterion = enc, set_train, criterion
        self.train_batches, self.val_batches = train_batches, val_batches
        self.n, self.n_val, self.batch_size = len(y), n_val, cfg.batch_size
        self.augment_rng = augment_rng
        names = {id(m): name for name, m in enc.named_modules()}
        # state_dict key prefix of each trainable module ("" for the whole encoder)
        self.trainable = [(names[id(m)] + "." if names[id(m)] else "", m) for m in trainable]
        self.head = nn.Sequential(nn.Dropout(HEAD_DROPOUT), nn.Linear(enc.dim, y.shape[1])).to(ctx.device)
        self.head_net = dist.wrap(self.head)
        groups = [{"params": params, "lr": cfg.lr},
                  {"params": list(self.head.parameters()), "lr": cfg.head_lr}]
        self.optimizer = make_optimizer(cfg.optimizer, groups, cfg.lr, cfg.weight_decay)
        steps_per_epoch = math.ceil(len(y) / cfg.batch_size)
        self.scheduler = warmup_linear_scheduler(self.optimizer, cfg.epochs * steps_per_epoch,
                                                 cfg.warmup_frac)
        self.y = torch.from_numpy(y)
        self.clip = list(params) + list(self.head.parameters())
        self.max_grad_norm = GRAD_CLIP

    def train_mode(self) -> None:
        self.set_train()
        self.head.train()

    def epoch_batches(self, generator: torch.Generator) -> list[np.ndarray]:
        order = torch.randperm(self.n, generator=generator).numpy()
        return [order[k:k + self.batch_size] for k in range(0, self.n, self.batch_size)]

    def batch_losses(self, batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        ctx = dist.context()
        for idx, pooled in self.train_batches(batches):
            with ctx.autocast():
                logits = self.head_net(pooled)
            target = self.y[torch.from_numpy(np.asarray(idx))].to(ctx.device)
            yield idx, self.criterion(logits.float(), target)

    def val_logits(self) -> torch.Tensor:
        return _predict(self.enc, self.head, self.val_batches, self.n_val, self.y.shape[1])

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"encoder.{prefix}{k}": v for prefix, m in self.trainable
               for k, v in m.state_dict().items()}
        return out | {f"head.{k}": v for k, v in self.head.state_dict().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.state()):
            raise MmtagError(f"fine-tuning checkpoint of {self.enc.name} holds other weights than "
                             "this run trains (another encoder, unfreeze_blocks or top_layers?)")
        for prefix, m in self.trainable:
            m.load_state_dict({k[len("encoder.") + len(prefix):]: v for k, v in state.items()
                               if k.startswith("encoder." + prefix)})
        self.head.load_state_dict({k[len("head."):]: v for k, v in state.items()
                                   if k.startswith("head.")})

    def rng_state(self) -> dict[str, torch.Tensor]:
        if isinstance(self.augment_rng, torch.Generator):
            return {"augment": self.augment_rng.get_state()}
        return {"augment": numpy_rng_tensor(self.augment_rng)}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        if isinstance(self.augment_rng, torch.Generator):
            self.augment_rng.set_state(state["augment"])
        else:
            set_numpy_rng(self.augment_rng, state["augment"])


class TopLayersTrainee(EncoderTrainee):
    """An `EncoderTrainee` whose batches are length-bucketed (`bucketed_batches`). Every draw
    comes from the loop's generator, so a resumed run draws the same batches; the batch count
    is the plain path's, and so is the LR schedule."""

    def __init__(self, *args: object, lengths: np.ndarray, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lengths = lengths

    def epoch_batches(self, generator: torch.Generator) -> list[np.ndarray]:
        return bucketed_batches(self.lengths, self.batch_size, generator)


def bucketed_batches(lengths: np.ndarray, batch_size: int,
                     generator: torch.Generator) -> list[np.ndarray]:
    """One epoch's batches of rows 0..len(lengths)-1, each row once: shuffled, each chunk of
    BUCKET_BATCHES batches' rows sorted by length and cut into batches, the batches shuffled.
    As many batches as plain shuffled batching makes (only the last chunk's last one is short)."""
    n = len(lengths)
    order = torch.randperm(n, generator=generator).numpy()
    chunk_rows = batch_size * BUCKET_BATCHES
    batches: list[np.ndarray] = []
    for start in range(0, n, chunk_rows):
        chunk = order[start:start + chunk_rows]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def _finetune(trainee: EncoderTrainee, y_val: np.ndarray, cfg: FinetuneConfig, *, seed: int,
              progress: bool, source: Encoder, run_log: RunLog | None,
              stage: str, metric: str = "samples") -> FinetuneResult:
    """Train, validate each epoch (F1 of `metric`), keep the best weights; then finalize the
    encoder."""
    enc = trainee.enc
    done = train_loop(trainee, y_val, trainee.criterion, epochs=cfg.epochs, seed=seed,
                      better=higher_f1_then_lower_loss, run_log=run_log, stage=stage, metric=metric,
                      progress=Progress(label=f"finetune {enc.name}", per_row=True,
                                        log_epochs=True, show=progress))
    enc.cpu()  # the bundle and the hash are made from CPU weights; Tagger moves it back
    enc.finalize()
    enc.source = {**source.source, "finetuned_from": source.weights_sha256}
    history = [{**asdict(e), "epoch": float(e.epoch), "seconds": s}
               for e, s in zip(done.history, done.seconds)]
    return FinetuneResult(encoder=enc, history=history, best_epoch=done.best_epoch)


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
