"""`mmtag audit` on planted errors (issue 32): does it find them, and does its fix help?

    .venv/bin/python bench/audit.py [--shared ../shared/data] [--cache DIR] [--seed 0]
        [--modalities image text]

Into coco-real's training CSV (1,952 rows; images copied, so a copy can carry another ImageID)
it plants, seeded: 5 % of the rows with 2+ labels lose one true label, 5 % of the rows gain one
wrong label, 30 rows are copied (same image bytes and caption, new ImageID) with changed
labels, and 20 rows are copied into a pseudo test CSV. Then:
* label errors: the audit's ranking of (row, label) pairs and of rows against the baseline of
  ranking by out-of-fold loss (BCE of the given labels): precision and recall at the number
  planted, AUROC; and the precision / recall of the pairs cleanlab flags;
* duplicates and leaks: the share of planted copies found;
* the fix: out-of-fold sample-F1 of the default model scored against the *clean* labels on the
  original rows, trained on the clean CSV, on the planted CSV and on the audit's --fix output;
* the time of the audit itself (with --run).
"""
from __future__ import annotations

import argparse
import csv
import shutil
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from mmtag import Config, Tagger
from mmtag.data import read_dataset
from mmtag.decision import samples_f1
from mmtag.jobs.audit import audit

ROOT = Path(__file__).resolve().parents[1]


