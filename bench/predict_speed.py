"""Issue-5 benchmark: prediction speed, memory and model size (the 30k-pair training estimate
moved to bench/train_budget.py, which trains on learnable data).

    .venv/bin/python bench/predict_speed.py --run RUN [--repeat N] [--shared ../shared/data] [--work DIR]

RUN is a fused image+text run trained on ../shared/data/coco-real/train.csv, e.g.
    .venv/bin/mmtag train ../shared/data/coco-real/train.csv --images ../shared/data/coco-real/images --out RUN

Prints, in one run:
  1. end-to-end throughput (CSV + JPEG files → submission CSV) of `mmtag predict` on the eager
     bundle and on its ONNX exports, against a plain eager fp32 PyTorch pipeline written here
     (PIL decode, one batch at a time, no workers) doing the same work; startup time apart;
  2. peak memory (PSS) of each `mmtag predict` process tree, in a run of its own;
  3. model_size_mb and validation sample-F1 (the run's own seeded split) of every variant.
Every `mmtag predict` runs as its own process with an empty feature cache (nothing reused).
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmtag import api
from mmtag.config import Config
from mmtag.data import read_csv, train_val_split
from mmtag.heads import FeatureBatch
from mmtag.decision.thresholds import Scores, decide

MMTAG = str(Path(sys.executable).with_name("mmtag"))


# ------------------------------------------------------------------------- helpers
def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _tree_pss_mib(pid: int) -> float:
    """Proportional set size of a process and its descendants (DataLoader workers): each page
    shared between processes (after fork, or in shared memory) is split among them, so the sum
    is the memory the job really holds. Read from /proc/*/smaps_rollup, which walks the page
    tables, so it is only sampled in a run that is not timed."""
    total, pids = 0.0, [pid]
    while pids:
        p = pids.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("Pss:")) / 1024
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    pids += [int(c) for c in fh.read().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            pass
    return total


@contextmanager
def _predict_process(bundle: Path, csv_path: Path, images: Path, out: Path) -> Iterator[subprocess.Popen]:
    """`mmtag predict` in a fresh process with an empty feature cache; the caller waits for it."""
    cache = Path(tempfile.mkdtemp(prefix="mmtag-bench-cache-"))
    proc = subprocess.Popen([MMTAG, "--quiet", "predict", str(bundle), str(csv_path), "--images",
                             str(images), "--out", str(out), "--cache-dir", str(cache)],
                            stdout=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.wait()
        shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"mmtag predict {bundle} failed ({proc.returncode})")


def time_predict(bundle: Path, csv_path: Path, images: Path, out: Path) -> float:
    """Wall seconds of one `mmtag predict`, with nothing sampling it."""
    t0 = time.perf_counter()
    with _predict_process(bundle, csv_path, images, out) as proc:
        proc.wait()
        return time.perf_counter() - t0


def peak_pss(bundle: Path, csv_path: Path, images: Path, out: Path) -> float:
    """Peak PSS in MiB of one `mmtag predict` process tree, sampled every 0.25 s (sampling costs
    CPU, so this run is never a timed one)."""
    peak = 0.0
    with _predict_process(bundle, csv_path, images, out) as proc:
        while proc.poll() is None:
            peak = max(peak, _tree_pss_mib(proc.pid))
            time.sleep(0.25)
    return peak


# ------------------------------------------------------------ the eager baseline
def eager_baseline(run: Path, ids: list[str], captions: list[str], images: Path, out: Path,
                   batch: int = 32) -> float:
    """A plain eager fp32 PyTorch pipeline doing `mmtag predict`'s work one batch at a time:
    PIL full decode + resize, the bundle's own encoders and head in fp32, no workers, no
    overlap. Returns seconds after the model is loaded (its startup is not counted)."""
    tagger = api.Tagger.load(run)
    img_enc, txt_enc, head = tagger.encoders["image"], tagger.encoders["text"], tagger.head
    size = img_enc.image_size
    t0 = time.perf_counter()
    rows = []
    with torch.no_grad():
        for s in range(0, len(ids), batch):
            pics = []
            for image_id in ids[s:s + batch]:
                img = Image.open(images / image_id).convert("RGB").resize((size, size), Image.BILINEAR)
                pics.append(torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1))
            x = torch.stack(pics) / 127.5 - 1.0
            pooled, tokens = img_enc(x)
            tok = txt_enc.tokenize(captions[s:s + batch])
            text = txt_enc(**tok)
            feats = {"image": pooled, "image_tokens": tokens, "text": text}
            fb = FeatureBatch({k: feats[k] for k in tagger.needs})
            out_ = head(fb)
            probs = torch.sigmoid(out_.logits).numpy()
            branches = {k: torch.sigmoid(v).numpy() for k, v in out_.branches.items()}
            mask = decide(Scores(probs, branches, union=head.decision == "union"), tagger.thresholds)
            rows += [[i, " ".join(str(tagger.label_space.ids[j]) for j in np.flatnonzero(m))]
                     for i, m in zip(ids[s:s + batch], mask)]
    write_rows(out, ["ImageID", "Labels"], rows)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, required=True, help="fused eager run trained on coco-real")
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=1,
                    help="timed runs per variant (this machine's speed varies run to run)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mmtag-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    csv_path = args.shared / "coco-real/train.csv"
    images = args.shared / "coco-real/images"
    data = read_csv(csv_path, images_dir=images).dataset
    ids, captions = list(data.image_ids), list(data.captions)
    n = len(ids)

    # The run's own validation split, as a CSV, for F1 of every variant.
    cfg = Config.from_yaml(args.run / "config.yaml")
    _, va = train_val_split(n, cfg.data.val_frac, cfg.train.seed)
    val_csv = write_rows(work / "val.csv", ["ImageID", "Labels", "Caption"],
                         [[ids[i], " ".join(map(str, data.labels[i])), captions[i]] for i in va])
    test_csv = write_rows(work / "test.csv", ["ImageID", "Caption"], [[i, c] for i, c in zip(ids, captions)])
    one_csv = write_rows(work / "one.csv", ["ImageID", "Caption"], [[ids[0], captions[0]]])

    variants = {"eager (fp16-stored weights)": args.run}
    for name, int8 in (("onnx fp32", False), ("onnx int8 text", True)):
        out = work / name.replace(" ", "-")
        shutil.rmtree(out, ignore_errors=True)
        api.export(args.run, out, int8=int8)
        variants[name] = out

    print(f"# mmtag predict benchmark: {n} coco-real pairs, {torch.get_num_threads()} threads\n")
    print("## 3. Model size and validation sample-F1 "
          f"(seeded split val_frac {cfg.data.val_frac} seed {cfg.train.seed}, n={len(va)})")
    print("| variant | model_size_mb | samples_f1 | micro_f1 | macro_f1 |\n|---|---|---|---|---|")
    for name, bundle in variants.items():
        m = api.evaluate(bundle, val_csv, images, progress=False, cache_dir=str(work / "eval-cache"))
        print(f"| {name} | {api.info(bundle)['model_size_mb']:.2f} | {m.samples_f1:.4f} | "
              f"{m.micro_f1:.4f} | {m.macro_f1:.4f} |")

    print(f"\n## 1-2. End-to-end prediction, {n} pairs (CSV + JPEGs -> submission), cold cache")
    base_s = eager_baseline(args.run, ids, captions, images, work / "baseline.csv")
    base_rate = n / base_s
    print(f"Each timed run is a 1-row predict (startup: imports, model load, one item) then the "
          f"full predict; pairs/s = {n} / (full - startup). {args.repeat} run(s) per variant: "
          "median, then [min, max]. Peak memory (PSS) from one more, untimed run.\n")
    print("| pipeline | startup s | predict s | pairs/s | vs baseline | peak PSS MiB (process tree) |\n|---|---|---|---|---|---|")
    print(f"| eager fp32 baseline (bench/, one batch at a time) | - | {base_s:.1f} | {base_rate:.1f} | 1.00x | - |")
    for name, bundle in variants.items():
        startups, predicts, rates = [], [], []
        for _ in range(args.repeat):
            startups.append(time_predict(bundle, one_csv, images, work / "one-pred.csv"))
            wall = time_predict(bundle, test_csv, images, work / f"pred-{bundle.name}.csv")
            predicts.append(wall - startups[-1])
            rates.append(n / max(predicts[-1], 1e-9))
        pss = peak_pss(bundle, test_csv, images, work / "mem-pred.csv")
        rate = float(np.median(rates))
        spread = f" [{min(rates):.1f}, {max(rates):.1f}]" if len(rates) > 1 else ""
        print(f"| mmtag predict, {name} | {np.median(startups):.1f} | {np.median(predicts):.1f} | "
              f"{rate:.1f}{spread} | {rate / base_rate:.2f}x | {pss:.0f} |")
    same = sum(a == b for a, b in zip(open(work / "baseline.csv"), open(work / f"pred-{args.run.name}.csv")))
    print(f"\nbaseline and `mmtag predict` (eager bundle) submissions agree on {same - 1}/{n} rows")


if __name__ == "__main__":
    main()
