"""Command line: parses options, calls `mmtag.api`, prints results. No logic of its own.

argparse (stdlib) rather than typer/click: no extra dependency, fast start-up, and `torchrun -m
mmtag` works unchanged. Start-up stays fast because nothing here imports torch until a command
runs: the library is imported inside the cmd_* functions, and the registry names that help texts
list are read only when that help is printed (`_Parser.format_help`).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import sys
import textwrap
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import registries
from .version import __version__
from .config import (AT_LEAST_1, FEATURE_RUNTIMES, FUSION_HEAD, MODALITIES, POSITIVE, Config, Constraint,
                     Interval, read_yaml_mapping)
from .errors import DataError, MmtagError

log = logging.getLogger("mmtag")


def _progress(args: argparse.Namespace) -> bool:
    # Whether to report progress at all; how (bars in a terminal, log lines elsewhere, rank 0
    # only) is `mmtag.progress`'s one policy, the Python API's too.
    return not args.quiet


def _report_skipped(skipped: list[DataError]) -> None:
    if not skipped:
        return
    print(f"skipped {len(skipped)} bad row(s) (--skip-bad):", file=sys.stderr)
    for err in skipped[:5]:
        print(f"  {err}", file=sys.stderr)
    if len(skipped) > 5:
        print(f"  ... and {len(skipped) - 5} more", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        from . import api, dist

        dist.setup(args.device or "auto", bool(args.amp))
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
    if args.preset:
        from .presets import load_preset
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
        "data.label_names": args.label_names,
        "augment.image": args.image_aug, "augment.text": args.text_aug, "augment.views": args.aug_views,
        "pseudo.rounds": args.pseudo_rounds,
        "pseudo.confidence": args.pseudo_confidence,
        "finetune.modalities": (["image", "text"] if args.finetune == "both" else args.finetune),
        "finetune.unfreeze_blocks": args.unfreeze_blocks, "finetune.epochs": args.ft_epochs,
        "finetune.lr": args.ft_lr, "finetune.head_lr": args.ft_head_lr,
        "finetune.batch_size": args.ft_batch_size, "finetune.optimizer": args.ft_optimizer,
        "finetune.top_layers": args.ft_top_layers,
        "cache_dir": args.cache_dir, "device": args.device, "amp": args.amp,
        "feature_runtime": args.feature_runtime,
        "data.train_csv": str(args.train_csv) if args.train_csv else None,
        "data.images": str(args.images) if args.images else None,
        **{f"data.{name}": value for name, value in _layout(args).items()},
    })
    from . import api, dist  # torch: after the config is checked, so a bad option answers at once

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


def _interrupted(run: Path) -> KeyboardInterrupt:
    """Ctrl-C in training: the interrupt, carrying the command that continues the run (when
    there is one to continue); `main` prints it."""
    from .model import rundir

    return KeyboardInterrupt(f"to continue: {rundir.resume_command(run)}" if rundir.resumable(run) else "")


def _print_trained(out: Path, report: Any, manifest: dict[str, Any]) -> int:
    from .decision import mean_and_std

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
        mean, std = mean_and_std(f1)
        print(f"per fold: samples_f1 {mean:.4f} ± {std:.4f} over {len(f1)} folds")
    else:
        print(f"trained {manifest['head']['name']} on {report.n_train} rows, validated on {report.n_val} "
              f"(best epoch {report.best_epoch})")
        if m is not None:
            print(f"validation: {m.headline()}")
    decision = report.decision
    if decision is not None and decision.chosen_from:
        print(f"decision: {decision.mode}, chosen by --decision auto (sample-F1 on validation "
              "rows each rule was not tuned on: " + ", ".join(
                  f"{rule} {f1:.4f}" for rule, f1 in decision.chosen_from.items()) + ")")
    elif decision is not None:
        print(f"decision: {decision.mode}")
    for r in report.pseudo_rounds:
        print(f"pseudo-label round {r.round}: {r.n_pseudo} pseudo-labelled rows, "
              f"val samples_f1={r.val_samples_f1:.4f}")
    print(f"model_size_mb: {manifest['model_size_mb']}")
    print(f"run saved to {out}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from .jobs.ablate import run_ablation

    config = Config.from_yaml(args.config) if args.config else Config()
    config = config.override({"train.seed": args.seed, "data.val_frac": args.val_frac,
                              "train.folds": _folds_of(args), "cache_dir": args.cache_dir})
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    out = args.out or _dated_dir("ablate")
    print(f"ablation directory: {out}")
    run_ablation(args.train_csv, args.images, out, config, variants,
                 extra_text=args.extra_text, progress=_progress(args))
    print((out / "ablation.md").read_text(encoding="utf-8"), end="")
    print(f"tables written to {out / 'ablation.csv'} and {out / 'ablation.md'}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .jobs.sweep import best_row, load_grid_file, parse_grid, run_sweep

    if bool(args.grid) == bool(args.grid_file):
        raise MmtagError("give exactly one of --grid \"lr=1e-4,5e-4 batch-size=32,64\" or --grid-file FILE")
    grid = parse_grid(args.grid) if args.grid else load_grid_file(args.grid_file)
    config = Config.from_yaml(args.config) if args.config else Config()
    config = config.override({"train.seed": args.seed, "data.val_frac": args.val_frac,
                              "train.folds": _folds_of(args), "cache_dir": args.cache_dir})
    out = args.out or _dated_dir("sweep")
    print(f"sweep directory: {out} (give it as --out to resume the sweep if it stops)")
    rows = run_sweep(args.train_csv, args.images, out, config, grid, progress=_progress(args))
    print((out / "sweep.md").read_text(encoding="utf-8"), end="")
    print(f"tables: {out / 'sweep.csv'}, {out / 'sweep.md'}; plot: {out / 'sweep.png'}")
    print(f"best run (a bundle for mmtag predict): {best_row(rows).run}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import api, dist

    layout = _layout(args)
    metrics = api.evaluate(args.run, args.csv, args.images, progress=_progress(args),
                           cache_dir=args.cache_dir, **layout)
    # `--json` alone (or `--json -`): stdout carries the JSON only, so it can be piped
    if args.json != STDOUT:
        print(metrics.table())
    if not dist.context().is_main:
        return 0  # under torchrun, rank 0 writes the files
    if args.json:
        _write_json(metrics.to_dict(), args.json, "metrics")
    if args.report:
        api.report(args.run, args.report, csv_path=args.csv, images=args.images, progress=False,
                   **layout)
        print(f"report written to {args.report}", file=sys.stderr if args.json == STDOUT else sys.stdout)
    return 0


# `--json` without a FILE (or with `-`): the JSON goes to stdout
STDOUT = "-"


def _write_json(data: Any, dest: str, what: str) -> None:
    """`--json [FILE]`: `data` as indented JSON to stdout, or written atomically to FILE."""
    from .io import atomic_write_text

    text = json.dumps(data, indent=2) + "\n"
    if dest == STDOUT:
        sys.stdout.write(text)
    else:
        atomic_write_text(dest, text)
        print(f"{what} written to {dest}")


def cmd_predict(args: argparse.Namespace) -> int:
    from . import api

    # the new output options reach the API only when given, so the call is today's otherwise
    extra = {k: v for k, v in (("proba", args.proba), ("top_k", args.top_k)) if v is not None}
    preds = api.predict(args.run, args.csv, args.images, args.out, progress=_progress(args),
                        cache_dir=args.cache_dir, **_layout(args), **extra)
    print(f"wrote {len(preds.labels)} predictions to {args.out}")
    if args.proba is not None:
        print(f"label probabilities written to {args.proba}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import api
    from .io import load_json

    manifest = api.export(args.run, args.out, format=args.format, int8=args.int8,
                          retune=args.retune)
    print(f"exported {args.run} -> {args.out} ({args.format}{', int8 text encoder' if args.int8 else ''}), "
          f"model_size_mb {manifest['model_size_mb']}")
    exported = load_json(Path(args.out) / "metrics.json")["export"]
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
                      progress=_progress(args), **_layout(args))
    print(f"report written to {path}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .data import display_name
    from .jobs.check import check  # not via api: checking a CSV loads no torch

    r = check(args.csv, args.images, progress=_progress(args), **_layout(args))
    print(f"{r.path}: {r.rows} rows ({'labelled' if r.labelled else 'unlabelled'})")
    if r.label_counts:
        print("rows per label: " + ", ".join(
            f"{display_name(str(i))} {n}"
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
    from .jobs.info import info_rows

    if args.run is None:
        # `mmtag info --json RUN`, the older order: --json took RUN as its FILE
        if args.json in (None, STDOUT):
            raise MmtagError("give the run directory: mmtag info RUN [--json [FILE]]")
        args.run, args.json = Path(args.json), STDOUT
    data: dict[str, Any] = api.info(args.run)
    if args.json:
        _write_json(data, args.json, "run information")
        return 0
    rows = info_rows(data)
    width = max(len(name) for name, _ in rows) + 2
    columns = max(60, shutil.get_terminal_size().columns - 1)
    for name, text in rows:
        # Long values (80 labels, many settings) wrap under their own column, after a comma
        # only, so that "19 horse" or "micro F1 0.63" stay on one line.
        glued = text.replace(" ", "\xa0").replace(",\xa0", ", ") if ", " in text else text
        print(textwrap.fill(glued, width=columns, initial_indent=f"{name:<{width}}",
                            subsequent_indent=" " * width, break_on_hyphens=False,
                            break_long_words=False).replace("\xa0", " "))
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
    print("next, try:")
    for step in result.next_steps():
        print(f"  {step}")
    return 0


# ------------------------------------------------------------------------------------ parser
# Every option's help says its default, read from the config's own defaults (config.py is
# torch-free). An option that takes a registered name lists the names, read from the registry
# itself (the single source) through `names=`: the registries import torch, so they are read
# only when that help is printed (`_Parser.format_help`), never to parse a command line.
_DEFAULTS = Config()


def _default(dotted: str) -> str:
    """The config's default of option `dotted` (`train.lr`) as help text shows it."""
    value: Any = _DEFAULTS
    for part in dotted.split("."):
        value = getattr(value, part)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value) if value != "" else "none"


