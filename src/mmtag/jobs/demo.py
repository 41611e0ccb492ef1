"""`mmtag demo`: generate the synthetic dataset, train image / text / fused models, evaluate them
on a labelled holdout, and write a submission — the whole tool end to end in a few minutes on a laptop CPU."""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..data import COCO
from ..data.synthetic import SyntheticPaths, make_dataset
from ..decision.metrics import Metrics
from ..progress import Mode, line, mode
from .predict import evaluate, predict
from .train import TRAIN_LOG, train


@dataclass
class DemoResult:
    out: Path
    metrics: dict[str, Metrics]  # "image" / "text" / "fused" → holdout metrics
    submission: Path
    runs: dict[str, Path]
    data: SyntheticPaths

    def next_steps(self) -> list[str]:
        """What to try next, on the fused run: its report, its summary, serving it, predicting
        with it, and training on one's own data. Shell commands, paths quoted."""
        run = self.runs["fused"]
        q = lambda p: shlex.quote(str(p))  # noqa: E731
        return [
            f"open {q(run / 'report.html')}    # the fused run's report: metrics, thresholds, "
            "errors",
            f"less {q(run / TRAIN_LOG)}    # what training did, stage by stage and epoch by epoch",
            f"mmtag info {q(run)}",
            f"mmtag serve {q(run)}    # web page + HTTP API on http://127.0.0.1:8000",
            f"mmtag predict {q(run)} {q(self.data.test_csv)} --images {q(self.data.images)} "
            f"--out {q(self.out / 'predictions.csv')}",
            "mmtag train YOUR.csv --images YOUR_IMAGES --out runs/mine    # your own data",
        ]


def run_demo(out: str | Path, *, progress: bool = True, seed: int = 0) -> DemoResult:
    out = Path(out)
    # The demo's steps head the bars in a terminal too: three runs show the same kinds of bars.
    console = mode(progress) is not Mode.OFF
    line(f"demo: generating the synthetic dataset in {out / 'data'}", console=console)
    paths = make_dataset(out / "data", seed=seed)
    base = Config()
    base.cache_dir = str(out / "cache")
    base.train.seed = seed
    base.data.label_names = COCO  # the synthetic labels are COCO categories (stop sign, bench, ...)
    variants = {"image": ["image"], "text": ["text"], "fused": ["image", "text"]}
    metrics: dict[str, Metrics] = {}
    runs: dict[str, Path] = {}
    for i, (name, mods) in enumerate(variants.items(), 1):
        cfg = base.override({"model.modalities": mods})
        runs[name] = out / "runs" / name
        line(f"demo: training the {name} model ({i}/{len(variants)}) into {runs[name]}",
             console=console)
        train(paths.train_csv, paths.images, runs[name], cfg, progress=progress,
              overwrite=True)  # the demo regenerates its data and runs each time
        metrics[name] = evaluate(runs[name], paths.holdout_csv, paths.images, progress=progress)
        line(f"demo: {name} model, holdout samples F1 {metrics[name].samples_f1:.4f}",
             console=console)
    submission = out / "submission.csv"
    line(f"demo: predicting the test set with the fused model into {submission}", console=console)
    predict(runs["fused"], paths.test_csv, paths.images, submission, progress=progress)
    return DemoResult(out=out, metrics=metrics, submission=submission, runs=runs, data=paths)
