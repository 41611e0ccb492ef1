"""Behaviour fingerprint: a fixed set of seeded runs whose metrics and submissions must not change
across a refactor (issue 15: the restructure is checked against this).

    .venv/bin/python bench/behaviour.py --work /tmp/behav-before --json before.json
    ... restructure ...
    .venv/bin/python bench/behaviour.py --work /tmp/behav-after --json after.json --compare before.json

Each run goes through the CLI in a fresh process, as a user would: `mmtag demo`; text only on
comp5329; fused `concat` and `mean --extra-text` on coco-real; `--finetune text` on a 400-row
slice of comp5329; `export --int8` of the fused run. For each it records the validation metrics
the run saved (`metrics.json`), the sha256 of the head weights, and the sha256 of a submission
written by `mmtag predict` (the demo: of its own submission and holdout table). `--compare`
prints every difference and exits 1 if there is one: metrics must be identical and submissions
byte-identical. Needs ../shared/data (skips the real-data runs without it). Not part of `make test`.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MMTAG = [sys.executable, "-m", "mmtag", "-q"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mmtag(*args: str | Path, env: dict[str, str]) -> str:
    cmd = [*MMTAG, *map(str, args)]
    print("$ mmtag " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return done.stdout


def record_run(run: Path, predict_csv: Path, images: Path | None, work: Path,
               env: dict[str, str]) -> dict[str, Any]:
    """The run's saved validation metrics, head hash and the hash of its submission."""
    sub = work / f"{run.name}-submission.csv"
    mmtag("predict", run, predict_csv, *(["--images", images] if images else []), "--out", sub,
          env=env)
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    return {"validation": metrics.get("validation"),
            "thresholds": json.loads((run / "thresholds.json").read_text(encoding="utf-8")),
            "head_sha256": sha256(run / "head.safetensors"),
            "submission_sha256": sha256(sub)}


def slice_csv(src: Path, dst: Path, rows: int) -> Path:
    with open(src, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        kept = [next(reader)] + [row for _, row in zip(range(rows), reader)]
    with open(dst, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(kept)
    return dst


def fingerprint(shared: Path, work: Path, cache: Path) -> dict[str, Any]:
    env = {**os.environ, "MMTAG_CACHE": str(cache)}
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    demo = work / "demo"
    table = mmtag("demo", "--out", demo, env=env)
    out["demo"] = {"holdout_table": [line for line in table.splitlines()
                                     if line.split() and line.split()[0] in ("image", "text", "fused")],
                   "submission_sha256": sha256(demo / "submission.csv")}
    comp, coco = shared / "comp5329", shared / "coco-real"
    if not comp.is_dir() or not coco.is_dir():
        print(f"skipped the real-data runs: {shared} not found", file=sys.stderr)
        return out
    runs = work / "runs"
    mmtag("train", comp / "train.csv", "--modalities", "text", "--out", runs / "comp-text", env=env)
    out["comp5329-text"] = record_run(runs / "comp-text", comp / "test.csv", None, work, env)
    coco_args = [coco / "train.csv", "--images", coco / "images"]
    mmtag("train", *coco_args, "--fusion", "concat", "--out", runs / "coco-concat", env=env)
    out["coco-concat"] = record_run(runs / "coco-concat", coco / "train.csv", coco / "images",
                                    work, env)
    mmtag("train", *coco_args, "--fusion", "mean", "--extra-text", comp / "train.csv",
          "--out", runs / "coco-mean-extra", env=env)
    out["coco-mean-extra"] = record_run(runs / "coco-mean-extra", coco / "train.csv",
                                        coco / "images", work, env)
    small = slice_csv(comp / "train.csv", work / "comp-400.csv", 400)
    mmtag("train", small, "--modalities", "text", "--finetune", "text", "--ft-epochs", "1",
          "--out", runs / "comp-ft", env=env)
    out["comp5329-finetune-text-400"] = record_run(runs / "comp-ft", small, None, work, env)
    mmtag("export", runs / "coco-concat", "--int8", "--out", runs / "coco-concat-int8", env=env)
    out["coco-concat-int8"] = record_run(runs / "coco-concat-int8", coco / "train.csv",
                                         coco / "images", work, env)
    out["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return out


def differences(before: Any, after: Any, where: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        diffs = []
        for key in sorted(set(before) | set(after)):
            if key in ("elapsed_s", "_about"):
                continue
            if key not in before or key not in after:
                diffs.append(f"{where}{key}: only in {'after' if key in after else 'before'}")
            else:
                diffs += differences(before[key], after[key], f"{where}{key}.")
        return diffs
    return [] if before == after else [f"{where.rstrip('.')}: {before!r} -> {after!r}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT / ".." / "shared" / "data")
    ap.add_argument("--work", type=Path, required=True, help="a new folder for runs and submissions")
    ap.add_argument("--cache", type=Path, help="feature cache (default WORK/cache: cold)")
    ap.add_argument("--json", type=Path, required=True, help="write the fingerprint here")
    ap.add_argument("--compare", type=Path, help="a fingerprint to compare with")
    args = ap.parse_args()
    if args.work.exists() and any(args.work.iterdir()):
        raise SystemExit(f"{args.work}: give a new or empty folder")
    args.work.mkdir(parents=True, exist_ok=True)
    result = fingerprint(args.shared.resolve(), args.work.resolve(),
                         (args.cache or args.work / "cache").resolve())
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"fingerprint written to {args.json} ({result.get('elapsed_s', '?')} s)")
    if args.compare is None:
        return 0
    diffs = differences(json.loads(args.compare.read_text(encoding="utf-8")), result)
    for d in diffs:
        print(f"DIFFERENT {d}")
    print("identical: metrics, thresholds, head weights and submissions" if not diffs
          else f"{len(diffs)} difference(s)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