def _encoder_names(modality: str) -> Callable[[], list[str]]:
    return lambda: registries.encoder_names(modality)


def _preset_names() -> list[str]:
    from .presets import list_presets

    return [p.name for p in list_presets()]


def _augment_ops(kind: str) -> Callable[[], list[str]]:
    def names() -> list[str]:
        from .data import augment

        return list(augment.IMAGE_OPS) if kind == "image" else [f"{op}:N" for op in augment.TEXT_OPS]
    return names


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (like every other mmtag error), not usage +
    error; help texts laid out as written (epilog examples); and `names=` on `add_argument`: a
    function whose names replace `{names}` in the help text when the help is printed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        self._named: list[tuple[argparse.Action, Callable[[], list[str]]]] = []
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, names: Callable[[], list[str]] | None = None,
                     **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if names is not None:
            self._named.append((action, names))
        return action

    def format_help(self) -> str:
        for action, names in self._named:
            action.help = (action.help or "").replace("{names}", ", ".join(names()))
        self._named = []
        return super().format_help()

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _verbosity(default: Any) -> argparse.ArgumentParser:
    """-q/-v, given to `mmtag` and to every subcommand, so they may come before or after the
    command's name. The subcommands' defaults are SUPPRESS: not giving the flag there must not
    reset what was given before the command's name."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--quiet", "-q", action="store_true", default=default,
                   help="no progress output")
    p.add_argument("--verbose", "-v", action="store_true", default=default,
                   help="log more (what each step does, on stderr)")
    return p


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


def _dated_dir(kind: str) -> Path:
    """The default output directory of ablate and sweep, like train's: runs/KIND-DATE-TIME."""
    return Path("runs") / time.strftime(f"{kind}-%Y%m%d-%H%M%S")


