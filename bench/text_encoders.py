"""Text encoders compared out of fold on comp5329 captions (issue 16): sample-F1 and speed.

    .venv/bin/python bench/text_encoders.py [--shared ../shared/data] [--cache DIR]
        [--encoders mpnet-base minilm-l6] [--time ENCODER ...] [--folds 5] [--seed 0]
        [--timing-rows 1000] [--ensemble] [--with-test]

On comp5329/train.csv, text only, defaults otherwise:
* speed, for each encoder in `--time` (default: those in `--encoders`), one after the other at
  the start of the run: captions/s of the encoder alone on the first `--timing-rows` captions
  (batches of 128, length-sorted, as feature extraction runs), with no cache involved, so an
  encoder whose features are cached already is timed like the others. The wall time of filling
  the cache with whatever captions it lacked is reported too (the full extraction, for an
  encoder seen for the first time).
* for each encoder in `--encoders`, K-fold cross-fitting (`train.folds`): every row scored by
  the fold head that never saw it. Each decision rule is tuned on the other folds' out-of-fold
  scores and applied to the held fold (no rule is scored on the rows it was tuned on; `gfm`
  tunes nothing): sample-F1 per fold (mean ± std over the K folds), and over all rows pooled
  from those same held-fold decisions. The folds are the trainer's own (`fold_indices(y, K,
  seed)`); each fold head also chose its stopping epoch on its held fold, as every `--folds`
  run does.
* `--ensemble` (with two or more `--encoders`): the mean of the encoders' out-of-fold
  probabilities, each row from fold heads that never saw it, decided by the same protocol: is
  a second encoder worth more than its extraction time?
* where the errors are, for the last model in the table (the ensemble with `--ensemble`): the
  held-fold gfm decisions per label (misses, false alarms, the pooled sample-F1 gained were that
  label always right) against whether the caption names the label at all (`NAMING_WORDS`); the
  pooled sample-F1 with every decision on a named label made right; and, for the most-missed
  labels, the words most over-represented in their missed items' captions.
* label agreement: rows whose captions are the same (lower-cased, letters and spaces only) but
  are separate items; the sample-F1 of one such row's labels taken as the other's prediction.
  Labels come from the images, so a caption does not fix them: this says how much a text-only
  model cannot know (not a ceiling: a model predicts a mode, not one draw).
* `--with-test`, last (after the tables): each fitted encoder's features of comp5329/test.csv
  (unlabelled) go into the cache for the pseudo-labelling runs that read them later. Stopping
  it part-way loses nothing: extraction resumes from the shards already written.
"""
from __future__ import annotations

import argparse
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmtag import Config, Tagger
from mmtag.data import Dataset, LabelSpace, read_dataset
from mmtag.decision import Scores, decide, samples_f1, tune_decisions
from mmtag.encoders import TextEncoder, create_encoder
from mmtag.features import caption_key, encode_captions
from mmtag.training.trainer import fold_indices

ROOT = Path(__file__).resolve().parents[1]
RULES = ("global", "gfm")
BATCH = 128  # what feature extraction uses for captions


@dataclass
class Extraction:
    """Caption features computed into the cache: how many were missing and how long it took."""

    computed: int
    seconds: float

    def cell(self) -> str:
        if not self.computed:
            return "cached"
        return f"{self.computed} in {self.seconds:.0f} s ({self.computed / self.seconds:.1f}/s)"


@dataclass
class Timing:
    name: str
    dim: int
    params_m: float
    load_s: float
    rows: int
    captions_per_s: float


@dataclass
class FitResult:
    name: str
    tagger: Tagger
    extraction: Extraction
    fit_s: float
    rules: dict[str, tuple[float, float, float]]  # rule → (fold mean, fold std, pooled)
    y: np.ndarray  # the labels of the rows, in the order of `predictions`
    predictions: dict[str, np.ndarray]  # rule → every row's held-fold decisions


def load(name: str) -> tuple[TextEncoder, float]:
    t0 = time.perf_counter()
    enc = create_encoder(name, "text")
    assert isinstance(enc, TextEncoder)
    return enc, time.perf_counter() - t0


