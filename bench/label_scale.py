"""Issue 29, part 2: does training stay bounded by the data as the number of labels grows?

    .venv/bin/python bench/label_scale.py [--labels 10,18,100,1000,10000] [--rows 2000]
        [--work DIR] [--cache DIR] [--seed 0]
    .venv/bin/python bench/label_scale.py --rules [--labels 10,100,1000,10000] [--rows 2000]

End to end (the default): for each label count C, a synthetic text-only dataset of `--rows` rows
with C distinct string labels, trained by the real `mmtag train` in a fresh process
(`--modalities text`, every default: 5 folds, the `auto` decision, report.html). The caption
features of every CSV are computed once beforehand into the shared `--cache` (one untimed
process, the Python API), so the timed runs read them from the cache. It prints per C: wall
time of the timed run, the decision step's time (from train.log: the last fold's last epoch
line to the `trained:` line), the time from train.log's `saving the run` to the process's end
(the bundle and report.html, which log nothing), its CPU seconds and peak RSS (`os.wait4`),
and wall and CPU time as ratios to C = 18 (the size of the project's real data sets). On a
shared machine the CPU time moves less with the other processes' load than the wall time.

The data: a Zipf-like label frequency (weight 1/rank) so a few labels are common and most are
rare; each row draws 1-5 labels from it, then every label not drawn yet is given to one random
row, so all C labels exist (2,000 rows cannot hold 10,000 labels at 1-5 a row: at C = 10,000
most labels are singletons and a row holds about 8). A caption is its labels' names, shuffled,
with 2-4 filler words: the labels are learnable from the caption, rare ones barely.

`--rules`: each decision rule alone (global, per-class, balanced, gfm, auto) on random scores
of `--rows` rows and C labels (rare-label-shaped: most scores low), each in a fresh process
stopped after `--limit` seconds (then not tried on more labels): the seconds of fitting it and
deciding the rows, and the most memory that allocates (tracemalloc, numpy's included; a second
run, so tracing does not slow the timed one).
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MMTAG = [sys.executable, "-m", "mmtag"]
FILLER = ("a", "the", "photo", "of", "with", "and", "near", "some", "picture", "scene")
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70


def label_names(c: int, rng: np.random.Generator) -> list[str]:
    """C distinct pronounceable pseudo-words (3 syllables: 343,000 possible)."""
    names: set[str] = set()
    while len(names) < c:
        names.add("".join(rng.choice(SYLLABLES, 3)))
    return sorted(names)


def synthetic_rows(c: int, rows: int, seed: int) -> list[tuple[str, str, str]]:
    """(ImageID, Labels, Caption) rows: Zipf-frequent labels, every label present at least once."""
    rng = np.random.default_rng(seed)
    names = label_names(c, rng)
    order = rng.permutation(c)  # which name gets which frequency rank
    weight = 1.0 / np.arange(1, c + 1)
    weight /= weight.sum()
    labels = [set(order[rng.choice(c, size=min(c, int(rng.integers(1, 6))), replace=False, p=weight)])
              for _ in range(rows)]
    seen = set().union(*labels)
    for label in (int(x) for x in order if int(x) not in seen):
        labels[int(rng.integers(rows))].add(label)
    out = []
    for i, row in enumerate(labels):
        words = [names[j] for j in row] + list(rng.choice(FILLER, int(rng.integers(2, 5))))
        rng.shuffle(words)
        out.append((f"{i}.jpg", " ".join(sorted(names[j] for j in row)), " ".join(words)))
    return out


def write_csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ImageID", "Labels", "Caption"])
        writer.writerows(rows)
    return path


def wait_measured(proc: subprocess.Popen, timeout: float | None = None
                  ) -> tuple[int, float, float] | None:
    """Waits for `proc`: its exit code, peak RSS in MiB and CPU seconds (user + system; of
    that process and the children it waited for, `os.wait4`), or None after `timeout` seconds
    (the process is then killed)."""
    end = None if timeout is None else time.perf_counter() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG if end is not None else 0)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
        if end is not None and time.perf_counter() > end:
            proc.kill()
            proc.wait()
            return None
        time.sleep(0.05)


def run_measured(cmd: list[str], env: dict[str, str], log_path: Path,
                 timeout: float | None = None) -> tuple[float, float, float] | None:
    """Runs `cmd`: its wall seconds, peak RSS in MiB and CPU seconds, or None when stopped
    after `timeout`."""
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as out:
        done = wait_measured(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT),
                             timeout)
    wall = time.perf_counter() - t0
    if done is None:
        return None
    if done[0] != 0:
        raise SystemExit(f"failed ({done[0]}): {' '.join(cmd)}\n"
                         f"{log_path.read_text(encoding='utf-8')[-3000:]}")
    return wall, done[1], done[2]


STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \S+ (.*)$")


def log_lines(train_log: Path) -> list[tuple[datetime, str]]:
    out = []
    for raw in train_log.read_text(encoding="utf-8").splitlines():
        m = STAMP.match(raw)
        if m:
            out.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"), m.group(2)))
    return out


def decision_seconds(lines: list[tuple[datetime, str]]) -> float | None:
    """The decision step's seconds read off train.log (second resolution): from the last
    fold's last epoch line to the `trained:` line (the decisions tuned and applied out of fold,
    the model's decision, and their metrics; its `deciding:` progress lines fall between)."""
    texts = [t for _, t in lines]
    epochs = [i for i, t in enumerate(texts) if re.search(r"\bepoch \d+/\d+", t)]
    trained = [i for i, t in enumerate(texts) if t.startswith("trained:")]
    return ((lines[trained[0]][0] - lines[epochs[-1]][0]).total_seconds()
            if epochs and trained else None)