# The CSV layout flags (train, evaluate, predict, check, report): each is the keyword of the
# API call and the option of the config's `data` section of the same name.
LAYOUT = ("image_col", "caption_col", "labels_col", "label_sep", "image_ext")


def _layout(args: argparse.Namespace) -> dict[str, str]:
    """The CSV layout flags given (only those: a call without them is the same as before)."""
    return {name: getattr(args, name) for name in LAYOUT if getattr(args, name) is not None}


def _add_layout_options(p: argparse.ArgumentParser) -> None:
    """For CSVs not written as ImageID,Labels,Caption with space-separated labels."""
    p.add_argument("--image-col", metavar="NAME", help="column of the image ids (default: ImageID)")
    p.add_argument("--caption-col", metavar="NAME", help="column of the captions (default: Caption)")
    p.add_argument("--labels-col", metavar="NAME", help="column of the labels (default: Labels)")
    p.add_argument("--label-sep", metavar="SEP",
                   help="what separates the labels in that column (default: a space)")
    p.add_argument("--image-ext", metavar="EXT",
                   help="file extension of the images when the ids carry none, e.g. .jpg "
                        "(default: none, the ids are file names)")


def _add_cache_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", metavar="DIR",
                   help="feature cache (default: $MMTAG_CACHE or ~/.cache/mmtag)")


