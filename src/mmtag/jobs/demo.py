"""`mmtag demo`: generate the synthetic dataset, train image / text / fused models, evaluate them
on a labelled holdout, and write a submission — the whole tool end to end in about a minute."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..decision.metrics import Metrics
from ..data.synthetic import make_dataset
from .predict import evaluate, predict
from .train import train


@dataclass
class DemoResult:
    out: Path
    metrics: dict[str, Metrics]  # "image" / "text" / "fused" → holdout metrics
    submission: Path
    runs: dict[str, Path]


def run_demo(out: str | Path, *, progress: bool = True, seed: int = 0) -> DemoResult:
    out = Path(out)
    paths = make_dataset(out / "data", seed=seed)
    base = Config()
    base.cache_dir = str(out / "cache")
    base.train.seed = seed
    variants = {"image": ["image"], "text": ["text"], "fused": ["image", "text"]}
    metrics: dict[str, Metrics] = {}
    runs: dict[str, Path] = {}
    for name, mods in variants.items():
        cfg = base.override({"model.modalities": mods})
        runs[name] = out / "runs" / name
        train(paths.train_csv, paths.images, runs[name], cfg, progress=progress,
              overwrite=True)  # the demo regenerates its data and runs each time
        metrics[name] = evaluate(runs[name], paths.holdout_csv, paths.images, progress=progress)
    submission = out / "submission.csv"
    predict(runs["fused"], paths.test_csv, paths.images, submission, progress=progress)
    return DemoResult(out=out, metrics=metrics, submission=submission, runs=runs)
