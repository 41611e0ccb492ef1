"""More from the encoders we have (issue 16, item 5): several image encoders at once, and
horizontal-flip test-time augmentation, out of fold on coco-real.

    nice -n 5 .venv/bin/python bench/image_encoders.py [--shared ../shared/data] [--cache /tmp/beh/cache]
        [--only ENCODER ...] [--settings image mean+extra]

For each image encoder (efficientnet-lite0, efficientnet-lite2, concat:lite0+lite2, flip:lite0):
* speed: the encoder's forward pass alone, images/s on 64 images decoded beforehand (batches of
  32, after one warm-up batch), and the wall time of extracting what the feature cache lacked
  for the 1,952 coco-real images (decoding included; 0 items when the cache was warm);
* `image`: an image-only head (`model.modalities=["image"]`);
* `mean+extra`: late fusion (`model.fusion="mean"`, `train.stack=True`) with comp5329/train.csv's
  captions as extra text rows (`Tagger.fit(..., extra_text=...)`).
Each head is 5-fold cross-fitted (`train.folds=5`, seed 0) on coco-real/train.csv. Figures, all
on coco-real's training rows (no held-out set), every row scored by the fold head that did not
see it:
* `folds, decision tuned on other folds`: the config's threshold rule tuned on the other four
  folds' out-of-fold scores and applied to the held fold; sample-F1 per fold (mean ± std) and
  pooled over all rows. Nothing here is chosen on the rows it is scored on.
* `run's decision`: the run's own figures: one decision chosen on all out-of-fold scores, then
  sample-F1 pooled and per fold. That decision saw the rows it scores (a single global
  threshold, so it flatters little), so it is shown for comparison with bench/crossfit.py only.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from mmtag import Config, Tagger
from mmtag.data import Dataset, decode_image, read_dataset
from mmtag.decision import Scores, decide, samples_f1, tune_decisions
from mmtag.encoders import ImageEncoder, create_encoder
from mmtag.features.cache import FeatureCache, file_key
from mmtag.features.extract import encode_images
from mmtag.training.trainer import fold_indices

ROOT = Path(__file__).resolve().parents[1]
ENCODERS = ["efficientnet-lite0", "efficientnet-lite2",
            "concat:efficientnet-lite0+efficientnet-lite2", "flip:efficientnet-lite0"]
SETTINGS = {"image": ({"model.modalities": ["image"]}, False),
            "mean+extra": ({"model.fusion": "mean", "train.stack": True}, True)}
FOLDS, SEED = 5, 0


def forward_speed(enc: ImageEncoder, data: Dataset, n: int = 64, batch: int = 32) -> float:
    """Images/s of the encoder's forward pass alone, on images decoded beforehand."""
    images = torch.from_numpy(np.stack([decode_image(data.image_path(i), enc.image_size)
                                        for i in range(n)]))
    encode_images(enc, images[:batch])  # warm-up: first-call allocations and kernel selection
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        encode_images(enc, images[s:s + batch])
    return n / (time.perf_counter() - t0)


def extraction(enc: ImageEncoder, cfg: Config, data: Dataset) -> tuple[int, float]:
    """(items the cache lacked, seconds to extract them): the pipeline's own cached extraction."""
    cache = FeatureCache(cfg.cache_dir)
    have = cache.index(enc.encoder_id, "image")
    missing = len({k for k in (file_key(data.image_path(i)) for i in range(len(data)))
                   if k not in have})
    tagger = Tagger(cfg.override({"model.modalities": ["image"]}))
    tagger.featurizer.replace_encoder("image", enc)  # the encoder already built for the speed test
    t0 = time.perf_counter()
    tagger.features(data, progress=False)
    return missing, time.perf_counter() - t0