def _add_split_options(p: argparse.ArgumentParser) -> None:
    """Options of the many-runs commands: the base config and the folds (or one split) they all
    share."""
    p.add_argument("--config", type=Path, metavar="YAML",
                   help="config every run starts from (default: the built-in defaults)")
    p.add_argument("--seed", type=int, metavar="N",
                   help="random seed of the shared folds or split "
                        f"(default: {_default('train.seed')})")
    p.add_argument("--val-frac", type=float, metavar="F",
                   help=f"validation fraction of the shared split (default: {_default('data.val_frac')}; "
                        "implies --folds 1)")
    p.add_argument("--folds", type=_folds, metavar="K",
                   help="cross-fit every run with K folds and rank by out-of-fold figures; 1: the "
                        "shared split (default: auto, 5 folds, 1 with --finetune)")
    _add_cache_option(p)


def _add_device_options(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--device", default=default,
                   help=f"auto, cpu, cuda or cuda:N (default: {_default('device')}, CUDA if available)")
    p.add_argument("--amp", action="store_true", default=None,
                   help="mixed precision (fp16 autocast) on CUDA; no effect on CPU (default: off)")


def _json_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", nargs="?", const=STDOUT, metavar="FILE",
                   help=f"{what} as JSON: to FILE, or to stdout (alone, without the table) when "
                        "no FILE or - is given")


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


# Commands that run as ranks under torchrun; the others refuse a process group.
DISTRIBUTED = ("train", "evaluate", "predict")


