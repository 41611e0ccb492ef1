"""Issue-8 benchmark: 1 process vs 2 processes (torchrun, gloo) on this machine.

    .venv/bin/python bench/scale_out.py --run RUN [--run RUN_ONNX] [--shared ../shared/data]

RUN is a fused image+text run (e.g. trained on coco-real). For 1 and 2 processes it measures,
each time in fresh processes with an empty feature cache (so everything is computed):
  * feature extraction of every coco-real row (image + text features, the cache written as in
    training): the ranks split the rows, then every rank reads all of them back;
  * `mmtag predict RUN` end to end on the same CSV, for each RUN given;
and checks the 2-process submission equals the 1-process one. One process uses torch's default
threads (all cores); torchrun gives each of its processes OMP_NUM_THREADS=1, so both settings
use the same cores. Wall times include process start-up and model loading.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker_extract(run: Path, csv_path: Path, images: Path, cache: Path) -> None:
    """Runs as each rank: extract the features the run needs for every row into `cache`."""
    from mmtag import api, dist

    ctx = dist.setup("cpu")
    tagger = api.Tagger.load(run, cache_dir=str(cache))
    dataset, _ = api.read_dataset(csv_path, images, labelled=False)
    dist.barrier()
    t0 = time.perf_counter()
    fs = tagger.features(dataset, progress=False)
    dist.barrier()
    seconds = time.perf_counter() - t0
    if ctx.is_main:
        print(json.dumps({"rows": len(fs.dataset), "seconds": seconds}))
    dist.teardown()


def launch(nproc: int, args: list[str]) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    cmd = ([sys.executable] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--standalone"]) + args
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, action="append")
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--worker", choices=["extract"], help=argparse.SUPPRESS)
    # not --run: torchrun's own parser would take it for an abbreviation of its --run-path
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "extract":
        worker_extract(args.bundle, args.csv, args.images, args.cache)
        return
    if not args.run:
        parser.error("give at least one --run RUN")

    data = args.shared / "coco-real"
    csv_path, images = data / "train.csv", data / "images"
    work = args.work or Path(tempfile.mkdtemp(prefix="mmtag-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"coco-real: {csv_path} ({sum(1 for _ in open(csv_path)) - 1} rows); cores: {os.cpu_count()}")
    print(f"{'job':<44}{'1 process':>12}{'2 processes':>14}{'speed-up':>10}")
    for run in args.run:
        times: dict[int, float] = {}
        for nproc in (1, 2):
            cache = work / f"extract-{run.name}-{nproc}"
            shutil.rmtree(cache, ignore_errors=True)
            _, out = launch(nproc, [__file__, "--worker", "extract", "--bundle", str(run), "--csv",
                                    str(csv_path), "--images", str(images), "--cache", str(cache)])
            times[nproc] = json.loads(out.strip().splitlines()[-1])["seconds"]
        print(f"{'feature extraction, ' + run.name:<44}{times[1]:>11.1f}s{times[2]:>13.1f}s"
              f"{times[1] / times[2]:>9.2f}x")
        subs = {}
        for nproc in (1, 2):
            cache = work / f"predict-{run.name}-{nproc}"
            shutil.rmtree(cache, ignore_errors=True)
            subs[nproc] = work / f"sub-{run.name}-{nproc}.csv"
            times[nproc], _ = launch(nproc, ["-m", "mmtag", "-q", "predict", str(run), str(csv_path),
                                             "--images", str(images), "--out", str(subs[nproc]),
                                             "--cache-dir", str(cache)])
        same = subs[1].read_bytes() == subs[2].read_bytes()
        print(f"{'mmtag predict end to end, ' + run.name:<44}{times[1]:>11.1f}s{times[2]:>13.1f}s"
              f"{times[1] / times[2]:>9.2f}x  (submissions identical: {same})")


if __name__ == "__main__":
    main()
