"""Stage-one text fine-tuning trials on comp5329: per-epoch validation sample-F1 and wall time.

    .venv/bin/python bench/finetune_text.py [--epochs 4] [--lr 5e-5] [--head-lr 1e-3]
        [--batch-size 32] [--max-train N] [--max-val N] [--shared ../shared/data]

Reads comp5329/train.csv, takes the seeded validation split (val_frac 0.1, seed 0) that `mmtag
train` uses, builds the label space from the training rows and fine-tunes MiniLM with a temporary
linear task head (`mmtag.training.finetune.finetune_text`). `--max-train N` fine-tunes on a seeded random
N-row subset of the training split for quick trials; validation stays the full split unless
`--max-val` shrinks it too. Not part of `make test`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from mmtag.api import read_dataset
from mmtag.config import FinetuneConfig
from mmtag.data import LabelSpace, train_val_split
from mmtag.encoders import create_encoder
from mmtag.training.finetune import finetune_text


def subsample(index: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if limit <= 0 or limit >= len(index):
        return index
    return np.sort(np.random.default_rng(seed).choice(index, size=limit, replace=False))


def main() -> int:
    defaults = FinetuneConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path,
                    default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    ap.add_argument("--epochs", type=int, default=defaults.epochs)
    ap.add_argument("--lr", type=float, default=defaults.lr, help="encoder learning rate")
    ap.add_argument("--head-lr", type=float, default=defaults.head_lr, help="task-head learning rate")
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--warmup-frac", type=float, default=defaults.warmup_frac)
    ap.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    ap.add_argument("--optimizer", default=defaults.optimizer, choices=["adam", "adamw"])
    ap.add_argument("--max-train", type=int, default=0, help="fine-tune on N random training rows")
    ap.add_argument("--max-val", type=int, default=0, help="validate on N random validation rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", action="store_true", help="show tqdm bars")
    args = ap.parse_args()

    csv = args.shared / "comp5329" / "train.csv"
    if not csv.is_file():
        print(f"skipped: {csv} not found")
        return 0
    t_start = time.perf_counter()
    data, _ = read_dataset(csv, None, labelled=True)
    tr_idx, va_idx = train_val_split(len(data), 0.1, 0)
    tr_idx = subsample(tr_idx, args.max_train, args.seed)
    va_idx = subsample(va_idx, args.max_val, args.seed + 1)
    tr, va = data.subset(tr_idx), data.subset(va_idx)
    space = LabelSpace.from_labels(tr.labels)  # type: ignore[arg-type]
    y_tr = space.encode(tr.labels)  # type: ignore[arg-type]
    y_va = space.encode(va.labels)  # type: ignore[arg-type]
    cfg = FinetuneConfig(modalities=["text"], epochs=args.epochs, lr=args.lr, head_lr=args.head_lr,
                         batch_size=args.batch_size, warmup_frac=args.warmup_frac,
                         weight_decay=args.weight_decay, optimizer=args.optimizer)
    encoder = create_encoder("minilm-l6")
    print(f"comp5329 text fine-tuning: {len(tr)} train / {len(va)} val rows, {len(space)} labels, "
          f"{len(data)} rows in the CSV")
    print(f"epochs={cfg.epochs} lr={cfg.lr:g} head_lr={cfg.head_lr:g} batch_size={cfg.batch_size} "
          f"warmup_frac={cfg.warmup_frac:g} weight_decay={cfg.weight_decay:g} "
          f"optimizer={cfg.optimizer} seed={args.seed}")
    sys.stdout.flush()
    t0 = time.perf_counter()
    result = finetune_text(encoder, tr.captions, y_tr, va.captions, y_va, cfg, seed=args.seed,
                           progress=args.progress)
    total = time.perf_counter() - t0
    print("| epoch | train loss | val loss | val sample-F1 | threshold | wall s |")
    print("|---|---|---|---|---|---|")
    for h in result.history:
        print(f"| {int(h['epoch'])} | {h['train_loss']:.4f} | {h['val_loss']:.4f} | "
              f"{h['val_samples_f1']:.4f} | {h['threshold']:.2f} | {h['seconds']:.1f} |")
    best = result.history[result.best_epoch - 1]
    print(f"best epoch {result.best_epoch}: val sample-F1 {best['val_samples_f1']:.4f}; "
          f"encoder {encoder.encoder_id} -> {result.encoder.encoder_id}")
    print(f"fine-tuning {total:.1f} s, whole script {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
