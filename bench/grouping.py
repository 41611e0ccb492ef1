"""Grouped folds and several captions per image (issue 31): what grouping removes from the
out-of-fold figures, and what the other captions of each image add.

    .venv/bin/python bench/grouping.py [--shared ../shared/data] [--cache DIR] [--only NAME ...]
        [--seeds 0 1 2] [--metric samples]

Parts (every figure seeded, on ../shared/data; "held-out" is a grouped split of *images* the
run never saw, scored on all of their rows):
* `coco5`: coco-real, text only, one row per COCO caption (5-7 per image, from
  captions_all.csv, each with its image's labels). Per seed, 20 % of the images are held out;
  the default text model is cross-fitted (5 folds) on the rest, grouped and ungrouped
  (`--no-group-rows`), and its out-of-fold figure is set beside the held-out one.
* `comp`: comp5329's 25,000 captions (text only; some captions repeat word for word): the same,
  20 % of its caption groups held out.
* `fused`: coco-real, the default fused model (images + text, late fusion, stacked 5 folds),
  trained on one caption per image (today's CSV) against all captions per image, and all
  captions plus comp5329's captions as --extra-text; held-out: the first caption of each held
  out image, so every variant is scored on the same rows; with train time.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from mmtag import Config, Tagger
from mmtag.data import Dataset, read_dataset, row_groups, train_val_split

ROOT = Path(__file__).resolve().parents[1]


def all_captions(coco: Path, out: Path) -> Path:
    """coco-real's training CSV with one row per caption of each image (its labels on each)."""
    with open(coco / "train.csv", newline="", encoding="utf-8") as fh:
        labels = {r["ImageID"]: r["Labels"] for r in csv.DictReader(fh)}
    with open(coco / "captions_all.csv", newline="", encoding="utf-8") as fh:
        rows = [(r["ImageID"], labels[r["ImageID"]], c.strip())
                for r in csv.DictReader(fh) if r["ImageID"] in labels
                for c in r["Captions"].split(" | ") if c.strip()]
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["ImageID", "Labels", "Caption"])
        w.writerows(rows)
    return out


def held_out(data: Dataset, seed: int) -> tuple[Dataset, Dataset]:
    """A grouped 80/20 split: every row of a held-out image (or repeated caption) held out."""
    tr, va = train_val_split(len(data), 0.2, 1000 + seed, row_groups(data).of)
    return data.subset(tr), data.subset(va)


def first_rows(data: Dataset) -> Dataset:
    seen: set[str] = set()
    keep = [i for i, k in enumerate(data.image_ids) if not (k in seen or seen.add(k))]
    return data.subset(keep)


def run(cfg: Config, train: Dataset, test: Dataset, extra: Dataset | None = None) -> dict:
    tagger = Tagger(cfg)
    t0 = time.perf_counter()
    report = tagger.fit(train, extra_text=extra, progress=False)
    seconds = time.perf_counter() - t0
    m, h = report.val_metrics, tagger.evaluate(test, progress=False)
    return {"oof": (m.samples_f1, m.macro_f1), "held": (h.samples_f1, h.macro_f1),
            "folds": np.std(report.fold_samples_f1), "s": seconds, "rows": len(train)}


def line(name: str, seed: int, r: dict) -> str:
    (os_, om), (hs, hm) = r["oof"], r["held"]
    return (f"| {name} | {seed} | {r['rows']} | {os_:.4f} ± {r['folds']:.4f} | {hs:.4f} | "
            f"{os_ - hs:+.4f} | {om:.4f} | {hm:.4f} | {r['s']:.0f} |")


HEADER = ("| variant | seed | training rows | out-of-fold sample-F1 (± fold std) | held-out "
          "sample-F1 | out of fold − held out | out-of-fold macro-F1 | held-out macro-F1 | train s |\n"
          "|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--cache", default=None, help="feature cache (default: mmtag's)")
    ap.add_argument("--only", nargs="*", default=["coco5", "comp", "fused"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmtag-bench-grouping"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    coco, comp = args.shared / "coco-real", args.shared / "comp5329"
    base = Config().override({"cache_dir": args.cache} if args.cache else {})
    text = base.override({"model.modalities": ["text"]})
    loose = {"data.group_rows": False}
    print(HEADER, flush=True)
    if "coco5" in args.only:
        data, _ = read_dataset(all_captions(coco, args.work / "coco5.csv"), None, labelled=True)
        for seed in args.seeds:
            train, test = held_out(data, seed)
            print(line("coco-real text, all captions, grouped", seed, run(text, train, test)), flush=True)
            print(line("coco-real text, all captions, ungrouped", seed,
                       run(text.override(loose), train, test)), flush=True)
    if "comp" in args.only:
        data, _ = read_dataset(comp / "train.csv", None, labelled=True)
        for seed in args.seeds:
            train, test = held_out(data, seed)
            print(line("comp5329 text, grouped", seed, run(text, train, test)), flush=True)
            print(line("comp5329 text, ungrouped", seed, run(text.override(loose), train, test)),
                  flush=True)
    if "fused" in args.only:
        images = coco / "images"
        data, _ = read_dataset(all_captions(coco, args.work / "coco5.csv"), images, labelled=True)
        extra, _ = read_dataset(comp / "train.csv", None, labelled=True)
        for seed in args.seeds:
            train, test = held_out(data, seed)
            test = first_rows(test)  # the same rows for every variant: one caption per image
            one = first_rows(train)
            print(line("coco-real fused, first caption (today's CSV)", seed, run(base, one, test)), flush=True)
            print(line("coco-real fused, all captions", seed, run(base, train, test)), flush=True)
            print(line("coco-real fused, all captions + comp5329 --extra-text", seed,
                       run(base, train, test, extra)), flush=True)


if __name__ == "__main__":
    main()
