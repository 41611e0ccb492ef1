"""Command line: parses options, calls `mmtag.api`, prints results. No logic of its own.

argparse (stdlib) rather than typer/click: no extra dependency, fast start-up, and `torchrun -m
mmtag` works unchanged.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import AT_LEAST_1, FUSION_HEAD, POSITIVE, Constraint, Interval
from .errors import DataError, MmtagError

log = logging.getLogger("mmtag")


def _progress(args: argparse.Namespace) -> bool:
    from . import dist

    return not args.quiet and sys.stderr.isatty() and dist.context().is_main


def _report_skipped(skipped: list[DataError]) -> None:
    if not skipped:
        return
    print(f"skipped {len(skipped)} bad row(s) (--skip-bad):", file=sys.stderr)
    for err in skipped[:5]:
        print(f"  {err}", file=sys.stderr)
    if len(skipped) > 5:
        print(f"  ... and {len(skipped) - 5} more", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    from . import api, dist
    from .config import Config
    from .presets import load_preset

    if args.resume:
        if args.train_csv or args.config or args.preset or args.out or args.overwrite:
            raise MmtagError("--resume RUN continues with the run's own config.yaml into RUN; "
                             "give no other inputs")
        print(f"resuming {args.resume}")
        try:
            _, report, manifest = api.resume(args.resume, progress=_progress(args),
                                             tensorboard=args.tensorboard)
        except KeyboardInterrupt:
            raise _interrupted(args.resume) from None
        return _print_trained(args.resume, report, manifest)
    if args.preset and args.config:
        raise MmtagError("give --preset or --config, not both (copy the preset's YAML to edit it)")
    config = (load_preset(args.preset) if args.preset
              else Config.from_yaml(args.config) if args.config else Config())
    config = config.override({
        "data.val_frac": args.val_frac, "data.skip_bad": True if args.skip_bad else None,
        "data.workers": args.workers, "model.modalities": args.modalities,
        "model.fusion": args.fusion, "model.image_encoder": args.image_encoder,
        "model.text_encoder": args.text_encoder, "model.hidden": args.hidden,
        "model.random_init": True if args.random_init else None,
        "train.seed": args.seed, "train.epochs": args.epochs, "train.lr": args.lr,
        "train.folds": _folds_of(args), "train.stack": args.stack,
        "train.batch_size": args.batch_size, "train.patience": args.patience,
        "train.optimizer": args.optimizer, "train.loss": args.loss,
        "train.thresholds": _decision(args), "train.oversample": True if args.oversample else None,
        "data.unlabeled": args.unlabeled, "data.extra_text": args.extra_text,
        "data.val_csv": str(args.val) if args.val else None,
        "augment.image": args.image_aug, "augment.text": args.text_aug, "augment.views": args.aug_views,
        "pseudo.rounds": args.pseudo_rounds,
        "pseudo.confidence": args.pseudo_confidence,
        "finetune.modalities": (["image", "text"] if args.finetune == "both" else args.finetune),
        "finetune.unfreeze_blocks": args.unfreeze_blocks, "finetune.epochs": args.ft_epochs,
        "finetune.lr": args.ft_lr, "finetune.head_lr": args.ft_head_lr,
        "finetune.batch_size": args.ft_batch_size, "finetune.optimizer": args.ft_optimizer,
        "finetune.top_layers": args.ft_top_layers,
        "cache_dir": args.cache_dir, "device": args.device, "amp": args.amp,
        "data.train_csv": str(args.train_csv) if args.train_csv else None,
        "data.images": str(args.images) if args.images else None,
    })
    ctx = dist.setup(config.device, config.amp)
    # One directory for all ranks: rank 0's clock names it.
    out = args.out or dist.broadcast(Path("runs") / time.strftime("mmtag-%Y%m%d-%H%M%S"))
    print(f"run directory: {out}" + (f" ({ctx.world} processes)" if ctx.distributed else ""))
    try:
        _, report, manifest = api.train(args.train_csv, args.images, out, config,
                                        progress=_progress(args), tensorboard=args.tensorboard,
                                        overwrite=args.overwrite)
    except KeyboardInterrupt:
        raise _interrupted(out) from None
    return _print_trained(out, report, manifest)


def _decision(args: argparse.Namespace) -> str | None:
    """`--decision`, or its older spelling `--thresholds` (one config key: train.thresholds)."""
    if args.decision and args.thresholds and args.decision != args.thresholds:
        raise MmtagError(f"--decision {args.decision} and --thresholds {args.thresholds} name two "
                         "decision rules; give one (--thresholds is the older spelling)")
    return args.decision or args.thresholds


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


def _interrupted(run: Path) -> KeyboardInterrupt:
    """Ctrl-C in training: the interrupt, carrying the command that continues the run (when
    there is one to continue); `main` prints it."""
    from .model import rundir

    return KeyboardInterrupt(f"to continue: {rundir.resume_command(run)}" if rundir.resumable(run) else "")


def _print_trained(out: Path, report: Any, manifest: dict[str, Any]) -> int:
    if not manifest:  # a rank other than 0 under torchrun: it wrote nothing to describe
        return 0
    _report_skipped(report.skipped)
    m = report.val_metrics
    print(f"report: {Path(out) / 'report.html'}")
    if report.folds > 1:
        f1 = report.fold_samples_f1
        print(f"trained {manifest['head']['name']} x {report.folds} folds on {report.n_train} rows, "
              f"each row validated once, out of fold (mean best epoch {report.best_epoch})")
        if m is not None:
            print(f"out-of-fold: {m.headline()}")
        print(f"per fold: samples_f1 {sum(f1) / len(f1):.4f} ± {_std(f1):.4f} over {len(f1)} folds")
    else:
        print(f"trained {manifest['head']['name']} on {report.n_train} rows, validated on {report.n_val} "
              f"(best epoch {report.best_epoch})")
        if m is not None:
            print(f"validation: {m.headline()}")
    for r in report.pseudo_rounds:
        print(f"pseudo-label round {r.round}: {r.n_pseudo} pseudo-labelled rows, "
              f"val samples_f1={r.val_samples_f1:.4f}")
    print(f"model_size_mb: {manifest['model_size_mb']}")
    print(f"run saved to {out}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from .jobs.ablate import run_ablation
    from .config import Config

    config = Config.from_yaml(args.config) if args.config else Config()
    config = config.override({"train.seed": args.seed, "data.val_frac": args.val_frac,
                              "train.folds": _folds_of(args), "cache_dir": args.cache_dir})
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    run_ablation(args.train_csv, args.images, args.out, config, variants,
                 extra_text=args.extra_text, progress=_progress(args))
    print((args.out / "ablation.md").read_text(encoding="utf-8"), end="")
    print(f"tables written to {args.out / 'ablation.csv'} and {args.out / 'ablation.md'}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .config import Config
    from .jobs.sweep import best_row, load_grid_file, parse_grid, run_sweep

    if bool(args.grid) == bool(args.grid_file):
        raise MmtagError("give exactly one of --grid \"lr=1e-4,5e-4 batch=32,64\" or --grid-file FILE")
    grid = parse_grid(args.grid) if args.grid else load_grid_file(args.grid_file)
    config = Config.from_yaml(args.config) if args.config else Config()
    config = config.override({"train.seed": args.seed, "data.val_frac": args.val_frac,
                              "train.folds": _folds_of(args), "cache_dir": args.cache_dir})
    rows = run_sweep(args.train_csv, args.images, args.out, config, grid, progress=_progress(args))
    print((args.out / "sweep.md").read_text(encoding="utf-8"), end="")
    print(f"tables: {args.out / 'sweep.csv'}, {args.out / 'sweep.md'}; plot: {args.out / 'sweep.png'}")
    print(f"best run (a bundle for mmtag predict): {best_row(rows).run}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import api, dist
    from .io import atomic_write_text

    metrics = api.evaluate(args.run, args.csv, args.images, progress=_progress(args),
                           cache_dir=args.cache_dir)
    print(metrics.table())
    if not dist.context().is_main:
        return 0  # under torchrun, rank 0 writes the files
    if args.json:
        atomic_write_text(args.json, json.dumps(metrics.to_dict(), indent=2) + "\n")
        print(f"metrics written to {args.json}")
    if args.report:
        api.report(args.run, args.report, csv_path=args.csv, images=args.images, progress=False)
        print(f"report written to {args.report}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from . import api

    preds = api.predict(args.run, args.csv, args.images, args.out, progress=_progress(args),
                        cache_dir=args.cache_dir)
    print(f"wrote {len(preds.labels)} predictions to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import api

    manifest = api.export(args.run, args.out, format=args.format, int8=args.int8,
                          retune=args.retune)
    print(f"exported {args.run} -> {args.out} ({args.format}{', int8 text encoder' if args.int8 else ''}), "
          f"model_size_mb {manifest['model_size_mb']}")
    exported = json.loads((Path(args.out) / "metrics.json").read_text(encoding="utf-8"))["export"]
    if exported["thresholds_retuned"]:
        print(f"thresholds re-tuned on the run's validation split (--retune): "
              f"{_thresholds_text(exported['thresholds_before'])} -> "
              f"{_thresholds_text(exported['thresholds_after'])}")
    else:
        print(f"thresholds kept from the run: {_thresholds_text(exported['thresholds_after'])}"
              + ("" if not args.retune else " (the validation images are gone: nothing to re-tune on)"))
    return 0


def _thresholds_text(t: dict[str, Any]) -> str:
    """A threshold record in one short line: `global 0.42`, or the per-class range."""
    values = [v for vs in (t.get("branches") or {"": t["values"]}).values() for v in vs]
    lo, hi = min(values), max(values)
    return f"{t['mode']} {lo:.2f}" if lo == hi else f"{t['mode']} {lo:.2f}-{hi:.2f}"


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.app import Limits, serve

    serve(args.run, host=args.host, port=args.port,
          limits=Limits(max_upload_mb=args.max_upload_mb, max_side=args.max_side,
                        max_batch=args.max_batch, timeout_s=args.timeout,
                        header_timeout_s=args.header_timeout, max_connections=args.max_connections))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import api

    path = api.report(args.run, args.out, csv_path=args.csv, images=args.images,
                      progress=_progress(args))
    print(f"report written to {path}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from . import api
    from .data.coco import COCO_NAMES

    r = api.check(args.csv, args.images, progress=_progress(args))
    print(f"{r.path}: {r.rows} rows ({'labelled' if r.labelled else 'unlabelled'})")
    if r.label_counts:
        print("rows per label: " + ", ".join(f"{i} {COCO_NAMES.get(i, '')}".rstrip() + f" {n}"
                                             for i, n in r.label_counts.items()))
    for title, errors in (("bad rows", r.bad_rows), ("missing images", r.missing_images),
                          ("corrupt images", r.corrupt_images)):
        print(f"{title}: {len(errors)}")
        for err in errors[:5]:
            print(f"  {err}")
        if len(errors) > 5:
            print(f"  ... and {len(errors) - 5} more")
    print(f"duplicate ImageIDs: {len(r.duplicate_ids)}"
          + (f" (e.g. {', '.join(list(r.duplicate_ids)[:5])})" if r.duplicate_ids else ""))
    if args.images is None:
        print("images: not checked (give --images DIR)")
    print("OK" if r.problems == 0 else f"{r.problems} problem(s) found")
    return 0 if r.problems == 0 else 1


def cmd_info(args: argparse.Namespace) -> int:
    from . import api

    data: dict[str, Any] = api.info(args.run)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    head = data["head"]
    print(f"run:            {data['run']}")
    print(f"head:           {head['name']} (hidden {head['hidden']}, inputs {head['dims']})")
    for modality, enc in data["encoders"].items():
        src = enc.get("source", {})
        print(f"{modality + ' encoder:':<16}{enc['name']}  weights sha256 {enc['weights_sha256'][:16]}…"
              + (f"  from {src.get('package')}/{src.get('file')} (sha256 {src.get('file_sha256', '')[:16]}…)"
                 if src else ""))
    labels = data["labels"]
    print(f"labels ({len(labels['ids'])}):    " +
          ", ".join(f"{i} {n}" for i, n in zip(labels["ids"], labels["names"])))
    thr = data["thresholds"]
    for name, values in (thr.get("branches") or {"": thr["values"]}).items():
        shown = f"{values[0]:.2f}" if len(set(values)) == 1 else str([round(v, 2) for v in values])
        print(f"thresholds:     {thr['mode']}{' ' + name if name else ''} {shown}")
    val = data.get("validation")
    if val:
        print(f"validation:     samples_f1={val['samples_f1']:.4f} micro_f1={val['micro_f1']:.4f} "
              f"macro_f1={val['macro_f1']:.4f} (n={val['n']})")
    print(f"model_size_mb:  {data['model_size_mb']}")
    return 0


def cmd_encoders(args: argparse.Namespace) -> int:
    from . import api

    print(f"{'encoder':<22}{'modality':<10}{'params':>9}  {'weights':<9}description")
    for e in api.available_encoders():
        params = f"{e.params_m:.1f}M" if e.params_m is not None else "-"
        print(f"{e.name:<22}{e.modality:<10}{params:>9}  {'present' if e.weights_present else 'missing':<9}"
              f"{e.description}")
    print("also: hf:PATH_OR_NAME (a local Hugging Face text model), timm:NAME (pip install "
          "'mmtag[timm]'), flip:IMAGE_ENCODER (flip test-time augmentation), concat:A+B (image "
          "encoders side by side)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .jobs.demo import run_demo

    result = run_demo(args.out, progress=_progress(args))
    print("mmtag demo — synthetic image+caption data; labels 10/13/15 are only in the image,")
    print("17/18/19 only in the caption. Holdout metrics:")
    print(f"{'model':<8}{'samples_f1':>12}{'micro_f1':>10}{'macro_f1':>10}")
    for name, m in result.metrics.items():
        print(f"{name:<8}{m.samples_f1:>12.4f}{m.micro_f1:>10.4f}{m.macro_f1:>10.4f}")
    print(f"runs:       {', '.join(str(p) for p in result.runs.values())}")
    print(f"submission: {result.submission}")
    print(f"data:       {result.out / 'data'}")
    return 0


def _add_split_options(p: argparse.ArgumentParser) -> None:
    """Options of the many-runs commands: the base config and the one split they all share."""
    p.add_argument("--config", type=Path, help="YAML config every run starts from")
    p.add_argument("--seed", type=int, help="random seed of the shared split (default 0)")
    p.add_argument("--val-frac", type=float, help="validation fraction (default 0.1)")
    p.add_argument("--folds", type=_folds, help="cross-fit every run with K folds and rank by "
                                                "out-of-fold figures; 1: the shared split "
                                                "(default auto: 5 folds, 1 with --finetune)")
    p.add_argument("--cache-dir", help="feature cache (default $MMTAG_CACHE or ~/.cache/mmtag)")


def _folds_of(args: argparse.Namespace) -> int | str | None:
    """--folds as given; asking for a --val-frac split without --folds means that split."""
    if args.folds is None and getattr(args, "val_frac", None) is not None:
        return 1
    return args.folds


def _folds(text: str) -> int | str:
    """--folds: `auto` or a whole number (its range is the config's to check and to say)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto or an integer, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (like every other mmtag error), not usage + error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _checked(convert: Callable[[str], Any], constraint: Constraint) -> Callable[[str], Any]:
    """An argparse type for a flag that is no config option (serve's limits): `convert`, then
    the range it must lie in, declared with config.py's constraints."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {convert.__name__} value: {text!r}") from None
        problem = constraint.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    return parse


def _variants(text: str) -> str:
    """`ablate --variants`: registered heads, all checked before the first variant trains."""
    for name in text.split(","):
        problem = FUSION_HEAD.problem(name.strip())
        if problem:
            raise argparse.ArgumentTypeError(problem)
    return text


def _add_device_options(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--device", default=default,
                   help="auto (default: CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", default=None,
                   help="mixed precision (fp16 autocast) on CUDA; no effect on CPU")


# Commands that run as ranks under torchrun; the others refuse a process group.
DISTRIBUTED = ("train", "evaluate", "predict")


def build_parser() -> argparse.ArgumentParser:
    # Subcommand parsers are made by the same class, so their errors are one line too.
    parser = _Parser(prog="mmtag", description="Multi-label tagging of image+caption pairs.")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", "-v", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a tagger on a labelled CSV")
    p.add_argument("train_csv", type=Path, nargs="?", help="labelled CSV (default: data.train_csv of --config)")
    p.add_argument("--images", type=Path, help="images folder (not needed for --modalities text)")
    p.add_argument("--out", type=Path, help="run directory to write (default runs/mmtag-DATE-TIME)")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue an interrupted run from its checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (it stays intact until the new one is complete)")
    p.add_argument("--tensorboard", action="store_true", help="also log epochs to RUN/tensorboard")
    p.add_argument("--config", type=Path, help="YAML config (e.g. RUN/config.yaml); flags override it")
    p.add_argument("--preset", help="start from a named preset: accurate, effnet-albert-union, "
                                    "effnet-berttiny-fm3")
    p.add_argument("--modalities", help="image, text or image,text (default)")
    p.add_argument("--fusion", help="fusion head when both modalities are used (default concat)")
    p.add_argument("--val-frac", type=float, help="validation fraction (default 0.1)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad rows instead of failing")
    p.add_argument("--image-encoder", help="image encoder (default efficientnet-lite0; timm:NAME with "
                                           "mmtag[timm])")
    p.add_argument("--text-encoder", help="text encoder (default minilm-l6; hf:PATH_OR_NAME for any "
                                          "local Hugging Face model)")
    p.add_argument("--random-init", action="store_true",
                   help="allow encoders without pretrained weights (random initialisation)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--patience", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--workers", type=int, help="image decoding workers (default 2)")
    p.add_argument("--optimizer", help="adam or adamw (default)")
    p.add_argument("--loss", help="bce (default), weighted-bce, asl or focal")
    p.add_argument("--decision", help="how scores become labels: global (one tuned threshold, the "
                                      "default), per-class, balanced, or gfm (each item's "
                                      "expected-F1-maximising label set; nothing tuned)")
    p.add_argument("--thresholds", help="the older spelling of --decision")
    p.add_argument("--oversample", action="store_true", help="repeat rows that carry rare labels")
    p.add_argument("--image-aug", help="image augmentation, e.g. crop,flip (default: on when the image "
                                       "encoder is fine-tuned or --aug-views is set); none to disable")
    p.add_argument("--text-aug", help="caption augmentation, e.g. synonyms:2 (WordNet synonyms)")
    p.add_argument("--aug-views", type=int, help="frozen encoders: cache K augmented views per "
                                                 "training item, draw one per epoch (default 0)")
    p.add_argument("--unlabeled", help="unlabelled CSV for pseudo-label self-training")
    p.add_argument("--extra-text", help="labelled captions without images (ImageID,Labels,Caption); "
                                        "the text branch learns from them too")
    p.add_argument("--folds", type=_folds,
                   help="cross-fitting: K > 1 trains a head per fold, chooses the epoch and the "
                        "decision on out-of-fold scores of every row, and averages the K heads; "
                        "1: a --val-frac split (default auto: 5, or 1 with --val, --val-frac, "
                        "--finetune or under 100 rows)")
    p.add_argument("--stack", action=argparse.BooleanOptionalAction, default=None,
                   help="late fusion (mean, gated) with --folds: per-label weights of the image and "
                        "text branches, fitted on their out-of-fold scores (default: on whenever "
                        "it can be)")
    p.add_argument("--val", type=Path, help="your own labelled validation CSV (images in --images): "
                                            "the epoch and thresholds are chosen on it, not on a "
                                            "--val-frac split of TRAIN_CSV")
    p.add_argument("--pseudo-rounds", type=int, help="pseudo-label rounds (default 0)")
    p.add_argument("--pseudo-confidence", type=float, help="score needed to trust a pseudo-label (0.9)")
    p.add_argument("--finetune", choices=["text", "image", "both"],
                   help="two-stage: fine-tune these encoders on the task first")
    p.add_argument("--unfreeze-blocks", type=int, help="image fine-tuning: last K blocks trained (2)")
    p.add_argument("--ft-epochs", type=int, help="fine-tuning epochs (4)")
    p.add_argument("--ft-lr", type=float, help="fine-tuning encoder learning rate (5e-5)")
    p.add_argument("--ft-head-lr", type=float, help="fine-tuning task-head learning rate (1e-3)")
    p.add_argument("--ft-batch-size", type=int, help="fine-tuning batch size (32)")
    p.add_argument("--ft-optimizer", help="fine-tuning optimizer: adam or adamw (default)")
    p.add_argument("--ft-top-layers", type=int,
                   help="text fine-tuning: train only the top N transformer layers, the lower "
                        "ones computed once per caption (default 0: the whole encoder)")
    p.add_argument("--cache-dir", help="feature cache (default $MMTAG_CACHE or ~/.cache/mmtag)")
    _add_device_options(p, default=None)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("ablate", help="train every fusion variant on one split and tabulate")
    p.add_argument("train_csv", type=Path)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", type=_variants, help="comma-separated (default: all)")
    p.add_argument("--extra-text", help="labelled captions without images, for text and late fusion")
    _add_split_options(p)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("sweep", help="train every combination of a hyper-parameter grid")
    p.add_argument("train_csv", type=Path)
    p.add_argument("--images", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--grid", help='e.g. "lr=1e-4,5e-4 batch=32,64 optimizer=adam,adamw"')
    p.add_argument("--grid-file", type=Path, help="YAML mapping axis -> list of values")
    _add_split_options(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("evaluate", help="metrics of a run on a labelled CSV")
    p.add_argument("run", type=Path)
    p.add_argument("csv", type=Path)
    p.add_argument("--images", type=Path)
    p.add_argument("--json", type=Path, help="also write the metrics as JSON")
    p.add_argument("--report", type=Path, help="also write an HTML report of this CSV")
    p.add_argument("--cache-dir", help="feature cache (default $MMTAG_CACHE or ~/.cache/mmtag)")
    _add_device_options(p, default="auto")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="write a submission CSV (ImageID,Labels)")
    p.add_argument("run", type=Path)
    p.add_argument("csv", type=Path)
    p.add_argument("--images", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cache-dir", help="feature cache (default $MMTAG_CACHE or ~/.cache/mmtag)")
    _add_device_options(p, default="auto")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="copy a run with its encoders exported for ONNX Runtime")
    p.add_argument("run", type=Path)
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--int8", action="store_true", help="quantise the text encoder to int8")
    p.add_argument("--retune", action="store_true",
                   help="re-tune the thresholds on the run's validation split as scored by the "
                        "export (default: keep the run's thresholds and decision rule)")
    p.add_argument("--out", type=Path, required=True, help="directory of the exported bundle")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="HTTP API + web page for a run (FastAPI)")
    p.add_argument("run", type=Path)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_checked(int, Interval(0, 65535, integer=True)), default=8000)
    p.add_argument("--max-upload-mb", type=_checked(float, POSITIVE), default=10.0,
                   help="request body limit (10)")
    p.add_argument("--max-side", type=_checked(int, AT_LEAST_1), default=8192,
                   help="image side limit in pixels (8192)")
    p.add_argument("--max-batch", type=_checked(int, AT_LEAST_1), default=64,
                   help="items per /predict/batch (64)")
    p.add_argument("--timeout", type=_checked(float, POSITIVE), default=60.0,
                   help="seconds per request (60)")
    p.add_argument("--header-timeout", type=_checked(float, POSITIVE), default=10.0,
                   help="seconds a connection has to send a request's headers, from connecting "
                        "or from its last answer (10)")
    p.add_argument("--max-connections", type=_checked(int, AT_LEAST_1), default=100,
                   help="open connections; past it the longest-idle one is closed (100)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("report", help="(re)write a run's HTML report")
    p.add_argument("run", type=Path)
    p.add_argument("--out", type=Path, help="HTML file (default RUN/report.html)")
    p.add_argument("--csv", type=Path, help="report on this labelled CSV instead of the validation split")
    p.add_argument("--images", type=Path)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("check", help="validate a dataset without training (exit 1 on problems)")
    p.add_argument("csv", type=Path)
    p.add_argument("--images", type=Path, help="also check every image exists and decodes")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("info", help="what a run holds")
    p.add_argument("run", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("encoders", help="list the encoders available here")
    p.set_defaults(func=cmd_encoders)

    p = sub.add_parser("demo", help="train and evaluate on a generated dataset")
    p.add_argument("--out", type=Path, default=Path("mmtag-demo"))
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(message)s", stream=sys.stderr)
    from . import dist

    try:
        if args.command in DISTRIBUTED:
            # train sets up again once its config (which may name a device) is resolved
            dist.setup(args.device or "auto", bool(args.amp))
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise MmtagError(f"'mmtag {args.command}' does not run under torchrun; "
                             f"only {', '.join(DISTRIBUTED)} do")
        # Under torchrun only rank 0 speaks; the others' results are the same.
        quiet = contextlib.nullcontext() if dist.context().is_main else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            return int(args.func(args))
    except MmtagError as exc:
        rank = dist.context()
        where = f" (rank {rank.rank})" if rank.distributed else ""
        print(f"mmtag: error{where}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno is None:
            raise
        # A full disk, a read-only or forbidden place: the OS's reason and the path, one line.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mmtag: error: {where}{exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("mmtag: interrupted" + (f"; {exc}" if str(exc) else ""), file=sys.stderr)
        return 130
    finally:
        dist.teardown()
