"""More from the MiniLM caption vectors? Head settings, seed bagging and token-level probes on
comp5329 text (issue 16: the 0.88 aim).

    .venv/bin/python bench/text_heads.py [--shared ../shared/data] [--cache DIR]
        [--parts heads seeds tokens joint curve] [--folds 5] [--seed 0] [--epochs 25]

A probe, not a feature of mmtag: comp5329/train.csv, text only, K-fold out of fold (the folds
`--folds K` uses). Every row is scored by a model that never saw it; each decision rule (global,
gfm) is tuned on the other folds' out-of-fold scores and applied to the held fold (mean ± std
over folds), as bench/text_encoders.py does.
* `heads`: mmtag's text head (`--modalities text --folds K`) at its defaults and with one
  setting changed at a time (dropout, width, weight decay, learning rate, the asl loss).
* `seeds`: the default head fitted with seeds 1 and 2 as well (their own folds, so every row is
  still out of fold in each) and the three runs' probabilities averaged: bagging over seeds.
* `joint`: does the labels' dependence help the decision? gfm assumes the labels independent
  given the caption. A label-set model (label powerset: a softmax MLP over the label sets seen in
  the training folds, on the frozen MiniLM caption vectors) gives a joint distribution; each item
  predicts the candidate set (the label-set model's most likely sets and the gfm set) with the
  highest expected F1 under the mixture λ·joint + (1 − λ)·independent (the default head's
  probabilities), λ chosen on the other folds.
* `curve`: would more labelled captions get there? The fixed recipe's MLP on the frozen caption
  vectors (MiniLM, and mpnet-base where `make mpnet` installed it) trained, in every fold, on a
  seeded 1/16, 1/8, 1/4, 1/2 and all of the fold's training rows and scored on the whole held
  fold; a saturating power law F1(n) = a − b·n^(−c) fitted to the five points extrapolates what
  twice the rows and unlimited rows would give (`a`).
* `tokens`: does mean pooling of the last layer throw away what the labels need? A fixed recipe
  (AdamW, one-cycle lr 1e-3, `--epochs` epochs, no early stopping, nothing chosen on the held
  fold) trains, on the same folds: an MLP on the last layer's mean (the baseline of this recipe),
  an MLP on the last three layers' means concatenated, and per-label attention pooling over the
  last layer's token states (LAAT-style, plus the mean-pooled MLP). The states are computed
  once by the frozen encoder.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import curve_fit
from torch import nn

from text_encoders import held_fold_rules, labelled_comp5329  # same folder: same data, same scoring

from mmtag import Config, Tagger
from mmtag.data import Dataset
from mmtag.decision import Scores, samples_f1
from mmtag.decision.expected_f1 import decide_expected_f1, poisson_binomial
from mmtag.encoders import create_encoder
from mmtag.errors import MmtagError
from mmtag.training.trainer import fold_indices

ROOT = Path(__file__).resolve().parents[1]
# one setting changed from the defaults per row
HEAD_VARIANTS: dict[str, dict] = {
    "default (dropout 0.5, hidden 512, wd 0.05, lr 1e-3, bce)": {},
    "dropout 0.7": {"model.dropout": 0.7},
    "dropout 0.3": {"model.dropout": 0.3},
    "hidden 1024": {"model.hidden": 1024},
    "weight decay 0.2": {"train.weight_decay": 0.2},
    "lr 3e-4": {"train.lr": 3e-4},
    "loss asl": {"train.loss": "asl"},
}
CURVE = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # fractions of each fold's training rows
LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # weight of the label-set model in the joint probe
MAX_TOKENS = 48
BATCH = 256


def text_head(data: Dataset, cache: str, folds: int, seed: int, extra: dict) -> np.ndarray:
    """Out-of-fold probabilities of a text-only `--folds` fit with `extra` overrides."""
    over = {"cache_dir": cache, "model.modalities": ["text"], "train.folds": folds,
            "train.seed": seed, **extra}
    tagger = Tagger(Config().override(over))
    tagger.fit(data, progress=False)
    assert tagger.validation is not None
    return tagger.validation.probs


def caption_vectors(data: Dataset, cache: str, encoder: str = "minilm-l6") -> np.ndarray:
    """The frozen caption vectors the text head reads, from mmtag's feature cache."""
    tagger = Tagger(Config().override({"cache_dir": cache, "model.modalities": ["text"],
                                       "model.text_encoder": encoder}))
    return tagger.featurizer.text_features(data, progress=False)["text"].astype(np.float32)


