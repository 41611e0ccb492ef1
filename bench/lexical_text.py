"""Does word-level evidence add to the text head on comp5329 captions? (issue 16: the 0.88 aim)

    .venv/bin/python bench/lexical_text.py [--shared ../shared/data] [--cache DIR] [--C 8]

A probe, not a feature of mmtag: 5-fold out of fold (seed 0, the folds `--folds 5` uses) on
comp5329/train.csv, text only.
* `text head`: mmtag's default text-only model (`--modalities text`, MiniLM, 5 folds), its
  out-of-fold probabilities;
* `tf-idf LR`: word uni+bigram TF-IDF (fitted on each fold's training captions) and one
  logistic regression per label (scikit-learn), out of fold;
* `MiniLM LR`: the same logistic regression on the cached MiniLM caption vectors;
* blends: the mean of two models' out-of-fold probabilities.
Each row's global threshold is tuned on the other folds' out-of-fold scores and applied to the
held fold (mean ± std over folds): nothing is chosen on the rows it scores.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from text_encoders import labelled_comp5329  # same folder: the same data

from mmtag import Config, Tagger
from mmtag.decision import decide, samples_f1
from mmtag.decision.thresholds import tune_global
from mmtag.training.trainer import fold_indices

ROOT = Path(__file__).resolve().parents[1]
FOLDS, SEED = 5, 0


def held_out(probs: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]]) -> list[float]:
    """Each fold's sample-F1 at the global threshold tuned on the other folds."""
    out = []
    for tr, va in folds:
        thr = tune_global(probs[tr], y[tr])
        out.append(samples_f1(y[va], decide(probs[va], thr)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--cache", default="", help="feature cache (default: the user's)")
    ap.add_argument("--C", type=float, default=8.0, help="inverse L2 strength of the LR probes")
    args = ap.parse_args()
    comp = labelled_comp5329(args.shared)
    if comp is None:
        return
    data, y = comp
    overrides = {"model.modalities": ["text"], "train.folds": FOLDS, "train.seed": SEED}
    if args.cache:
        overrides["cache_dir"] = args.cache
    tagger = Tagger(Config().override(overrides))
    folds = fold_indices(y, FOLDS, SEED)
    captions = list(data.captions)
    probs: dict[str, np.ndarray] = {}

    t0 = time.perf_counter()
    tagger.fit(data, progress=False)
    rec = tagger.validation
    assert rec is not None and np.array_equal(rec.y_true.astype(int), y.astype(int))
    probs["text head"] = rec.probs
    print(f"text head: {time.perf_counter() - t0:.0f} s", flush=True)

    def lr() -> OneVsRestClassifier:
        return OneVsRestClassifier(LogisticRegression(C=args.C, max_iter=2000))

    t0 = time.perf_counter()
    p = np.zeros(y.shape)
    for tr, va in folds:
        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
        words = vec.fit_transform([captions[i] for i in tr])
        p[va] = lr().fit(words, y[tr]).predict_proba(vec.transform([captions[i] for i in va]))
    probs["tf-idf LR"] = p
    print(f"tf-idf LR: {time.perf_counter() - t0:.0f} s", flush=True)

    x = tagger.featurizer.text_features(data, progress=False)["text"].astype(np.float32)
    p = np.zeros(y.shape)
    for tr, va in folds:
        p[va] = lr().fit(x[tr], y[tr]).predict_proba(x[va])
    probs["MiniLM LR"] = p

    probs["text head + tf-idf LR"] = (probs["text head"] + probs["tf-idf LR"]) / 2
    probs["MiniLM LR + tf-idf LR"] = (probs["MiniLM LR"] + probs["tf-idf LR"]) / 2
    print(f"\ncomp5329/train.csv ({len(data)} rows), text only, {FOLDS}-fold out of fold, seed {SEED}; "
          "global threshold tuned on the other folds\n")
    print("| model | sample-F1 per fold (mean ± std) |")
    print("|---|---|")
    for name, p in probs.items():
        f = held_out(p, y, folds)
        print(f"| {name} | {np.mean(f):.4f} ± {np.std(f, ddof=1):.4f} |")


if __name__ == "__main__":
    main()
