"""Top-layer text fine-tuning (`--ft-top-layers N`) against today's whole-encoder fine-tuning
and the frozen encoder, on comp5329 captions with MiniLM or another text encoder (issue 16,
item 6).

    nice -n 5 .venv/bin/python bench/finetune_top.py [--part speed|accuracy|both]
        [--encoder minilm-l6] [--shared ../shared/data] [--cache /tmp/beh/cache] [--threads 1]
        speed:    [--speed-rows 2000] [--speed-seconds 60] [--speed-tops 1 2]
        accuracy: [--top 1] [--epochs 1] [--ft-lr LR] [--rows 0] [--folds 5]

Speed, in one run: the same seeded `--speed-rows` training captions (batch 32) fine-tuned by
`finetune_text` with top_layers 0 (today), then each of `--speed-tops`; each variant runs as
many whole epochs as fill about `--speed-seconds` (judged from its first epoch). Training
captions/s = rows trained / seconds of the epochs (each epoch's seconds, from the history,
include validating on 64 captions). The lower-layer states are computed once per run; their
time is measured apart (a second computation of the same captions, training + validation) and
is included in an amortised figure for one epoch: rows / (states + one epoch).

Accuracy, out of fold: `--folds` seeded folds (`mmtag.training.trainer.fold_indices(y, K, 0)`)
over the comp5329 training rows (or a seeded `--rows` subset). For each fold, the rows of the
other folds train a text-only model through the normal pipeline (`Tagger.fit`): its seeded 10 %
validation split (val_frac 0.1, seed 0; never the held fold) chooses the fine-tuning's best
epoch and the head's, and the head's threshold; the fine-tuned encoder's features of all rows
are computed and cached under its new encoder id; the default MLP head is trained on them.
The frozen encoder goes through the same folds and the same pipeline (features from `--cache`).
Reported: sample-F1 pooled over all out-of-fold rows at one global threshold chosen on those
out-of-fold scores, each fold's sample-F1 at that threshold (mean ± std), and each fold's
sample-F1 at its own model's threshold (chosen on its validation split only: mean ± std).
Everything runs with `--threads` torch threads (default 1: on a shared 2-core machine two
spinning OpenMP threads per process made today's fine-tuning 5× and the top-layer steps 4×
slower than one thread did; the load average is printed). Prints Markdown tables. Needs
../shared/data (skips otherwise). Not part of `make test`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmtag import Config, Tagger
from mmtag.config import FinetuneConfig
from mmtag.data import Dataset, LabelSpace, read_dataset
from mmtag.decision import decide, samples_f1, tune_global
from mmtag.encoders import HFTextEncoder, create_encoder
from mmtag.training.finetune import LowerStates, finetune_text
from mmtag.training.trainer import fold_indices

ROOT = Path(__file__).resolve().parents[1]


def subsample(n: int, limit: int, seed: int) -> np.ndarray:
    if limit <= 0 or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


# ------------------------------------------------------------------------------- speed
@dataclass
class Speed:
    top: int
    rows: int  # training rows trained on (rows per epoch × epochs)
    epochs: int
    train_s: float  # the epochs' seconds (training steps + validation on 64 captions)
    states_s: float  # lower-layer states of the training + validation captions (0 for today)

    @property
    def per_s(self) -> float:
        return self.rows / self.train_s

    @property
    def amortised(self) -> float:
        """Captions/s of one epoch with the states computed for it alone."""
        per_epoch = self.rows / self.epochs
        return per_epoch / (self.train_s / self.epochs + self.states_s)


def speed(data: Dataset, n_rows: int, seconds: float, tops: list[int],
          encoder: str) -> list[Speed]:
    idx = subsample(len(data), n_rows + 64, 1)
    tr, va = data.subset(idx[:n_rows]), data.subset(idx[n_rows:])
    space = LabelSpace.from_labels(tr.labels)  # type: ignore[arg-type]
    y, yv = space.encode(tr.labels), space.encode(va.labels)  # type: ignore[arg-type]
    enc = create_encoder(encoder)
    assert isinstance(enc, HFTextEncoder)
    out = []
    for top in [0, *tops]:
        # A first epoch says how fast this variant is; then enough epochs to fill `seconds`
        # (one run, so the LR schedule spans them all, as a real run's does).
        probe = finetune_text(enc, tr.captions, y, va.captions, yv,
                              FinetuneConfig(epochs=1, batch_size=32, top_layers=top), progress=False)
        epochs = max(1, round(seconds / probe.history[0]["seconds"])) if top else 1
        result = probe if epochs == 1 else finetune_text(
            enc, tr.captions, y, va.captions, yv,
            FinetuneConfig(epochs=epochs, batch_size=32, top_layers=top), progress=False)
        states_s = 0.0
        if top:
            t0 = time.perf_counter()
            LowerStates.compute(enc, tr.captions + va.captions, top, torch.device("cpu"))
            states_s = time.perf_counter() - t0
        s = Speed(top, n_rows * epochs, epochs, sum(h["seconds"] for h in result.history), states_s)
        out.append(s)
        print(f"top_layers={top}: {s.rows} rows in {s.epochs} epoch(s), {s.train_s:.1f} s of epochs, "
              f"{s.per_s:.1f} captions/s; states {s.states_s:.1f} s", flush=True)
    return out


def print_speed(rows: list[Speed], n_rows: int, encoder: str) -> None:
    base = rows[0].per_s
    print(f"\n| fine-tuning ({encoder}, {n_rows} comp5329 captions, batch 32) | epochs | "
          "training captions/s | × today | lower states (once) | captions/s, 1 epoch amortised "
          "| × today |")
    print("|---|---|---|---|---|---|---|")
    for s in rows:
        name = "today: whole encoder (top_layers 0)" if s.top == 0 else f"top_layers {s.top}"
        states = f"{s.states_s:.1f} s" if s.top else "—"
        print(f"| {name} | {s.epochs} | {s.per_s:.1f} | {s.per_s / base:.2f}× | {states} | "
              f"{s.amortised:.1f} | {s.amortised / base:.2f}× |")


# ---------------------------------------------------------------------------- accuracy
@dataclass
class Variant:
    name: str
    overrides: dict[str, object]
    cache: str


def out_of_fold(data: Dataset, variants: list[Variant], k: int) -> None:
    space = LabelSpace.from_labels(data.labels)  # type: ignore[arg-type]
    y = space.encode(data.labels)  # type: ignore[arg-type]
    folds = fold_indices(y, k, 0)
    probs = {v.name: np.zeros(y.shape) for v in variants}
    own: dict[str, list[float]] = {v.name: [] for v in variants}
    seconds: dict[str, float] = {v.name: 0.0 for v in variants}
    best: dict[str, list[int]] = {v.name: [] for v in variants}
    for i, (tr_idx, va_idx) in enumerate(folds, 1):
        for v in variants:
            t0 = time.perf_counter()
            cfg = Config().override({"model.modalities": ["text"], "data.workers": 0,
                                     "cache_dir": v.cache, **v.overrides})
            tagger = Tagger(cfg)
            tagger.fit(data.subset(tr_idx), progress=False)
            pred = tagger.predict_proba_dataset(data.subset(va_idx), progress=False)
            # the fold model's label columns → the whole data's (a label absent from its
            # training rows scores 0)
            cols = [space.ids.index(c) for c in tagger.label_space.ids]
            held = np.zeros((len(va_idx), y.shape[1]))
            held[:, cols] = pred.probs
            mask = np.zeros_like(held, dtype=bool)
            mask[:, cols] = pred.mask
            probs[v.name][va_idx] = held
            own[v.name].append(samples_f1(y[va_idx], mask))
            seconds[v.name] += time.perf_counter() - t0
            ft = tagger.finetune_history.get("text", [])
            best[v.name].append(int(np.argmax([h["val_samples_f1"] for h in ft])) + 1 if ft else 0)
            print(f"fold {i}/{k} {v.name}: held-fold sample-F1 {own[v.name][-1]:.4f} at its own "
                  f"threshold, {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\n| comp5329 text, {len(data)} rows, {k} seeded folds | OOF sample-F1 (pooled, global "
          "threshold chosen on OOF scores) | threshold | per fold at that threshold (mean ± std) "
          "| per fold at each model's own threshold (mean ± std) | wall s, all folds |")
    print("|---|---|---|---|---|---|")
    for v in variants:
        p = probs[v.name]
        thr = tune_global(p, y)
        pooled = samples_f1(y, decide(p, thr))
        per = np.array([samples_f1(y[va], decide(p[va], thr)) for _, va in folds])
        mine = np.array(own[v.name])
        print(f"| {v.name} | {pooled:.4f} | {float(thr.values[0]):.2f} | {per.mean():.4f} ± "
              f"{per.std(ddof=1):.4f} | {mine.mean():.4f} ± {mine.std(ddof=1):.4f} | "
              f"{seconds[v.name]:.0f} |")


# --------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT / ".." / "shared" / "data")
    ap.add_argument("--cache", default="/tmp/beh/cache",
                    help="feature cache with the frozen encoder's comp5329 features")
    ap.add_argument("--encoder", default="minilm-l6",
                    help="text encoder fine-tuned and compared frozen (e.g. mpnet-base)")
    ap.add_argument("--part", choices=["speed", "accuracy", "both"], default="both")
    ap.add_argument("--speed-rows", type=int, default=2000)
    ap.add_argument("--speed-seconds", type=float, default=60.0)
    ap.add_argument("--speed-tops", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--top", type=int, default=1, help="accuracy: top layers fine-tuned")
    ap.add_argument("--epochs", type=int, default=1, help="accuracy: fine-tuning epochs")
    ap.add_argument("--ft-lr", type=float, default=None,
                    help="accuracy: the encoder's learning rate (default: the config's)")
    ap.add_argument("--rows", type=int, default=0, help="accuracy: a seeded subset (0 = all)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    csv = args.shared / "comp5329" / "train.csv"
    if not csv.is_file():
        print(f"skipped: {csv} not found")
        return 0
    t_start = time.perf_counter()
    data, _ = read_dataset(csv, None, labelled=True)
    print(f"torch threads {torch.get_num_threads()}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    if args.part in ("speed", "both"):
        print_speed(speed(data, args.speed_rows, args.speed_seconds, args.speed_tops, args.encoder),
                    args.speed_rows, args.encoder)
    if args.part in ("accuracy", "both"):
        sub = data.subset(subsample(len(data), args.rows, 0))
        print(f"\naccuracy: {len(sub)} of {len(data)} rows (seed 0), {args.encoder}, "
              f"top_layers {args.top}, "
              f"{args.epochs} fine-tuning epoch(s), encoder lr {args.ft_lr or 'default'}, "
              "defaults otherwise", flush=True)
        tuned_cache = tempfile.mkdtemp(prefix="mmtag-ft-top-")  # fine-tuned encoders' features
        try:
            encoder_override = {"model.text_encoder": args.encoder}
            out_of_fold(sub, [
                Variant(f"frozen {args.encoder}", encoder_override, args.cache),
                Variant(f"{f'top {args.top} layer(s)' if args.top else 'whole encoder'} fine-tuned, "
                        f"{args.epochs} epoch(s), "
                        f"lr {args.ft_lr or FinetuneConfig().lr:g}",
                        {**encoder_override, "finetune.modalities": ["text"],
                         "finetune.top_layers": args.top,
                         "finetune.epochs": args.epochs, "finetune.lr": args.ft_lr},
                        tuned_cache),
            ], args.folds)
        finally:
            shutil.rmtree(tuned_cache, ignore_errors=True)
    print(f"\nwhole script {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