def held_out_decisions(tagger: Tagger, rule: str) -> tuple[list[float], float]:
    """Sample-F1 of each fold at `rule` tuned on the other folds' out-of-fold scores, and over
    all rows with each row decided that way."""
    rec = tagger.validation
    assert rec is not None
    y = rec.y_true.astype(np.float32)
    scores = Scores(probs=rec.probs, branches=rec.branches, union=tagger.head.decision == "union")
    pred = np.zeros(y.shape, dtype=bool)
    per_fold = []
    for tr, va in fold_indices(y, FOLDS, SEED):  # the folds the heads were trained on
        decision = tune_decisions(rule, scores.subset(tr), y[tr])
        pred[va] = decide(scores.subset(va), decision)
        per_fold.append(samples_f1(y[va], pred[va]))
    return per_fold, samples_f1(y, pred)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT / ".." / "shared" / "data")
    ap.add_argument("--cache", default="/tmp/beh/cache", help="feature cache")
    ap.add_argument("--only", nargs="*", default=None, help="image encoders (default: all four)")
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = ap.parse_args()
    shared = args.shared.resolve()
    coco = shared / "coco-real"
    train, _ = read_dataset(coco / "train.csv", coco / "images", labelled=True)
    extra = read_dataset(shared / "comp5329" / "train.csv", None, labelled=True)[0]
    # Forward speeds of all four back to back, before any fit: on a shared machine the load
    # changes over an hour of fits, and these are compared with each other.
    encoders = {name: create_encoder(name, "image") for name in ENCODERS}
    speeds = {name: forward_speed(enc, train) for name, enc in encoders.items()}
    print("forward images/s: " + ", ".join(f"{n} {v:.1f}" for n, v in speeds.items()), flush=True)
    speed_rows, f1_rows = [], []
    for name in args.only or ENCODERS:
        base = Config().override({"cache_dir": args.cache, "train.folds": FOLDS,
                                  "train.seed": SEED, "model.image_encoder": name})
        enc = encoders.get(name) or create_encoder(name, "image")
        missing, secs = extraction(enc, base, train)
        speed_rows.append((name, enc.dim, enc.image_size, speeds.get(name, float("nan")), missing, secs))
        print(f"{name}: {enc.dim}-d at {enc.image_size}px | extracted {missing} uncached images "
              f"in {secs:.0f} s", flush=True)
        for setting in args.settings:
            overrides, with_extra = SETTINGS[setting]
            cfg = base.override(overrides)
            tagger = Tagger(cfg)
            t0 = time.perf_counter()
            report = tagger.fit(train, extra_text=extra if with_extra else None, progress=False)
            fit_s = time.perf_counter() - t0
            m = report.val_metrics
            assert m is not None and report.folds == FOLDS
            held, pooled = held_out_decisions(tagger, tagger.config.train.thresholds)
            run_folds = np.array(report.fold_samples_f1)
            f1_rows.append((name, setting, np.mean(held), np.std(held, ddof=1), pooled,
                            run_folds.mean(), run_folds.std(ddof=1), m.samples_f1, fit_s))
            r = f1_rows[-1]
            print(f"  {setting}: folds {r[2]:.4f} ± {r[3]:.4f}, pooled {r[4]:.4f} (decision tuned "
                  f"on other folds) | run's decision: folds {r[5]:.4f} ± {r[6]:.4f}, pooled "
                  f"{r[7]:.4f} | fit {fit_s:.0f} s | folds: {' '.join(f'{v:.4f}' for v in held)}",
                  flush=True)
    print(f"\ncoco-real/train.csv ({len(train)} rows), {FOLDS}-fold out of fold, seed {SEED}; "
          f"threshold rule: {Config().train.thresholds}\n")
    print("| image encoder | setting | sample-F1 per fold (mean ± std) | pooled | "
          "run's decision: per fold | run's decision: pooled | fit time |")
    print("|---|---|---|---|---|---|---|")
    for r in f1_rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.4f} ± {r[3]:.4f} | {r[4]:.4f} | {r[5]:.4f} ± {r[6]:.4f} "
              f"| {r[7]:.4f} | {r[8]:.0f} s |")
    print("\n| image encoder | dim | image size | forward images/s | uncached images extracted "
          "| extraction time | extraction images/s |")
    print("|---|---|---|---|---|---|---|")
    for name, dim, size, speed, missing, secs in speed_rows:
        rate = f"{missing / secs:.1f}" if missing else "(cache warm)"
        print(f"| {name} | {dim} | {size} | {speed:.1f} | {missing} | {secs:.0f} s | {rate} |")
    print(f"\ntorch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