def time_encoder(name: str, captions: list[str]) -> Timing:
    """Captions/s of the encoder alone, batched and length-sorted like feature extraction."""
    enc, load_s = load(name)
    ordered = sorted(captions, key=len)
    encode_captions(enc, ordered[:8])  # the first call pays one-off allocation and thread start-up
    t0 = time.perf_counter()
    for start in range(0, len(ordered), BATCH):
        encode_captions(enc, ordered[start:start + BATCH])
    rate = len(ordered) / (time.perf_counter() - t0)
    params = sum(p.numel() for p in enc.parameters()) / 1e6
    print(f"{name}: {enc.dim}-d, {params:.0f} M parameters, loaded in {load_s:.1f} s; {rate:.1f} "
          f"captions/s on {len(ordered)} captions ({torch.get_num_threads()} threads)", flush=True)
    return Timing(name, enc.dim, params, load_s, len(ordered), rate)


def extract_into_cache(tagger: Tagger, data: Dataset) -> Extraction:
    """Fill the cache with `data`'s caption features; count the distinct captions it lacked."""
    enc = tagger.featurizer.encoder("text")
    cache = tagger.featurizer.cache
    cache.forget_index()  # another process may have filled it since this one last looked
    index = cache.index(enc.encoder_id, "text")
    missing = len({k for k in map(caption_key, data.captions) if k not in index})
    t0 = time.perf_counter()
    tagger.featurizer.text_features(data, progress=False)
    return Extraction(missing, time.perf_counter() - t0)


def out_of_fold(tagger: Tagger) -> tuple[Scores, np.ndarray]:
    """A --folds run's out-of-fold scores and the labels they score."""
    rec = tagger.validation
    assert rec is not None, "a --folds run keeps its out-of-fold record"
    scores = Scores(probs=rec.probs, branches=rec.branches, union=tagger.head.decision == "union")
    return scores, rec.y_true.astype(np.float32)


def held_fold_decisions(scores: Scores, y: np.ndarray, k: int, seed: int
                        ) -> tuple[dict[str, tuple[float, float, float]], dict[str, np.ndarray]]:
    """Each rule tuned on K-1 folds' out-of-fold scores and applied to the held fold: per-fold
    sample-F1 mean ± std and sample-F1 of all rows' held-fold decisions pooled; and those
    decisions, per rule."""
    figures, predictions = {}, {}
    for rule in RULES:
        pred = np.zeros(y.shape, dtype=bool)
        f1s = []
        for tr, va in fold_indices(y, k, seed):
            decision = tune_decisions(rule, scores.subset(tr), y[tr])
            pred[va] = decide(scores.subset(va), decision)
            f1s.append(samples_f1(y[va], pred[va]))
        figures[rule] = (float(np.mean(f1s)), float(np.std(f1s, ddof=1)), samples_f1(y, pred))
        predictions[rule] = pred
    return figures, predictions


def held_fold_rules(scores: Scores, y: np.ndarray, k: int,
                    seed: int) -> dict[str, tuple[float, float, float]]:
    """The figures of `held_fold_decisions` alone (what the other benches import)."""
    return held_fold_decisions(scores, y, k, seed)[0]


def fit_encoder(name: str, train: Dataset, cache_dir: str, folds: int, seed: int) -> FitResult:
    cfg = Config().override({"cache_dir": cache_dir, "model.modalities": ["text"],
                             "model.text_encoder": name, "train.folds": folds,
                             "train.seed": seed})
    tagger = Tagger(cfg)
    extraction = extract_into_cache(tagger, train)
    print(f"{name}: train features: {extraction.cell()}", flush=True)
    t0 = time.perf_counter()
    tagger.fit(train, progress=False)
    fit_s = time.perf_counter() - t0
    scores, y = out_of_fold(tagger)
    rules, predictions = held_fold_decisions(scores, y, folds, seed)
    print(f"{name}: fit {fit_s:.0f} s | " + ", ".join(
        f"{r} folds {m:.4f} ± {s:.4f}, pooled {p:.4f}" for r, (m, s, p) in rules.items()), flush=True)
    return FitResult(name, tagger, extraction, fit_s, rules, y, predictions)


def ensemble(fits: list[FitResult], k: int, seed: int) -> FitResult:
    """The mean of the fitted encoders' out-of-fold probabilities, decided like each alone."""
    parts = [out_of_fold(r.tagger) for r in fits]
    y = parts[0][1]
    assert all(np.array_equal(p[1], y) for p in parts), "the same rows in the same order"
    probs = np.mean([p[0].probs for p in parts], axis=0)
    name = "mean of " + " and ".join(r.name for r in fits)
    rules, predictions = held_fold_decisions(Scores(probs=probs), y, k, seed)
    return FitResult(name, fits[0].tagger, Extraction(0, 0.0), sum(r.fit_s for r in fits), rules,
                     y, predictions)