def encoder_states(captions: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(N, layers+1, D) mean-pooled hidden states of every layer (embeddings first) and each
    caption's last-layer token states, trimmed to its length, from the frozen MiniLM."""
    enc = create_encoder("minilm-l6", "text").eval()
    tokens: list[np.ndarray] = [None] * len(captions)
    order = np.argsort([len(c) for c in captions], kind="stable")
    means_arr = None
    with torch.no_grad():
        for s in range(0, len(order), 128):
            idx = order[s:s + 128]
            batch = enc.tokenizer([captions[i] for i in idx], padding=True, truncation=True,
                                  max_length=MAX_TOKENS, return_tensors="pt")
            out = enc.model(**batch, output_hidden_states=True)
            m = batch["attention_mask"].unsqueeze(-1).float()
            pooled = torch.stack([(h * m).sum(1) / m.sum(1) for h in out.hidden_states], 1)
            if means_arr is None:
                means_arr = np.zeros((len(captions), *pooled.shape[1:]), np.float32)
            means_arr[idx] = pooled.numpy()
            lengths = batch["attention_mask"].sum(1)
            for j, i in enumerate(idx):
                tokens[i] = out.last_hidden_state[j, :int(lengths[j])].half().numpy()
    return means_arr, tokens


class MLP(nn.Module):
    def __init__(self, dim: int, labels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 512), nn.GELU(),
                                 nn.Dropout(0.5), nn.Linear(512, labels))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