def plant(coco: Path, work: Path, seed: int):
    rng = np.random.default_rng(seed)
    images = work / "images"
    if not images.exists():
        shutil.copytree(coco / "images", images)
    with open(coco / "train.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    labels = sorted({t for r in body for t in r[1].split()}, key=int)
    clean = [r[1].split() for r in body]
    noisy = [list(c) for c in clean]
    n = len(body)
    planted: set[tuple[int, str]] = set()  # (1-based row, label)
    multi = [i for i in range(n) if len(clean[i]) >= 2]
    for i in rng.choice(multi, int(0.05 * n), replace=False):
        lab = str(rng.choice(noisy[i]))
        noisy[i].remove(lab)
        planted.add((i + 1, lab))
    for i in rng.choice(n, int(0.05 * n), replace=False):
        options = [lab for lab in labels if lab not in noisy[i] and (i + 1, lab) not in planted]
        lab = str(rng.choice(options))
        noisy[i].append(lab)
        planted.add((i + 1, lab))
    out = [[r[0], " ".join(noisy[i]), r[2]] for i, r in enumerate(body)]
    dups = []
    for i in rng.choice(n, 30, replace=False):
        new_id = f"dup{i}-{body[i][0]}"
        shutil.copyfile(images / body[i][0], images / new_id)
        changed = [lab for lab in labels if lab not in clean[i]][:1] or ["1"]
        out.append([new_id, " ".join(changed), body[i][2]])
        dups.append((len(out), i + 1))
    leak_rows = rng.choice(n, 20, replace=False)
    test = [["ImageID", "Caption"]] + [[body[i][0], body[i][2]] for i in leak_rows]
    for name, data in (("clean.csv", [header] + [[r[0], " ".join(clean[i]), r[2]] for i, r in enumerate(body)]),
                       ("planted.csv", [header] + out), ("test.csv", test)):
        with open(work / name, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh, lineterminator="\r\n").writerows(data)
    return planted, dups, {int(i) + 1 for i in leak_rows}, n


def oof_f1_against(cfg: Config, csv_path: Path, images: Path | None, truth: Path, n: int,
                   save: Path | None = None) -> tuple[float, float, Tagger]:
    data, _ = read_dataset(csv_path, images, labelled=True)
    tagger = Tagger(cfg)
    t0 = time.perf_counter()
    tagger.fit(data, progress=False)
    seconds = time.perf_counter() - t0
    if save is not None:
        tagger.save(save)
    ref, _ = read_dataset(truth, images, labelled=True, vocab=tagger.label_space.vocab)
    y = tagger.label_space.encode(ref.label_rows())
    decided = tagger.validation_decisions()[:n]  # the original rows: planted copies come after
    return samples_f1(y, decided), seconds, tagger


def ranking(scores: np.ndarray, truth: np.ndarray, k: int) -> tuple[float, float, float]:
    top = np.argsort(-scores, kind="stable")[:k]
    hits = truth[top].sum()
    return hits / k, hits / truth.sum(), roc_auc_score(truth, scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modalities", nargs="*", default=["image", "text"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmtag-bench-audit"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    planted, dups, leaks, n = plant(args.shared / "coco-real", args.work, args.seed)
    cfg = Config().override({"train.folds": 5, "model.modalities": args.modalities,
                             **({"cache_dir": args.cache} if args.cache else {})})
    images = args.work / "images" if "image" in args.modalities else None
    w = args.work
    f1_clean, s_clean, _ = oof_f1_against(cfg, w / "clean.csv", images, w / "clean.csv", n)
    f1_planted, s_planted, tagger = oof_f1_against(cfg, w / "planted.csv", images, w / "clean.csv",
                                                   n, save=w / "run")
    t0 = time.perf_counter()
    result = audit(w / "planted.csv", images, run=w / "run", tests=[w / "test.csv"], out=w / "out",
                   fix=w / "fixed.csv", progress=False)
    audit_s = time.perf_counter() - t0
    f1_fixed, _, _ = oof_f1_against(cfg, w / "fixed.csv", images, w / "clean.csv", n)

    # label errors, on the planted CSV's original rows
    rec = tagger.validation
    tokens = [tagger.label_space.vocab.token(i) for i in tagger.label_space.ids]
    probs, y = np.clip(rec.probs[:n], 1e-6, 1 - 1e-6), rec.y_true[:n].astype(bool)
    pair_truth = np.zeros(y.shape, dtype=bool)
    for row, lab in planted:
        pair_truth[row - 1, tokens.index(lab)] = True
    loss = np.where(y, -np.log(probs), -np.log(1 - probs))  # the baseline: out-of-fold BCE
    audit_score = np.zeros(y.shape)
    for i in result.issues:
        if i.kind in ("wrong label", "missing label") and i.row <= n:
            audit_score[i.row - 1, tokens.index(i.label)] = 1 + i.score  # flagged first
    from cleanlab.multilabel_classification.rank import get_label_quality_scores_per_class
    quality = get_label_quality_scores_per_class([list(np.flatnonzero(r)) for r in y], probs)
    audit_score = np.where(audit_score > 0, audit_score, 1 - quality)  # then the rest by quality
    k = len(planted)
    rows_truth = pair_truth.any(axis=1)
    from cleanlab.multilabel_classification.rank import get_label_quality_scores
    row_quality = get_label_quality_scores([list(np.flatnonzero(r)) for r in y], probs)
    flagged = audit_score > 1
    print(f"planted: {k} label errors on {rows_truth.sum()} rows, {len(dups)} conflicting copies, "
          f"{len(leaks)} leaked rows; {n} rows, labels {len(tokens)}, modalities {args.modalities}")
    print("| ranking | precision@planted | recall@planted | AUROC |\n|---|---|---|---|")
    for name, scores, truth, kk in (
            ("(row, label) pairs: audit (cleanlab)", audit_score.ravel(), pair_truth.ravel(), k),
            ("(row, label) pairs: out-of-fold loss (baseline)", loss.ravel(), pair_truth.ravel(), k),
            ("rows: audit (cleanlab label quality)", 1 - row_quality, rows_truth, int(rows_truth.sum())),
            ("rows: out-of-fold loss (baseline)", loss.sum(axis=1), rows_truth, int(rows_truth.sum()))):
        p, r, auc = ranking(scores, truth, kk)
        print(f"| {name} | {p:.3f} | {r:.3f} | {auc:.3f} |")
    print(f"\nflagged (row, label) pairs: {flagged.sum()}, of them planted {int((flagged & pair_truth).sum())} "
          f"(precision {(flagged & pair_truth).sum() / max(flagged.sum(), 1):.3f}, recall "
          f"{(flagged & pair_truth).sum() / k:.3f})")
    found = {(i.row, i.other) for i in result.issues if i.kind == "conflicting duplicate"}
    leaked = {i.other for i in result.issues if i.kind == "leak"}
    print(f"conflicting copies found: {sum(d in found for d in dups)}/{len(dups)}; leaks found: "
          f"{len(leaks & leaked)}/{len(leaks)} (other leak rows: {len(leaked - leaks)})")
    print(f"counts: {result.counts()}")
    print("\n| trained on | out-of-fold sample-F1 against the clean labels | train s |\n|---|---|---|")
    print(f"| clean CSV | {f1_clean:.4f} | {s_clean:.0f} |\n| planted CSV | {f1_planted:.4f} | {s_planted:.0f} |")
    print(f"| audit --fix of the planted CSV | {f1_fixed:.4f} | |")
    cost = f1_clean - f1_planted
    print(f"\nrecovered: {(f1_fixed - f1_planted) / cost:.0%} of the {cost:.4f} the errors cost"
          if cost > 0 else "\nthe planted errors cost nothing here")
    print(f"audit with --run: {audit_s:.1f} s for {len(result.data)} rows")


if __name__ == "__main__":
    main()