def labelled_comp5329(shared: Path) -> tuple[Dataset, np.ndarray] | None:
    """comp5329/train.csv under `shared` and its label matrix; None (said) when it is absent,
    so a probe run without ../shared skips instead of failing."""
    csv = shared / "comp5329" / "train.csv"
    if not csv.is_file():
        print(f"skipped: {csv} not found")
        return None
    data, _ = read_dataset(csv, None, labelled=True)
    return data, LabelSpace.of(data).encode(data.label_rows()).astype(np.float32)


def label_agreement(data: Dataset) -> tuple[int, float]:
    """(pairs, sample-F1) of rows with the same normalised caption: the first row's labels
    scored as the prediction for the second's, one pair per distinct caption."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, caption in enumerate(data.captions):
        groups[re.sub(r"[^a-z ]", "", caption.lower()).strip()].append(i)
    pairs = np.array([g[:2] for g in groups.values() if len(g) >= 2])
    labels = data.label_rows()
    truth = [set(labels[i]) for i in pairs[:, 1]]
    guess = [set(labels[i]) for i in pairs[:, 0]]
    f1 = [2 * len(t & g) / (len(t) + len(g)) if t or g else 1.0 for t, g in zip(truth, guess)]
    return len(pairs), float(np.mean(f1))


# The words by which a caption names each COCO label: its name, plural and the usual caption
# words for it. Person has no single name in captions ("a man", "two kids"), hence the list.
NAMING_WORDS: dict[int, str] = {
    1: r"person|persons|people|man|men|woman|women|boy|boys|girl|girls|child|children|kid|kids"
       r"|guy|guys|lady|ladies|player|players|skier|skiers|surfer|surfers|skateboarder|rider"
       r"|riders|someone|crowd|baby|couple|family|he|she|his|her",
    2: r"bicycles?|bikes?|cyclists?", 3: r"cars?|taxis?|taxi cabs?|suvs?|sedans?",
    4: r"motorcycles?|motorbikes?|motor cycles?|motor bikes?|scooters?",
    5: r"airplanes?|planes?|jets?|aircrafts?|airliners?", 6: r"bus|buses", 7: r"trains?",
    8: r"trucks?", 9: r"boats?|ships?|sailboats?|kayaks?|canoes?|yachts?|ferry",
    10: r"traffic lights?|traffic signals?|stop ?lights?", 11: r"fire hydrants?|hydrants?",
    13: r"stop signs?", 14: r"parking meters?|meters?", 15: r"bench|benches",
    16: r"birds?|seagulls?|gulls?|ducks?|geese|goose|pigeons?|parrots?",
    17: r"cats?|kittens?|kitty", 18: r"dogs?|puppy|puppies", 19: r"horses?|pony|ponies",
}


def error_sources(data: Dataset, y: np.ndarray, pred: np.ndarray) -> None:
    """Where a text model's errors are: per label, its misses and false alarms, the pooled
    sample-F1 gained if that label alone were always right, and how many of its missed items'
    captions name it at all. A miss on a caption that does not name the object is a guess
    from context (a street suggests cars), which no reading of the caption can make certain."""
    space = LabelSpace.of(data)
    assert np.array_equal(y, space.encode(data.label_rows())), "y holds `data`'s rows, in order"
    assert set(space.ids) <= set(NAMING_WORDS), "every label has its naming words"
    caps = [c.lower() for c in data.captions]
    base = samples_f1(y, pred)
    truth = y.astype(bool)
    missed, false = truth & ~pred, ~truth & pred
    named = np.zeros(y.shape, dtype=bool)  # does row i's caption name label c?
    for c, label in enumerate(space.ids):
        pattern = re.compile(rf"\b({NAMING_WORDS[label]})\b")
        named[:, c] = [bool(pattern.search(t)) for t in caps]
    print(f"\nwhere the errors are (held-fold gfm decisions, pooled sample-F1 {base:.4f}):\n")
    print("| label | items | missed | false | pooled sample-F1 gained were this label always right "
          "| missed items whose caption names it | items whose caption names it "
          "| labelled when named | labelled when not named |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in range(len(space)):
        pos, nc = truth[:, c], named[:, c]
        fixed = pred.copy()
        fixed[:, c] = pos
        print(f"| {space.names[c]} | {pos.sum()} | {missed[:, c].sum()} | {false[:, c].sum()} "
              f"| +{samples_f1(y, fixed) - base:.4f} | {nc[missed[:, c]].mean():.0%} "
              f"| {nc[pos].mean():.0%} | {pos[nc].mean():.2f} | {pos[~nc].mean():.3f} |")
    print(f"\nof all {missed.sum()} missed labels, {named[missed].mean():.1%} are named "
          f"in their caption; of all {false.sum()} false ones, {named[false].mean():.1%} are")
    # What reading the captions better could still gain: every decision on a label its
    # caption names made right, the model's own decisions on the rest kept.
    right = np.where(named, truth, pred)
    print(f"pooled sample-F1 with every decision on a named label right: "
          f"{samples_f1(y, right):.4f}")
    # A synonym missing from NAMING_WORDS would count as "not named" and lower that bound: the
    # words most over-represented in the missed items' captions show whether any are missing.
    words = [set(re.findall(r"[a-z]+", t)) for t in caps]
    base_rate = Counter(w for ws in words for w in ws)
    print("\nwords most over-represented in the captions of missed items (count, × base rate):")
    for c in np.argsort(-missed.sum(0))[:6]:
        rows = np.flatnonzero(missed[:, c])
        counts = Counter(w for i in rows for w in words[i])
        lift = {w: n / len(rows) / (base_rate[w] / len(words)) for w, n in counts.items()
                if n >= 15}
        top = sorted(lift, key=lift.get, reverse=True)[:8]
        print(f"  {space.names[c]} ({len(rows)} missed): "
              + ", ".join(f"{w} {counts[w]} ×{lift[w]:.1f}" for w in top))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT / ".." / "shared" / "data")
    ap.add_argument("--cache", default=None, help="feature cache (default: mmtag's)")
    ap.add_argument("--encoders", nargs="*", default=["mpnet-base", "minilm-l6"],
                    help="encoders to cross-fit")
    ap.add_argument("--time", nargs="*", default=None,
                    help="encoders to time (default: the --encoders)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing-rows", type=int, default=1000)
    ap.add_argument("--ensemble", action="store_true",
                    help="also score the mean of the encoders' out-of-fold probabilities")
    ap.add_argument("--with-test", action="store_true",
                    help="also cache features of comp5329/test.csv (for pseudo-labelling)")
    args = ap.parse_args()
    cache = args.cache or str(Path.home() / ".cache" / "mmtag")
    comp = args.shared.resolve() / "comp5329"
    train, _ = read_dataset(comp / "train.csv", None, labelled=True)
    timed = [time_encoder(n, train.captions[:args.timing_rows])
             for n in (args.encoders if args.time is None else args.time)]
    fits = [fit_encoder(n, train, cache, args.folds, args.seed) for n in args.encoders]
    rows = fits + ([ensemble(fits, args.folds, args.seed)]
                   if args.ensemble and len(fits) >= 2 else [])

    if fits:
        print(f"\ncomp5329/train.csv, {len(train)} rows, text only, {args.folds} folds (seed "
              f"{args.seed}); each rule tuned on the other folds, applied to the held fold\n")
        print("| encoder | global: per fold (mean ± std) | global: pooled "
              "| gfm: per fold (mean ± std) | gfm: pooled | train extraction | fit, all folds |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            g, f = r.rules["global"], r.rules["gfm"]
            print(f"| {r.name} | {g[0]:.4f} ± {g[1]:.4f} | {g[2]:.4f} | {f[0]:.4f} ± {f[1]:.4f} "
                  f"| {f[2]:.4f} | {r.extraction.cell()} | {r.fit_s:.0f} s |")
        error_sources(train, rows[-1].y, rows[-1].predictions["gfm"])
    pairs, agreement = label_agreement(train)
    print(f"\nlabel agreement: {pairs} pairs of rows with the same caption; one row's labels as "
          f"the other's prediction score sample-F1 {agreement:.4f}")
    if timed:
        print(f"\n| encoder | dim | params | load | captions/s (first {args.timing_rows} "
              f"comp5329 captions, no cache, {torch.get_num_threads()} threads) |")
        print("|---|---|---|---|---|")
        for t in timed:
            print(f"| {t.name} | {t.dim} | {t.params_m:.0f} M | {t.load_s:.1f} s "
                  f"| {t.captions_per_s:.1f} |")
    if args.with_test:
        test, _ = read_dataset(comp / "test.csv", None, labelled=False)
        for r in fits:
            print(f"{r.name}: comp5329/test.csv features: {extract_into_cache(r.tagger, test).cell()}",
                  flush=True)


if __name__ == "__main__":
    main()
