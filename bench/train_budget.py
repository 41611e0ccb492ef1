"""Issue 16: does the default training fit the budget (30,000 pairs, ≤ 30 min on 2 cores)?

    .venv/bin/python bench/train_budget.py [--shared ../shared/data] [--cache DIR] [--rows N]
        [--set train.folds=1 ...]

The data here has 25,000 labelled captions (comp5329) but only 1,952 images (coco-real), so no
real 30k-pair set exists. Measured here, in one run:
1. image and caption feature rates of the default encoders on a cold cache (600 coco-real
   images, decoding workers overlapping; 6,000 comp5329 captions), scaled to 30,000 items, in
   the runtime `mmtag train` uses (`--feature-runtime`, its one-off tracing included);
2. everything after the features -- the default `Tagger.fit` (its folds, heads, stacking and
   decision) -- on a *learnable* 25,000-pair set: every comp5329 caption with its own labels,
   paired with a coco-real image whose label set is the caption's (or the closest by Jaccard,
   seeded ties), so image features carry the labels the way real pairs do. (The estimate this
   replaces trained on features and labels drawn independently at random: nothing to learn, so
   its epoch count and time said little.) Scaled linearly to 30,000 rows.
The F1 of this set is not a figure to quote: the images are reused across rows with equal labels.
"""
from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np

from mmtag import Config, Tagger
from mmtag.data import read_dataset
from mmtag.features import extract

ROOT = Path(__file__).resolve().parents[1]
TARGET = 30_000


def matched_pairs(comp_labels: list[list[int]], coco_ids: list[str], coco_labels: list[list[int]],
                  seed: int) -> list[str]:
    """For each caption's label set, a coco-real image with the same set (or the closest)."""
    rng = np.random.default_rng(seed)
    by_set: dict[frozenset[int], list[str]] = {}
    for image_id, labels in zip(coco_ids, coco_labels):
        by_set.setdefault(frozenset(labels), []).append(image_id)
    sets = list(by_set)
    chosen: dict[frozenset[int], list[str]] = {}
    out = []
    for labels in comp_labels:
        key = frozenset(labels)
        if key not in chosen:
            if key in by_set:
                chosen[key] = by_set[key]
            else:
                jac = [len(key & s) / len(key | s) for s in sets]
                best = max(jac)
                chosen[key] = [i for s, j in zip(sets, jac) if j == best for i in by_set[s]]
        pool = chosen[key]
        out.append(pool[int(rng.integers(len(pool)))])
    return out


def write_pairs(path: Path, ids: list[str], labels: list[list[int]], captions: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["ImageID", "Labels", "Caption"])
        for i, l, c in zip(ids, labels, captions):
            w.writerow([i, " ".join(map(str, l)), c])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--cache", default="", help="warm feature cache for step 2 (default: the user's)")
    ap.add_argument("--rows", type=int, default=25_000, help="pairs in step 2 (at most 25,000)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. train.folds=1 (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    coco_csv, comp_csv = args.shared / "coco-real" / "train.csv", args.shared / "comp5329" / "train.csv"
    if not (coco_csv.is_file() and comp_csv.is_file()):
        print(f"skipped: {args.shared} has no coco-real / comp5329 data")
        return
    images = args.shared / "coco-real" / "images"
    overrides = dict(kv.split("=", 1) for kv in args.set)
    coco, _ = read_dataset(coco_csv, images, labelled=True)
    comp, _ = read_dataset(comp_csv, None, labelled=True)

    # 1. feature rates, cold cache
    with tempfile.TemporaryDirectory() as cold:
        tagger = Tagger(Config().override({"cache_dir": cold, **overrides}))
        fz = tagger.featurizer
        n_img, n_txt = min(600, len(coco)), min(6000, len(comp))
        t0 = time.perf_counter()
        # fz.runner: the runtime `mmtag train` computes features with (--feature-runtime; under
        # auto, ONNX Runtime on a CPU, its one-off tracing included in the time)
        extract(coco.subset(list(range(n_img))), ["image"], image_encoder=fz.encoder("image"),
                text_encoder=None, cache=fz.cache, progress=False, runner=fz.runner)
        img_rate = n_img / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        extract(comp.subset(list(range(n_txt))), ["text"], image_encoder=None,
                text_encoder=fz.encoder("text"), cache=fz.cache, progress=False, runner=fz.runner)
        txt_rate = n_txt / (time.perf_counter() - t0)

    # 2. the default fit on a learnable set, features warm
    n = min(args.rows, len(comp))
    rows = np.sort(np.random.default_rng(args.seed).choice(len(comp), n, replace=False))
    labels = [comp.label_rows()[i] for i in rows]
    ids = matched_pairs(labels, list(coco.image_ids), coco.label_rows(), args.seed)
    with tempfile.TemporaryDirectory() as work:
        csv_path = Path(work) / "pairs.csv"
        write_pairs(csv_path, ids, labels, [comp.captions[i] for i in rows])
        pairs, _ = read_dataset(csv_path, images, labelled=True)
        cfg = Config().override({"cache_dir": args.cache, **overrides}) if args.cache else \
            Config().override(overrides)
        tagger = Tagger(cfg)
        tagger.features(pairs, progress=False)  # warm: only the fit below is timed
        t0 = time.perf_counter()
        report = tagger.fit(pairs, progress=False)
        fit_s = time.perf_counter() - t0
    t = tagger.config.train
    img_min, txt_min = TARGET / img_rate / 60, TARGET / txt_rate / 60
    fit_min = fit_s * TARGET / n / 60
    print(f"config: head {tagger.config.model.head_name()}, folds {t.folds}, stack {t.stack}, "
          f"decision {t.thresholds}; {tagger.config.model.image_encoder} + "
          f"{tagger.config.model.text_encoder}, feature runtime {tagger.config.feature_runtime}")
    print(f"image features:   {img_rate:6.1f} images/s (cold, {n_img} coco-real images) -> "
          f"{img_min:5.1f} min for {TARGET:,}")
    print(f"caption features: {txt_rate:6.1f} captions/s (cold, {n_txt} comp5329 captions) -> "
          f"{txt_min:5.1f} min for {TARGET:,}")
    print(f"fit (heads, folds, stacking, decision): {fit_s / 60:.1f} min on {n:,} learnable pairs "
          f"(best epoch {report.best_epoch}, mean over folds) -> {fit_min:5.1f} min for {TARGET:,}")
    print(f"estimate: {img_min + txt_min + fit_min:.1f} min for a default training run on "
          f"{TARGET:,} pairs (budget 30)")


if __name__ == "__main__":
    main()
