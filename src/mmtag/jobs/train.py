"""`mmtag train`: read, train, tune, save into a run directory that is complete or untouched."""
from __future__ import annotations

import logging
import shlex
import shutil
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

from .. import dist
from ..version import __version__
from ..config import Config
from ..data import COCO, label_names_of, read_dataset
from ..errors import MmtagError
from ..model import bundle as bundle_io
from ..model import rundir
from ..model.tagger import Tagger
from ..progress import line, train_log
from ..training.checkpoint import RunLog
from ..training.trainer import FitReport
from .report import AUDIT_DIR, report

log = logging.getLogger("mmtag")

# The run's log: a line per stage and per epoch, and mmtag's warnings (see `mmtag.progress`).
TRAIN_LOG = "train.log"


def train(train_csv: str | Path | None, images: str | Path | None, out: str | Path, config: Config,
          *, progress: bool = True, resume: bool = False, tensorboard: bool = False,
          overwrite: bool = False, audit: bool = False) -> tuple[Tagger, FitReport, dict[str, Any]]:
    """Read, train, tune, save: the whole `mmtag train` job. Returns tagger, report, manifest.

    `train_csv` / `images` default to the config's `data.train_csv` / `data.images`. The resolved
    config is written first to the directory the run trains in (OUT, or `.OUT.partial` while a
    finished run at OUT is replaced), so `train --config OUT/config.yaml` reproduces the run and
    `resume=True` continues it from its per-epoch checkpoints (see `mmtag.training.checkpoint`).
    The finished run (bundle, metrics.csv, report, manifest last) is assembled beside OUT and
    moved into place complete (see `mmtag.model.rundir`). A finished or interrupted run at OUT
    is refused unless `overwrite`; until the new run is complete, it stays exactly as it was.
    `audit`: once the run is in place, audit its training CSV from its out-of-fold scores
    (RUN/audit/, `mmtag audit --run`), which the report links.
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
    if config.data.label_names and config.data.label_names.strip().lower() != COCO:
        config.data.label_names = str(Path(config.data.label_names).resolve())  # as val_csv
    label_names_of(config.data.label_names)  # a bad names file is refused before any work
    tagger = Tagger(config)
    if "image" in tagger.modalities and images is None:
        raise MmtagError("--images DIR is required when the image modality is used")
    image_dir = images if "image" in tagger.modalities else None
    writer = dist.context().is_main  # under torchrun, rank 0 alone writes the run directory
    held = ExitStack()

    def start() -> rundir.Workspace | None:
        # Before any expensive work: another process writing OUT, an --out that cannot work,
        # or one that holds a run, is refused now, and in that order, so a refused train has
        # touched nothing. The lock is held until the run is finished or abandoned.
        if not writer:
            return None
        held.enter_context(rundir.lock(out))
        return rundir.prepare(out, overwrite=overwrite, resume=resume)

    try:
        space = dist.checked(start)
    except BaseException:
        held.close()
        raise
    with held:
        return _train_in(space, tagger, config, train_csv, image_dir, out, progress=progress,
                         resume=resume, tensorboard=tensorboard, audit=audit)


def _train_in(space: rundir.Workspace | None, tagger: Tagger, config: Config,
              train_csv: str | Path, image_dir: str | Path | None, out: Path, *, progress: bool,
              resume: bool, tensorboard: bool,
              audit: bool = False) -> tuple[Tagger, FitReport, dict[str, Any]]:
    """Train in the prepared workspace (None on ranks that do not write), save, then report."""
    run_log: RunLog | None = None
    try:
        with train_log(space.work / TRAIN_LOG) if space is not None else nullcontext():
            try:
                if space is not None:
                    line(f"mmtag {__version__} train{' --resume' if resume else ''}: "
                         f"{train_csv} -> {out}", console=False)
                    config.save_yaml(space.work / "config.yaml")
                    run_log = tagger.run_log = RunLog(space.work, tensorboard=tensorboard)
                fit = _read_and_fit(tagger, config, train_csv, image_dir, progress)
                manifest: dict[str, Any] = {}
                if space is not None:
                    assert run_log is not None
                    run_log.close()
                    if fit.val_metrics is not None:
                        metric = config.train.metric  # what the run optimised, when not samples
                        aim = ("" if metric == "samples" else f", {metric} F1 "
                               f"{fit.val_metrics.figure(metric):.4f} (--metric {metric})")
                        line(f"trained: {'out-of-fold' if fit.folds > 1 else 'validation'} "
                             f"samples F1 {fit.val_metrics.samples_f1:.4f}{aim}", show=progress)
                    line(f"saving the run to {out}", show=progress)
                    work = space.work
                    manifest = bundle_io.save(out, tagger.bundle(),
                                              add_files=lambda run: add_run_files(work, run))
            except KeyboardInterrupt:
                line("interrupted", console=False)
                raise
            except Exception as exc:
                line(f"failed: {exc.__class__.__name__}: {exc}", console=False)
                if space is not None and space.resumable:
                    log.warning("mmtag: the interrupted run is kept (config and checkpoints): "
                                "`%s` continues it once the cause is fixed",
                                rundir.resume_command(out))
                raise
        if space is not None:
            space.finish()
    except Exception:
        if run_log is not None:
            run_log.close()
        if space is not None:
            space.abandon()  # what this attempt made goes, unless `--resume` can use it
        raise
    finally:
        if run_log is not None:
            run_log.close()
    if space is not None:
        # The run is complete and in place before its report is drawn: a report that fails (or
        # a plotting library that crashes the process) costs the report, never the trained model.
        # So is its audit, drawn first so the report links it.
        if audit:
            _audit(out, train_csv, image_dir, tagger, progress)
        if _draw_report(out):
            manifest = bundle_io.read_manifest(out)  # it covers report.html now
    dist.barrier()  # no rank reports success before the bundle exists
    return tagger, fit, manifest


def _read_and_fit(tagger: Tagger, config: Config, train_csv: str | Path, image_dir: str | Path | None,
                  progress: bool) -> FitReport:
    """Read the training data (and the optional extra sets the config names) and train."""
    # The layout the config says (--image-col, ...); every file after the training CSV is read
    # with the label vocabulary of the one before, so named labels keep one id each.
    dataset, skipped = read_dataset(train_csv, image_dir, labelled=True,
                                    skip_bad=config.data.skip_bad,
                                    csv_format=config.data.csv_format())
    unlabeled = None
    if config.data.unlabeled:
        unlabeled, pool_skipped = read_dataset(config.data.unlabeled, image_dir, labelled=False,
                                               skip_bad=config.data.skip_bad,
                                               csv_format=config.data.csv_format(),
                                               vocab=dataset.vocab)
        skipped += pool_skipped
    val = None
    if config.data.val_csv:
        val, val_skipped = read_dataset(config.data.val_csv, image_dir, labelled=True,
                                        skip_bad=config.data.skip_bad,
                                        csv_format=config.data.csv_format(), vocab=dataset.vocab)
        skipped += val_skipped
    extra_text = None
    if config.data.extra_text:
        extra_text, extra_skipped = read_dataset(config.data.extra_text, None, labelled=True,
                                                 skip_bad=config.data.skip_bad,
                                                 csv_format=config.data.csv_format(),
                                                 vocab=(val or dataset).vocab)
        skipped += extra_skipped
    fit = tagger.fit(dataset, val, unlabeled=unlabeled, extra_text=extra_text, progress=progress)
    fit.skipped = skipped + fit.skipped
    return fit


def add_run_files(work: Path, run: Path) -> None:
    """Into the new bundle `run`, before its manifest: the training logs."""
    for name in ("metrics.csv", TRAIN_LOG):
        if (work / name).is_file():
            shutil.copy2(work / name, run / name)
    if (work / "tensorboard").is_dir():
        shutil.copytree(work / "tensorboard", run / "tensorboard")


def _audit(run: Path, train_csv: str | Path, image_dir: str | Path | None, tagger: Tagger,
           progress: bool) -> None:
    """RUN/audit/ from the finished run's out-of-fold scores; a failure is a warning."""
    from .audit import audit

    if int(tagger.config.train.folds) < 2:
        log.warning("mmtag: --audit needs a cross-fitted run (--folds K, K >= 2) for out-of-fold "
                    "scores; this run used a split, so no audit was made")
        return
    try:
        audit(train_csv, image_dir, run=run, out=run / AUDIT_DIR, progress=progress)
    except Exception as exc:  # the run is saved; the audit can be rerun by itself
        log.warning("mmtag: the run is saved, but its audit failed (%s: %s); `mmtag audit %s "
                    "--run %s` tries again", exc.__class__.__name__, exc, train_csv, run)


def _draw_report(run: Path) -> bool:
    """RUN/report.html for the finished run at `run`; a failure is a warning, not a lost run."""
    try:
        report(run, progress=False)
        return True
    except Exception as exc:  # noqa: BLE001 - any failure here leaves a complete run behind
        reason = str(exc).splitlines()[0][:300] if str(exc) else ""
        log.warning("mmtag: the run is saved, but its report could not be drawn (%s%s); "
                    "`mmtag report %s` tries again", exc.__class__.__name__,
                    f": {reason}" if reason else "", shlex.quote(str(run)))
        return False


def resume(run: str | Path, *, progress: bool = True,
           tensorboard: bool = False) -> tuple[Tagger, FitReport, dict[str, Any]]:
    """Continue an interrupted `train` from its saved config; it finishes into `run`."""
    run = Path(run)
    config = Config.from_yaml(rundir.resume_dir(run) / "config.yaml")
    return train(None, None, run, config, progress=progress, resume=True, tensorboard=tensorboard)