def end_to_end(args: argparse.Namespace) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="label-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else work / "cache"
    env = {**os.environ, "MMTAG_CACHE": str(cache)}
    counts = [int(x) for x in args.labels.split(",")]
    csvs = {c: write_csv(work / f"labels-{c}.csv", synthetic_rows(c, args.rows, args.seed))
            for c in counts}
    warm = [sys.executable, __file__, "--warm", str(cache), *map(str, csvs.values())]
    run_measured(warm, env, work / "warm.out")  # every caption's features, into the cache
    results = []
    for c, data in csvs.items():
        run = work / f"run-{c}"
        cmd = [*MMTAG, "train", str(data), "--modalities", "text", "--cache-dir", str(cache),
               "--out", str(run), "--overwrite", "--seed", str(args.seed)]
        print(f"$ mmtag {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
        started = time.time()
        measured = run_measured(cmd, env, work / f"run-{c}.out", args.limit)
        if measured is None:
            print(f"  C={c}: stopped after {args.limit:.0f} s; its train.log ends:\n    "
                  + "\n    ".join(t for _, t in log_lines(run / "train.log")[-3:]),
                  file=sys.stderr, flush=True)
            results.append((c, None, None, None, None, None))
            continue
        wall, rss, cpu = measured
        lines = log_lines(run / "train.log")
        decision = decision_seconds(lines)
        # saving the bundle and drawing report.html log nothing: from `saving the run` to the
        # process's end (train.log's clock is the wall clock, to the second)
        saving = [at for at, t in lines if t.startswith("saving the run")]
        report = (datetime.fromtimestamp(started + wall) - saving[0]).total_seconds() if saving else None
        results.append((c, wall, cpu, decision, report, rss))
        print(f"  C={c}: {wall:.1f} s ({cpu:.0f} s CPU), decision {decision} s, save+report "
              f"{report} s, peak RSS {rss:.0f} MiB", file=sys.stderr, flush=True)
    base = {c: (wall, cpu) for c, wall, cpu, *_ in results}.get(18)
    print(f"\nrows={args.rows} seed={args.seed} (`mmtag train --modalities text`, defaults; "
          "features cached)")
    print(f"{'labels':>7}{'wall s':>9}{'CPU s':>8}{'decision s':>12}{'save+report s':>15}"
          f"{'peak RSS MiB':>14}{'wall x C=18':>13}{'CPU x C=18':>12}")
    fmt = (lambda v: f"{v:.0f}" if v is not None else "?")
    for c, wall, cpu, decision, report, rss in results:
        if wall is None:
            print(f"{c:>7}{'>' + format(args.limit, '.0f'):>9}  (stopped)")
            continue
        ratios = (f"{wall / base[0]:.2f}", f"{cpu / base[1]:.2f}") if base else ("-", "-")
        print(f"{c:>7}{wall:>9.1f}{cpu:>8.0f}{fmt(decision):>12}{fmt(report):>15}"
              f"{rss:>14.0f}{ratios[0]:>13}{ratios[1]:>12}")


def warm_cache(cache: str, csvs: list[str]) -> None:
    """The text features of every CSV's captions, computed into `cache` as `mmtag train
    --modalities text` computes them (its encoder and feature runtime)."""
    from mmtag import Config, Tagger
    from mmtag.data import read_dataset

    tagger = Tagger(Config().override({"cache_dir": cache, "model.modalities": ["text"]}))
    for path in csvs:
        data, _ = read_dataset(path, None, labelled=True)
        tagger.featurizer.features(data, progress=False)


def random_scores(n: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores shaped like a trained model's on Zipf-frequent labels: a row's true labels score
    high more often than not, the rest mostly low (a rare label's more so)."""
    rng = np.random.default_rng(seed)
    weight = 1.0 / np.arange(1, c + 1)
    y = np.zeros((n, c), dtype=np.int64)
    for i in range(n):
        y[i, rng.choice(c, size=min(c, int(rng.integers(1, 6))), replace=False,
                        p=weight / weight.sum())] = 1
    logits = rng.normal(-4.0 - np.log1p(np.arange(c)) / 2, 1.5, size=(n, c))
    logits += y * rng.normal(5.0, 2.0, size=(n, c))
    return (1 / (1 + np.exp(-logits))).astype(np.float32), y


def one_rule(args: argparse.Namespace) -> None:
    """Child of `--rules`: one rule on one C, its seconds on stdout."""
    from mmtag.decision.thresholds import TUNERS, decide

    import tracemalloc

    probs, y = random_scores(args.rows, args.one_c, args.seed)
    t0 = time.perf_counter()
    decide(probs, TUNERS[args.one_rule](probs, y))
    seconds = time.perf_counter() - t0
    tracemalloc.start()  # again, for the memory it allocates (numpy's included)
    decide(probs, TUNERS[args.one_rule](probs, y))
    print(f"{seconds:.3f} {tracemalloc.get_traced_memory()[1] / 2**20:.1f}")


def rules(args: argparse.Namespace) -> None:
    """Each rule on each C in a fresh process (peak RSS its own), stopped after `--limit` s."""
    counts = [int(x) for x in args.labels.split(",")]
    names = args.rule_names.split(",")
    print(f"rows={args.rows} seed={args.seed} limit={args.limit:.0f} s (random scores, "
          "`bench/label_scale.py --rules`; s: fitting the rule and deciding the rows, MiB: the "
          "most memory allocated while doing it again under tracemalloc)")
    print(f"{'labels':>7}" + "".join(f"{n + ' s':>14}{'MiB':>7}" for n in names))
    over: set[str] = set()  # rules that ran past the limit: not tried on more labels
    for c in counts:
        cells = []
        for name in names:
            if name in over:
                cells.append(f"{'-':>14}{'-':>7}")
                continue
            cmd = [sys.executable, __file__, "--rows", str(args.rows), "--seed", str(args.seed),
                   "--one-rule", name, "--one-c", str(c)]
            with tempfile.TemporaryFile("w+") as out:
                done = wait_measured(subprocess.Popen(cmd, stdout=out), args.limit)
                out.seek(0)
                said = out.read().split() if done and done[0] == 0 else None
            if done is None:
                over.add(name)
                cells.append(f"{'>' + format(args.limit, '.0f'):>14}{'?':>7}")
            elif not said:
                cells.append(f"{'failed':>14}{'?':>7}")
            else:
                cells.append(f"{float(said[-2]):>14.2f}{float(said[-1]):>7.0f}")
            print(f"  C={c} {name}: {cells[-1]}", file=sys.stderr, flush=True)
        print(f"{c:>7}" + "".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", default="10,18,100,1000,10000")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="where the CSVs and runs go (default: a new temporary folder)")
    ap.add_argument("--cache", help="feature cache (default: WORK/cache)")
    ap.add_argument("--rules", action="store_true", help="time each decision rule alone instead")
    ap.add_argument("--rule-names", default="global,per-class,balanced,gfm,auto")
    ap.add_argument("--limit", type=float, default=None,
                    help="seconds before a timed run (--rules: a rule; default 300) is stopped")
    ap.add_argument("--one-rule", help=argparse.SUPPRESS)
    ap.add_argument("--warm", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--one-c", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warm:
        warm_cache(args.warm[0], args.warm[1:])
        return
    if args.rules and args.limit is None:
        args.limit = 300.0
    if args.one_rule:
        one_rule(args)
    else:
        rules(args) if args.rules else end_to_end(args)


if __name__ == "__main__":
    main()
