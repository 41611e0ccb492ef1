"""`mmtag train`: read, train, tune, save into a run directory that is complete or untouched."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .. import dist
from ..config import Config
from ..data import read_dataset
from ..errors import MmtagError
from ..model import bundle as bundle_io
from ..model import rundir
from ..model.tagger import Tagger
from ..training.checkpoint import RunLog
from ..training.trainer import FitReport
from .report import report


def train(train_csv: str | Path | None, images: str | Path | None, out: str | Path, config: Config,
          *, progress: bool = True, resume: bool = False, tensorboard: bool = False,
          overwrite: bool = False) -> tuple[Tagger, FitReport, dict[str, Any]]:
    """Read, train, tune, save: the whole `mmtag train` job. Returns tagger, report, manifest.

    `train_csv` / `images` default to the config's `data.train_csv` / `data.images`. The resolved
    config is written first to the directory the run trains in (OUT, or `.OUT.partial` while a
    finished run at OUT is replaced), so `train --config OUT/config.yaml` reproduces the run and
    `resume=True` continues it from its per-epoch checkpoints (see `mmtag.training.checkpoint`).
    The finished run (bundle, metrics.csv, report, manifest last) is assembled beside OUT and
    moved into place complete (see `mmtag.model.rundir`). A finished or interrupted run at OUT
    is refused unless `overwrite`; until the new run is complete, it stays exactly as it was.
    """
    out = Path(out)
    train_csv = train_csv or config.data.train_csv or None
    images = images or config.data.images or None
    if train_csv is None:
        raise MmtagError("no training CSV: give TRAIN_CSV or data.train_csv in the config")
    config.data.train_csv = str(Path(train_csv).resolve())
    config.data.images = str(Path(images).resolve()) if images else ""
    if config.data.val_csv:  # saved resolved, so `--resume` and `--config RUN/config.yaml` find it
        config.data.val_csv = str(Path(config.data.val_csv).resolve())
    tagger = Tagger(config)
    if "image" in tagger.modalities and images is None:
        raise MmtagError("--images DIR is required when the image modality is used")
    image_dir = images if "image" in tagger.modalities else None
    writer = dist.context().is_main  # under torchrun, rank 0 alone writes the run directory
    # Before any expensive work: an --out that cannot work, or holds a run, is refused now.
    space = dist.checked(lambda: rundir.prepare(out, overwrite=overwrite, resume=resume)
                         if writer else None)
    run_log: RunLog | None = None
    try:
        if space is not None:
            config.save_yaml(space.work / "config.yaml")
            run_log = tagger.run_log = RunLog(space.work, tensorboard=tensorboard)
        dataset, skipped = read_dataset(train_csv, image_dir, labelled=True,
                                        skip_bad=config.data.skip_bad)
        unlabeled = None
        if config.data.unlabeled:
            unlabeled, pool_skipped = read_dataset(config.data.unlabeled, image_dir, labelled=False,
                                                   skip_bad=config.data.skip_bad)
            skipped += pool_skipped
        val = None
        if config.data.val_csv:
            val, val_skipped = read_dataset(config.data.val_csv, image_dir, labelled=True,
                                            skip_bad=config.data.skip_bad)
            skipped += val_skipped
        extra_text = None
        if config.data.extra_text:
            extra_text, extra_skipped = read_dataset(config.data.extra_text, None, labelled=True,
                                                     skip_bad=config.data.skip_bad)
            skipped += extra_skipped
        fit = tagger.fit(dataset, val, unlabeled=unlabeled, extra_text=extra_text, progress=progress)
        fit.skipped = skipped + fit.skipped
        manifest: dict[str, Any] = {}
        if space is not None:
            assert run_log is not None
            run_log.close()
            work = space.work
            manifest = bundle_io.save(out, tagger.bundle(),
                                      add_files=lambda run: add_run_files(work, run))
            space.finish()
    except Exception:
        if space is not None:
            space.abandon()
        raise
    finally:
        if run_log is not None:
            run_log.close()
    dist.barrier()  # no rank reports success before the bundle exists
    return tagger, fit, manifest


def add_run_files(work: Path, run: Path) -> None:
    """Into the new bundle `run`, before its manifest: the training logs and the report."""
    if (work / "metrics.csv").is_file():
        shutil.copy2(work / "metrics.csv", run / "metrics.csv")
    if (work / "tensorboard").is_dir():
        shutil.copytree(work / "tensorboard", run / "tensorboard")
    report(run, progress=False)


def resume(run: str | Path, *, progress: bool = True,
           tensorboard: bool = False) -> tuple[Tagger, FitReport, dict[str, Any]]:
    """Continue an interrupted `train` from its saved config; it finishes into `run`."""
    run = Path(run)
    config = Config.from_yaml(rundir.resume_dir(run) / "config.yaml")
    return train(None, None, run, config, progress=progress, resume=True, tensorboard=tensorboard)