def build_parser() -> argparse.ArgumentParser:
    # Subcommand parsers are made by the same class, so their errors are one line too.
    parser = _Parser(prog="mmtag", description="Multi-label tagging of image+caption pairs.",
                     parents=[_verbosity(False)],
                     epilog=_examples("mmtag demo",
                                      "mmtag train train.csv --images images/ --out runs/first",
                                      "mmtag predict runs/first test.csv --images images/",
                                      "mmtag COMMAND --help    (every option of COMMAND)"))
    parser.add_argument("--version", action="version", version=f"mmtag {__version__}",
                        help="print mmtag's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_verbosity(argparse.SUPPRESS)]

    def command(name: str, help: str, *examples: str) -> _Parser:
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                              parents=common, epilog=_examples(*examples) if examples else None)

    p = command("train", "train a tagger on a labelled CSV",
                "mmtag train train.csv --images images/ --out runs/fused",
                "mmtag train train.csv --modalities text --epochs 30 --out runs/text",
                "mmtag train --preset fast train.csv --images images/",
                "mmtag train --resume runs/fused    (after an interruption)")
    p.add_argument("train_csv", type=Path, nargs="?",
                   help="labelled CSV (default: data.train_csv of --config)")
    p.add_argument("--images", type=Path, metavar="DIR",
                   help="images folder (not needed for --modalities text)")
    p.add_argument("--out", type=Path, metavar="RUN",
                   help="run directory to write (default: runs/mmtag-DATE-TIME)")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue an interrupted run from its checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (it stays intact until the new one is complete)")
    p.add_argument("--tensorboard", action="store_true", help="also log epochs to RUN/tensorboard")
    p.add_argument("--config", type=Path, metavar="YAML",
                   help="YAML config (e.g. RUN/config.yaml); flags override it")
    p.add_argument("--preset", names=_preset_names, metavar="NAME",
                   help="start from a named preset: {names} (default: none)")
    p.add_argument("--modalities", metavar="LIST",
                   help=f"comma-separated, from {', '.join(MODALITIES)} "
                        f"(default: {_default('model.modalities')})")
    p.add_argument("--fusion", metavar="HEAD", names=registries.lister("fusion head"),
                   help="fusion head when both modalities are used: {names} "
                        f"(default: {_default('model.fusion')})")
    p.add_argument("--val-frac", type=float, metavar="F",
                   help=f"validation fraction (default: {_default('data.val_frac')}; implies --folds 1)")
    p.add_argument("--seed", type=int, metavar="N", help=f"random seed (default: {_default('train.seed')})")
    p.add_argument("--skip-bad", action="store_true", help="skip bad rows instead of failing")
    p.add_argument("--image-encoder", metavar="NAME", names=_encoder_names("image"),
                   help="image encoder: {names} "
                        f"(default: {_default('model.image_encoder')}; timm: needs mmtag[timm])")
    p.add_argument("--text-encoder", metavar="NAME", names=_encoder_names("text"),
                   help="text encoder: {names}, hf: being any local Hugging Face model "
                        f"(default: {_default('model.text_encoder')})")
    p.add_argument("--random-init", action="store_true",
                   help="allow encoders without pretrained weights (random initialisation)")
    p.add_argument("--epochs", type=int, metavar="N", help=f"most epochs of head training (default: {_default('train.epochs')})")
    p.add_argument("--patience", type=int, metavar="N",
                   help="epochs without a better validation samples F1 before stopping "
                        f"(default: {_default('train.patience')})")
    p.add_argument("--lr", type=float, metavar="F", help=f"learning rate (default: {_default('train.lr')})")
    p.add_argument("--batch-size", type=int, metavar="N", help=f"batch size (default: {_default('train.batch_size')})")
    p.add_argument("--hidden", type=int, metavar="N",
                   help=f"hidden width of the head's classifier (default: {_default('model.hidden')})")
    p.add_argument("--workers", type=int, metavar="N",
                   help=f"image decoding workers (default: {_default('data.workers')})")
    p.add_argument("--feature-runtime", choices=FEATURE_RUNTIMES,
                   help="what computes the frozen encoders' features: onnx (ONNX Runtime, traced "
                        "once into the cache; ~4x faster for images on a CPU), torch, or auto (onnx "
                        f"on a CPU when it repays the tracing) (default: {_default('feature_runtime')})")
    p.add_argument("--optimizer", metavar="NAME", names=registries.lister("optimizer"),
                   help=f"{{names}} (default: {_default('train.optimizer')})")
    p.add_argument("--loss", metavar="NAME", names=registries.lister("loss"),
                   help=f"{{names}} (default: {_default('train.loss')})")
    p.add_argument("--decision", metavar="RULE", names=registries.lister("threshold mode"),
                   help="how scores become labels: {names} "
                        f"(default: {_default('train.thresholds')}). global: one tuned threshold; "
                        "per-class: one per label; balanced: per label, where false positives and "
                        "false negatives balance; gfm: each item's expected-F1-maximising label set, "
                        "nothing tuned; auto: of global, per-class and gfm, the one that scores best "
                        "on validation rows it was not tuned on (global unless another clearly wins on "
                        "enough rows)")
    p.add_argument("--thresholds", metavar="RULE", help="the older spelling of --decision")
    p.add_argument("--oversample", action="store_true", help="repeat rows that carry rare labels")
    p.add_argument("--image-aug", metavar="OPS", names=_augment_ops("image"),
                   help="image augmentation, comma-separated from {names}, or none "
                        f"(default: {_default('augment.image')}: crop,flip when the image encoder "
                        "is fine-tuned or --aug-views is set)")
    p.add_argument("--text-aug", metavar="OP", names=_augment_ops("text"),
                   help="caption augmentation: {names} (WordNet synonyms of N words; "
                        f"default: {_default('augment.text')})")
    p.add_argument("--aug-views", type=int, metavar="K",
                   help="frozen encoders: cache K augmented views per training item, draw one "
                        f"per epoch (default: {_default('augment.views')})")
    p.add_argument("--unlabeled", metavar="CSV", help="unlabelled CSV for pseudo-label self-training")
    p.add_argument("--extra-text", metavar="CSV",
                   help="labelled captions without images (ImageID,Labels,Caption); "
                        "the text branch learns from them too")
    p.add_argument("--folds", type=_folds, metavar="K",
                   help="cross-fitting: K > 1 trains a head per fold, chooses the epoch and the "
                        "decision on out-of-fold scores of every row, and averages the K heads; "
                        f"1: a --val-frac split (default: {_default('train.folds')}: 5, or 1 with "
                        "--val, --val-frac, --finetune or under 100 rows)")
    p.add_argument("--stack", action=argparse.BooleanOptionalAction, default=None,
                   help="late fusion (mean, gated) with --folds: per-label weights of the image and "
                        "text branches, fitted on their out-of-fold scores (default: "
                        f"{_default('train.stack')}, on whenever it can be)")
    p.add_argument("--val", type=Path, metavar="CSV",
                   help="your own labelled validation CSV (images in --images): the epoch and "
                        "thresholds are chosen on it, not on a --val-frac split of TRAIN_CSV")
    p.add_argument("--pseudo-rounds", type=int, metavar="N",
                   help=f"pseudo-label rounds (default: {_default('pseudo.rounds')})")
    p.add_argument("--pseudo-confidence", type=float, metavar="F",
                   help=f"score needed to trust a pseudo-label (default: {_default('pseudo.confidence')})")
    p.add_argument("--finetune", choices=["text", "image", "both"],
                   help="two-stage: fine-tune these encoders on the task first (default: none)")
    p.add_argument("--unfreeze-blocks", type=int, metavar="K",
                   help="image fine-tuning: last K blocks trained "
                        f"(default: {_default('finetune.unfreeze_blocks')})")
    p.add_argument("--ft-epochs", type=int, metavar="N",
                   help=f"fine-tuning epochs (default: {_default('finetune.epochs')})")
    p.add_argument("--ft-lr", type=float, metavar="F",
                   help=f"fine-tuning encoder learning rate (default: {_default('finetune.lr')})")
    p.add_argument("--ft-head-lr", type=float, metavar="F",
                   help=f"fine-tuning task-head learning rate (default: {_default('finetune.head_lr')})")
    p.add_argument("--ft-batch-size", type=int, metavar="N",
                   help=f"fine-tuning batch size (default: {_default('finetune.batch_size')})")
    p.add_argument("--ft-optimizer", metavar="NAME", names=registries.lister("optimizer"),
                   help=f"fine-tuning optimizer: {{names}} (default: {_default('finetune.optimizer')})")
    p.add_argument("--ft-top-layers", type=int, metavar="N",
                   help="text fine-tuning: train only the top N transformer layers, the lower "
                        "ones computed once per caption "
                        f"(default: {_default('finetune.top_layers')}, the whole encoder)")
    p.add_argument("--label-names", metavar="coco|FILE",
                   help="names to show integer labels by: coco (the COCO category names) or a CSV "
                        "file of id,name rows (default: none, each label shown as itself)")
    _add_layout_options(p)
    _add_cache_option(p)
    _add_device_options(p, default=None)
    p.set_defaults(func=cmd_train)

    p = command("ablate", "train every fusion variant on the same folds and tabulate",
                "mmtag ablate train.csv --images images/",
                "mmtag ablate train.csv --images images/ --variants text,concat,mean --out runs/ab")
    p.add_argument("train_csv", type=Path, help="labelled CSV (ImageID,Labels,Caption)")
    p.add_argument("--images", type=Path, metavar="DIR", required=True, help="images folder")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="directory of the runs and tables (default: runs/ablate-DATE-TIME)")
    p.add_argument("--variants", type=_variants, metavar="HEADS", names=registries.lister("fusion head"),
                   help="comma-separated, from {names} (default: all)")
    p.add_argument("--extra-text", metavar="CSV",
                   help="labelled captions without images, for text and late fusion")
    _add_split_options(p)
    p.set_defaults(func=cmd_ablate)

    p = command("sweep", "train every combination of a hyper-parameter grid on the same folds",
                'mmtag sweep train.csv --images images/ --grid "lr=1e-4,5e-4 batch-size=32,64"',
                "mmtag sweep train.csv --grid-file grid.yaml --out runs/sweep-lr   "
                "(the same --out resumes it)")
    p.add_argument("train_csv", type=Path, help="labelled CSV (ImageID,Labels,Caption)")
    p.add_argument("--images", type=Path, metavar="DIR",
                   help="images folder (not needed when every combination is text-only)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="directory of the runs and tables (default: runs/sweep-DATE-TIME; give an "
                        "interrupted sweep's directory to resume it)")
    p.add_argument("--grid", metavar="SPEC",
                   help='axes separated by spaces, values by commas, e.g. "lr=1e-4,5e-4 '
                        'batch-size=32,64 optimizer=adam,adamw"; an axis is a flag name of '
                        "mmtag train or a dotted config key (train.weight_decay)")
    p.add_argument("--grid-file", type=Path, metavar="YAML", help="YAML mapping axis -> list of values")
    _add_split_options(p)
    p.set_defaults(func=cmd_sweep)

    p = command("evaluate", "metrics of a run on a labelled CSV",
                "mmtag evaluate runs/fused holdout.csv --images images/",
                "mmtag evaluate runs/fused holdout.csv --images images/ --json metrics.json",
                "mmtag evaluate runs/fused holdout.csv --images images/ --json | jq .samples_f1")
    p.add_argument("run", type=Path, help="a trained run directory (mmtag train --out)")
    p.add_argument("csv", type=Path, help="labelled CSV (ImageID,Labels,Caption)")
    p.add_argument("--images", type=Path, metavar="DIR",
                   help="images folder (not needed for a text-only run)")
    _json_option(p, "also the metrics")
    p.add_argument("--report", type=Path, metavar="HTML", help="also write an HTML report of this CSV")
    _add_layout_options(p)
    _add_cache_option(p)
    _add_device_options(p, default="auto")
    p.set_defaults(func=cmd_evaluate)

    p = command("predict", "write a submission CSV (ImageID,Labels)",
                "mmtag predict runs/fused test.csv --images images/",
                "mmtag predict runs/fused test.csv --images images/ --out sub.csv "
                "--proba probs.csv --top-k 3")
    p.add_argument("run", type=Path, help="a trained run directory (mmtag train --out)")
    p.add_argument("csv", type=Path, help="CSV of the rows to tag (ImageID and Caption columns)")
    p.add_argument("--images", type=Path, metavar="DIR",
                   help="images folder (not needed for a text-only run)")
    p.add_argument("--out", type=Path, metavar="CSV", default=Path("submission.csv"),
                   help="submission to write (default: submission.csv in the current directory, "
                        "replaced if it exists)")
    p.add_argument("--proba", type=Path, metavar="CSV",
                   help="also write every label's probability for each row (default: not written)")
    p.add_argument("--top-k", type=int, metavar="K",
                   help="at most K labels per row, the most probable (default: no cap)")
    _add_layout_options(p)
    _add_cache_option(p)
    _add_device_options(p, default="auto")
    p.set_defaults(func=cmd_predict)

    p = command("export", "copy a run with its encoders exported for ONNX Runtime",
                "mmtag export runs/fused --out runs/fused-onnx",
                "mmtag export runs/fused --out runs/fused-int8 --int8 --retune")
    p.add_argument("run", type=Path, help="a trained run directory (mmtag train --out)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="(default: onnx)")
    p.add_argument("--int8", action="store_true", help="quantise the text encoder to int8")
    p.add_argument("--retune", action="store_true",
                   help="re-tune the thresholds on the run's validation split as scored by the "
                        "export (default: keep the run's thresholds and decision rule)")
    p.add_argument("--out", type=Path, metavar="DIR", required=True,
                   help="directory of the exported bundle")
    p.set_defaults(func=cmd_export)

    p = command("serve", "HTTP API + web page for a run (FastAPI)",
                "mmtag serve runs/fused    (then open http://127.0.0.1:8000)",
                "mmtag serve runs/fused --host 0.0.0.0 --port 8080 --max-batch 16")
    p.add_argument("run", type=Path, help="a trained run directory (mmtag train --out)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=_checked(int, Interval(0, 65535, integer=True)), default=8000,
                   help="(default: %(default)s)")
    p.add_argument("--max-upload-mb", type=_checked(float, POSITIVE), default=10.0,
                   help="request body limit (default: %(default)s)")
    p.add_argument("--max-side", type=_checked(int, AT_LEAST_1), default=8192,
                   help="image side limit in pixels (default: %(default)s)")
    p.add_argument("--max-batch", type=_checked(int, AT_LEAST_1), default=64,
                   help="items per /predict/batch (default: %(default)s)")
    p.add_argument("--timeout", type=_checked(float, POSITIVE), default=60.0,
                   help="seconds per request (default: %(default)s)")
    p.add_argument("--header-timeout", type=_checked(float, POSITIVE), default=10.0,
                   help="seconds a connection has to send a request's headers, from connecting "
                        "or from its last answer (default: %(default)s)")
    p.add_argument("--max-connections", type=_checked(int, AT_LEAST_1), default=100,
                   help="open connections; past it the longest-idle one is closed (default: %(default)s)")
    p.set_defaults(func=cmd_serve)

    p = command("report", "(re)write a run's HTML report",
                "mmtag report runs/fused",
                "mmtag report runs/fused --csv holdout.csv --images images/ --out holdout.html")
    p.add_argument("run", type=Path, help="a trained run directory (mmtag train --out)")
    p.add_argument("--out", type=Path, metavar="HTML", help="HTML file (default: RUN/report.html)")
    p.add_argument("--csv", type=Path,
                   help="report on this labelled CSV (default: the run's validation split)")
    p.add_argument("--images", type=Path, metavar="DIR", help="images folder of --csv")
    _add_layout_options(p)
    p.set_defaults(func=cmd_report)

    p = command("check", "validate a dataset without training (exit 1 on problems)",
                "mmtag check train.csv",
                "mmtag check train.csv --images images/")
    p.add_argument("csv", type=Path, help="the CSV to check (labelled or not)")
    p.add_argument("--images", type=Path, metavar="DIR",
                   help="also check every image exists and decodes (default: not checked)")
    _add_layout_options(p)
    p.set_defaults(func=cmd_check)

    p = command("info", "what a run holds",
                "mmtag info runs/fused",
                "mmtag info runs/fused --json | jq .labels")
    # optional only so that the older `mmtag info --json RUN` still works (see cmd_info)
    p.add_argument("run", type=Path, nargs="?", help="a trained run directory (mmtag train --out)")
    _json_option(p, "the whole record (config, labels, thresholds, encoders, metrics)")
    p.set_defaults(func=cmd_info)

    p = command("encoders", "list the encoders available here", "mmtag encoders")
    p.set_defaults(func=cmd_encoders)

    p = command("demo", "train and evaluate on a generated dataset",
                "mmtag demo", "mmtag demo --out /tmp/mmtag-demo -v")
    p.add_argument("--out", type=Path, metavar="DIR", default=Path("mmtag-demo"),
                   help="where the data, runs and submission go (default: %(default)s)")
    p.set_defaults(func=cmd_demo)
    return parser


def _read_yaml_inputs(args: argparse.Namespace) -> None:
    """Read the --config and --grid-file a command was given before torch is imported (seconds):
    a file too large, with YAML aliases (`io.load_yaml`) or not YAML is refused at once."""
    for attr, what in (("config", "config file"), ("grid_file", "grid file")):
        path = getattr(args, attr, None)
        if path:
            read_yaml_mapping(path, what)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(message)s", stream=sys.stderr)
    try:
        _read_yaml_inputs(args)
    except MmtagError as exc:
        print(f"mmtag: error: {exc}", file=sys.stderr)
        return 2
    # torchrun's rank and world size, as dist.setup reads them (read here without loading torch)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        if args.command in DISTRIBUTED and args.command != "train":
            from . import dist  # torch

            dist.setup(args.device or "auto", bool(args.amp))
        elif args.command not in DISTRIBUTED and world > 1:
            raise MmtagError(f"'mmtag {args.command}' does not run under torchrun; "
                             f"only {', '.join(DISTRIBUTED)} do")
        # train sets up once its config (which may name a device) is checked, so a bad option
        # is answered before torch loads. Under torchrun only rank 0 speaks (the others' results
        # are the same).
        quiet = contextlib.nullcontext() if rank == 0 else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            code = int(args.func(args))
            sys.stdout.flush()  # a reader gone early (`| head -1`) shows here, where it is handled
        return code
    except BrokenPipeError:
        # Python's recipe (the `signal` docs): stdout onto devnull, so the interpreter's own
        # flush at exit does not fail again, and the exit status a shell gives a process whose
        # reader went away (128 + SIGPIPE). No message: nobody is reading.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except MmtagError as exc:
        where = f" (rank {rank})" if world > 1 else ""
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
        dist = sys.modules.get(f"{__package__}.dist")  # loaded (with torch) only if it was used
        if dist is not None:
            dist.teardown()
