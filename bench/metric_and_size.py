"""`--metric` and `--image-size` / `--image-pool` on coco-real, out of fold (issue 31).

    .venv/bin/python bench/metric_and_size.py [--shared ../shared/data] [--cache DIR] [--only NAME ...]

Every variant is the default model (5 folds, seed 0) on coco-real's 1,952 training rows, with
the options its name says; the figures are out of fold (each row scored by the fold head that
never saw it, decided by the rule tuned on the other folds). mAP: the mean over labels of the
average precision of the out-of-fold probabilities (threshold-free). "image, --metric samples"
is the 224 px, mean-pooled image row of the resolution comparison too.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score

from mmtag import Config, Tagger
from mmtag.data import read_dataset

ROOT = Path(__file__).resolve().parents[1]
IMAGE = {"model.modalities": ["image"]}
VARIANTS = {
    "image, --metric samples": IMAGE,
    "image, --metric macro": {**IMAGE, "train.metric": "macro"},
    "fused, --metric samples": {},
    "fused, --metric macro": {"train.metric": "macro"},
    "image, 320 px, mean pooling": {**IMAGE, "model.image_size": 320},
    "image, 320 px, mean+max pooling": {**IMAGE, "model.image_size": 320, "model.image_pool": "mean+max"},
    "fused, 320 px, mean+max pooling": {"model.image_size": 320, "model.image_pool": "mean+max"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--only", nargs="*", default=list(VARIANTS))
    args = ap.parse_args()
    coco = args.shared / "coco-real"
    data, _ = read_dataset(coco / "train.csv", coco / "images", labelled=True)
    base = Config().override({"train.folds": 5, **({"cache_dir": args.cache} if args.cache else {})})
    print("| variant | sample-F1 (± fold std) | micro-F1 | macro-F1 | mAP | decision | train s |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    for name in args.only:
        tagger = Tagger(base.override(VARIANTS[name]))
        t0 = time.perf_counter()
        report = tagger.fit(data, progress=False)
        seconds = time.perf_counter() - t0
        m, rec = report.val_metrics, tagger.validation
        present = rec.y_true.sum(axis=0) > 0
        ap_ = average_precision_score(rec.y_true[:, present], rec.probs[:, present], average="macro")
        print(f"| {name} | {m.samples_f1:.4f} ± {np.std(report.fold_samples_f1):.4f} | "
              f"{m.micro_f1:.4f} | {m.macro_f1:.4f} | {ap_:.4f} | {tagger.thresholds.mode} | "
              f"{seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
