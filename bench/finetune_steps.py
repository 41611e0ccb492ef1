"""Issue-3 benchmark: what each step of two-stage text training gives on comp5329.

    .venv/bin/python bench/finetune_steps.py [--epochs 4] [--lr 1e-4] [--cache DIR]

All rows use the same seeded split of ../shared/data/comp5329/train.csv (val_frac 0.1, seed 0):
  A frozen MiniLM features + MLP head, global threshold (the issue-2 baseline)
  B A with per-class thresholds
  C MiniLM fine-tuned on the task (warm-up + linear decay, head lr 1e-3 ≫ encoder lr), MLP head
    on the fine-tuned features, global threshold
  D C with per-class thresholds
  E ensemble: mean of A's and C's scores, per-class thresholds
Thresholds are tuned on the validation split that is also scored, as in `mmtag train`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mmtag.api import Tagger, read_dataset
from mmtag.config import Config
from mmtag.decision.metrics import compute
from mmtag.decision.thresholds import decide, tune


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    csv = args.shared / "comp5329" / "train.csv"
    if not csv.is_file():
        print(f"skipped: {csv} not found")
        return
    data, _ = read_dataset(csv, None, labelled=True)
    base = Config().override({"model.modalities": ["text"], "cache_dir": args.cache})

    frozen = Tagger(base)
    t0 = time.perf_counter()
    rep = frozen.fit(data, progress=args.progress)
    t_frozen = time.perf_counter() - t0
    val = rep.val_dataset
    ls = frozen.label_space
    y = ls.encode(val.labels)
    p_frozen = frozen.predict_proba_dataset(val, progress=False).probs

    tuned = base.override({"finetune.modalities": ["text"], "finetune.epochs": args.epochs,
                           "finetune.lr": args.lr, "finetune.head_lr": args.head_lr,
                           "finetune.batch_size": args.batch_size})
    ft = Tagger(tuned)
    t0 = time.perf_counter()
    ft.fit(data, progress=args.progress)
    t_ft = time.perf_counter() - t0
    assert ft.label_space == ls
    p_ft = ft.predict_proba_dataset(val, progress=False).probs

    def score(probs: np.ndarray, mode: str) -> str:
        m = compute(y, decide(probs, tune(mode, probs, y)), ls.ids, ls.names)
        return f"{m.samples_f1:.4f} | {m.micro_f1:.4f} | {m.macro_f1:.4f}"

    print(f"comp5329 text, {rep.n_train} train / {rep.n_val} val rows; fine-tuning: {args.epochs} epochs, "
          f"encoder lr {args.lr}, head lr {args.head_lr}, batch {args.batch_size}, warm-up 6% + linear decay")
    print("| step | samples F1 | micro F1 | macro F1 |")
    print("|---|---|---|---|")
    print(f"| A frozen + MLP head, global threshold | {score(p_frozen, 'global')} |")
    print(f"| B A + per-class thresholds | {score(p_frozen, 'per-class')} |")
    print(f"| C fine-tuned + MLP head, global threshold | {score(p_ft, 'global')} |")
    print(f"| D C + per-class thresholds | {score(p_ft, 'per-class')} |")
    print(f"| E mean of A and C scores, per-class thresholds | {score((p_frozen + p_ft) / 2, 'per-class')} |")
    print(f"time: frozen {t_frozen:.0f} s, fine-tuned (stage one + features + head) {t_ft:.0f} s")
    for e in ft.finetune_history.get("text", []):
        print(f"  fine-tune epoch {e['epoch']}: train loss {e['train_loss']:.4f}, "
              f"task-head val sample-F1 {e['val_samples_f1']:.4f}")


if __name__ == "__main__":
    main()