class LabelAttention(nn.Module):
    """Each label pools the token states with its own attention (Vu et al. 2020, LAAT), on top
    of the mean-pooled MLP, so it can only add what the mean loses."""

    def __init__(self, dim: int, labels: int, width: int = 256) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, width)
        self.query = nn.Linear(width, labels, bias=False)
        self.out = nn.Parameter(torch.zeros(labels, dim))
        self.bias = nn.Parameter(torch.zeros(labels))
        self.drop = nn.Dropout(0.3)
        self.mlp = MLP(dim, labels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        att = self.query(torch.tanh(self.proj(h))).masked_fill(~mask.unsqueeze(-1), -1e4).softmax(1)
        pooled = torch.einsum("btc,btd->bcd", att, self.drop(h))
        mean = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return (pooled * self.out).sum(-1) + self.bias + self.mlp(mean)


def padded(tokens: list[np.ndarray], rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' token states padded to the longest among them, and the mask."""
    longest = max(len(tokens[i]) for i in rows)
    x = torch.zeros(len(rows), longest, tokens[rows[0]].shape[1])
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for j, i in enumerate(rows):
        x[j, :len(tokens[i])] = torch.from_numpy(tokens[i].astype(np.float32))
        mask[j, :len(tokens[i])] = True
    return x, mask


def train_recipe(model: nn.Module, loss_of: Callable[[np.ndarray], torch.Tensor], tr: np.ndarray,
                 epochs: int, seed: int) -> None:
    """The fixed recipe: AdamW, one-cycle lr 1e-3, `epochs` passes over rows `tr` in seeded
    shuffled batches, nothing chosen on held-out rows; `loss_of(rows)` is the batch's loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=epochs * -(-len(tr) // BATCH))
    gen = np.random.default_rng(seed)
    for _ in range(epochs):
        model.train()
        perm = gen.permutation(tr)
        for s in range(0, len(perm), BATCH):
            opt.zero_grad()
            loss_of(perm[s:s + BATCH]).backward()
            opt.step()
            sched.step()


def fixed_recipe(make: Callable[[], nn.Module], inputs: Callable, y: np.ndarray,
                 folds: list, epochs: int, seed: int) -> np.ndarray:
    """Out-of-fold probabilities of `make()` trained on each fold's other rows for `epochs`."""
    probs = np.zeros(y.shape, dtype=np.float32)
    target = torch.from_numpy(y.astype(np.float32))
    loss_fn = nn.BCEWithLogitsLoss()
    for tr, va in folds:
        torch.manual_seed(seed)
        model = make()
        train_recipe(model, lambda rows: loss_fn(model(*inputs(rows)), target[rows]), tr, epochs, seed)
        model.eval()
        with torch.no_grad():
            for s in range(0, len(va), 1024):
                rows = va[s:s + 1024]
                probs[rows] = model(*inputs(rows)).sigmoid().numpy()
    return probs


def token_probes(data: Dataset, y: np.ndarray, folds: list, epochs: int,
                 seed: int) -> dict[str, np.ndarray]:
    t0 = time.perf_counter()
    means, tokens = encoder_states(list(data.captions))
    print(f"tokens: encoder states {time.perf_counter() - t0:.0f} s", flush=True)
    labels, dim = y.shape[1], means.shape[-1]
    last = torch.from_numpy(means[:, -1])
    last3 = torch.from_numpy(means[:, -3:].reshape(len(y), -1))
    out = {}
    for name, make, inputs in (
            ("recipe: MLP on the last layer's mean", lambda: MLP(dim, labels),
             lambda rows: (last[rows],)),
            ("recipe: MLP on the last 3 layers' means", lambda: MLP(3 * dim, labels),
             lambda rows: (last3[rows],)),
            ("recipe: per-label attention over tokens + mean MLP",
             lambda: LabelAttention(dim, labels), lambda rows: padded(tokens, rows))):
        t0 = time.perf_counter()
        out[name] = fixed_recipe(make, inputs, y, folds, epochs, seed)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def label_set_probs(x: np.ndarray, y: np.ndarray, folds: list, epochs: int, seed: int,
                    top: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Out of fold, each item's `top` most likely label sets under a label-powerset MLP, as
    (N, top, C) booleans, and their probabilities renormalised to sum to one."""
    codes = y.astype(np.int64) @ (1 << np.arange(y.shape[1]))
    sets = np.zeros((len(y), top), np.int64)
    probs = np.zeros((len(y), top))
    xt = torch.from_numpy(x)
    for tr, va in folds:
        classes, target = np.unique(codes[tr], return_inverse=True)
        yt = torch.zeros(len(y), dtype=torch.int64)
        yt[tr] = torch.from_numpy(target)  # each training row's set, as a class of this fold
        torch.manual_seed(seed)
        model = MLP(x.shape[1], len(classes))
        train_recipe(model, lambda rows: nn.functional.cross_entropy(model(xt[rows]), yt[rows]),
                     tr, epochs, seed)
        model.eval()
        with torch.no_grad():
            q = model(torch.from_numpy(x[va])).softmax(-1).numpy()
        best = np.argsort(-q, axis=1)[:, :top]
        sets[va] = classes[best]
        probs[va] = np.take_along_axis(q, best, 1)
    probs /= probs.sum(1, keepdims=True)
    return (sets[..., None] & (1 << np.arange(y.shape[1]))) > 0, probs


def learning_curve(x: np.ndarray, y: np.ndarray, folds: list, epochs: int, seed: int,
                   fractions: tuple[float, ...] = CURVE) -> dict[float, np.ndarray]:
    """Out-of-fold probabilities of the fixed recipe's MLP trained, in every fold, on a seeded
    `fraction` of the fold's training rows (the held fold is always scored whole)."""
    gen = np.random.default_rng(seed)
    subsets = [gen.permutation(tr) for tr, _ in folds]  # nested: each fraction a prefix
    xt = torch.from_numpy(x)
    out = {}
    for frac in fractions:
        t0 = time.perf_counter()
        sub = [(perm[:round(frac * len(perm))], va) for perm, (_, va) in zip(subsets, folds)]
        out[frac] = fixed_recipe(lambda: MLP(x.shape[1], y.shape[1]), lambda rows: (xt[rows],),
                                 y, sub, epochs, seed)
        print(f"curve {frac:g}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def saturating_fit(n: np.ndarray, f1: np.ndarray) -> tuple[float, float, float]:
    """(a, b, c) of F1(n) = a − b·n^(−c), least squares; a is the curve's ceiling."""
    params, _ = curve_fit(lambda n, a, b, c: a - b * n ** -c, n, f1, p0=(f1[-1] + 0.01, 1.0, 0.5),
                          bounds=([0, 0, 0.01], [1, 1e4, 3]), maxfev=20000)
    return tuple(float(v) for v in params)


def f1_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, A, C) and (N, B, C) boolean label sets → (N, A, B) F1 of each pair."""
    inter = np.einsum("nac,nbc->nab", a.astype(np.float32), b.astype(np.float32))
    size = a.sum(-1)[:, :, None] + b.sum(-1)[:, None, :]
    return np.where(size == 0, 1.0, 2 * inter / np.maximum(size, 1))


def independent_expected_f1(cand: np.ndarray, p: np.ndarray) -> np.ndarray:
    """(N, A, C) non-empty candidate sets, (N, C) probabilities → (N, A) exact expected F1 with
    the labels independent: 2·TP / (|S| + TP + missed), TP and missed Poisson-binomial."""
    c = p.shape[1]
    t = np.arange(c + 1)
    out = np.zeros(cand.shape[:2])
    for a in range(cand.shape[1]):
        inside = poisson_binomial(np.where(cand[:, a], p, 0.0))
        outside = poisson_binomial(np.where(cand[:, a], 0.0, p))
        k = cand[:, a].sum(1)[:, None, None]
        f1 = 2.0 * t[None, :, None] / (k + t[None, :, None] + t[None, None, :])
        out[:, a] = np.einsum("nt,ntr,nr->n", inside, f1, outside)
    return out


def joint_probe(x: np.ndarray, p: np.ndarray, y: np.ndarray, folds: list, epochs: int, seed: int,
                candidates: int = 20) -> dict[str, tuple[float, float]]:
    """Per-fold sample-F1 (mean, std) of gfm, the label-set model alone, and their mixture."""
    sets, q = label_set_probs(x, y, folds, epochs, seed)
    gfm = decide_expected_f1(p)
    cand = np.concatenate([sets[:, :candidates], gfm[:, None]], 1)
    under_joint = (f1_between(cand, sets) * q[:, None, :]).sum(-1)
    under_indep = independent_expected_f1(cand, p)
    per_fold = {}
    for lam in LAMBDAS:
        pick = (lam * under_joint + (1 - lam) * under_indep).argmax(1)
        pred = cand[np.arange(len(y)), pick]
        per_fold[lam] = [samples_f1(y[va], pred[va]) for _, va in folds]
    chosen = [per_fold[max(LAMBDAS, key=lambda lam: np.mean(np.delete(per_fold[lam], k)))][k]
              for k in range(len(folds))]
    out = {"gfm (labels independent)": per_fold[0.0],
           "label-set model alone (λ = 1)": per_fold[1.0],
           "mixture, λ chosen on the other folds": chosen}
    return {name: (float(np.mean(f)), float(np.std(f, ddof=1))) for name, f in out.items()}


def print_curves(curves: dict[str, dict[float, np.ndarray]], y: np.ndarray, folds: list,
                 args: argparse.Namespace) -> None:
    print(f"\ncomp5329/train.csv, {len(y)} rows, text only, {args.folds} folds (seed {args.seed}); "
          f"fixed recipe ({args.epochs} epochs) on a fraction of each fold's training rows; gfm tuned "
          "on the other folds, applied to the held fold\n")
    train_rows = np.mean([len(tr) for tr, _ in folds])
    print("| encoder | " + " | ".join(f"{round(f * train_rows):,} rows" for f in CURVE)
          + " | fitted ceiling a | at 2× the rows |")
    print("|---|" + "---|" * (len(CURVE) + 2))
    for encoder, by_frac in curves.items():
        cells, means = [], []
        for frac in CURVE:
            m, s, _ = held_fold_rules(Scores(probs=by_frac[frac]), y, args.folds, args.seed)["gfm"]
            cells.append(f"{m:.4f} ± {s:.4f}")
            means.append(m)
        n = np.array(CURVE) * train_rows
        a, b, c = saturating_fit(n, np.array(means))
        print(f"| {encoder} | " + " | ".join(cells)
              + f" | {a:.4f} | {a - b * (2 * n[-1]) ** -c:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "mmtag"))
    ap.add_argument("--parts", nargs="+", default=["heads", "seeds", "tokens"],
                    choices=["heads", "seeds", "tokens", "joint", "curve"])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=25,
                    help="the token probes' fixed recipe and the label-set model")
    args = ap.parse_args()
    comp = labelled_comp5329(args.shared)
    if comp is None:
        return
    data, y = comp
    folds = fold_indices(y, args.folds, args.seed)
    probs: dict[str, np.ndarray] = {}
    if {"heads", "seeds", "joint"} & set(args.parts):
        variants = HEAD_VARIANTS if "heads" in args.parts else dict(list(HEAD_VARIANTS.items())[:1])
        for name, extra in variants.items():
            t0 = time.perf_counter()
            probs[name] = text_head(data, args.cache, args.folds, args.seed, extra)
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if "seeds" in args.parts:
        runs = [next(iter(probs.values()))]
        for seed in (args.seed + 1, args.seed + 2):
            runs.append(text_head(data, args.cache, args.folds, seed, {}))
        probs["default, 3 seeds averaged"] = np.mean(runs, axis=0)
    if "tokens" in args.parts:
        probs.update(token_probes(data, y, folds, args.epochs, args.seed))
    joint = None
    if "joint" in args.parts:
        t0 = time.perf_counter()
        x = caption_vectors(data, args.cache)
        joint = joint_probe(x, next(iter(probs.values())), y, folds, args.epochs, args.seed)
        print(f"joint: {time.perf_counter() - t0:.0f} s", flush=True)
    curves = {}
    if "curve" in args.parts:
        for encoder in ("minilm-l6", "mpnet-base"):
            try:
                x = caption_vectors(data, args.cache, encoder)
            except MmtagError as err:  # mpnet-base is opt-in: say so and go on
                print(f"curve {encoder}: skipped ({err})")
                continue
            curves[encoder] = learning_curve(x, y, folds, args.epochs, args.seed)
    if curves:
        print_curves(curves, y, folds, args)
        if not probs:
            return

    print(f"\ncomp5329/train.csv, {len(data)} rows, text only (frozen MiniLM), {args.folds} folds "
          f"(seed {args.seed}); each rule tuned on the other folds, applied to the held fold\n")
    print("| text model | global: per fold (mean ± std) | gfm: per fold (mean ± std) |")
    print("|---|---|---|")
    for name, p in probs.items():
        rules = held_fold_rules(Scores(probs=p), y, args.folds, args.seed)
        g, f = rules["global"], rules["gfm"]
        print(f"| {name} | {g[0]:.4f} ± {g[1]:.4f} | {f[0]:.4f} ± {f[1]:.4f} |")
    if joint:
        print("\n| decision on the default head (joint probe) | per fold (mean ± std) |")
        print("|---|---|")
        for name, (mean, std) in joint.items():
            print(f"| {name} | {mean:.4f} ± {std:.4f} |")


if __name__ == "__main__":
    main()
