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
from .config import (AT_LEAST_1, AUDIT_FIX_MIN_SCORE, FUSION_HEAD, GROUP_BY, POSITIVE, Config,
                     Constraint, Interval, flags, read_yaml_mapping)
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
        **_config_values(args),
        "train.folds": _folds_of(args), "train.thresholds": _decision(args),
        "data.train_csv": str(args.train_csv) if args.train_csv else None,
        "data.images": str(args.images) if args.images else None,
    }, spelled={"train.thresholds": "--thresholds"} if args.thresholds and not args.decision else None)
    from . import api, dist  # torch: after the config is checked, so a bad option answers at once

    ctx = dist.setup(config.device, config.amp)
    # One directory for all ranks: rank 0's clock names it.
    out = args.out or dist.broadcast(Path("runs") / time.strftime("mmtag-%Y%m%d-%H%M%S"))
    print(f"run directory: {out}" + (f" ({ctx.world} processes)" if ctx.distributed else ""))
    try:
        _, report, manifest = api.train(args.train_csv, args.images, out, config,
                                        progress=_progress(args), tensorboard=args.tensorboard,
                                        overwrite=args.overwrite, audit=args.audit)
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
    from .decision.metrics import metric_title

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
    metric = decision.metric if decision is not None else "samples"
    if metric != "samples":
        print(f"optimised for: {metric_title(metric)} (--metric {metric})")
    if decision is not None and decision.chosen_from:
        print(f"decision: {decision.mode}, chosen by --decision auto ({metric_title(metric)} on "
              "validation rows each rule was not tuned on: " + ", ".join(
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
    config = config.override({**_config_values(args, SPLIT), "train.folds": _folds_of(args)})
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
    config = config.override({**_config_values(args, SPLIT), "train.folds": _folds_of(args)})
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
    extra = {k: v for k, v in (("proba", args.proba), ("top_k", args.top_k),
                               ("group_by", args.group_by)) if v is not None}
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
    for title, found in (("caption groups (one image, several captions: fine)", r.repeated.caption_groups),
                         ("copied rows (same image and caption)", r.repeated.copies),
                         ("conflicts (same image and caption, different labels)", r.repeated.conflicts)):
        if found:
            print(f"  {title}: {len(found)}, e.g. "
                  + "; ".join(f"{i} rows {', '.join(map(str, rows))}" for i, rows in list(found.items())[:3]))
    if args.images is None:
        print("images: not checked (give --images DIR)")
    print("OK" if r.problems == 0 else f"{r.problems} problem(s) found")
    return 0 if r.problems == 0 else 1


def cmd_audit(args: argparse.Namespace) -> int:
    from .jobs.audit import audit
    from .jobs.audit_findings import KINDS

    result = audit(args.csv, args.images, run=args.run, tests=args.test, out=args.out,
                   fix=args.fix, fix_min_score=args.fix_min_score, cache_dir=args.cache_dir,
                   progress=_progress(args))
    counts = result.counts()
    print(f"{args.csv}: {len(result.data)} rows, {len(result.issues)} suspected issues: "
          + ", ".join(f"{n} {k}" for k, n in counts.items() if n), file=sys.stderr)
    for kind in KINDS:
        for issue in [i for i in result.issues if i.kind == kind][:3]:
            print(f"  {kind}: row {issue.row} {issue.image_id}"
                  f"{' ' + issue.label if issue.label else ''} ({issue.evidence})", file=sys.stderr)
    print(f"issues written to {args.out / 'issues.csv'} and {args.out / 'audit.html'}")
    if args.fix is not None:
        print(f"corrected copy written to {args.fix} (changes: {args.out / 'changes.csv'})")
    return 0


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
# A config option's flag, help and default come from its field (`config.flags`). An option that
# takes a registered name lists the names, read from the registry itself (the single source)
# through `names=` only when that help is printed (`_Parser.format_help`), never to parse a
# command line.
def _preset_names() -> list[str]:
    from .presets import list_presets

    return [p.name for p in list_presets()]


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


def _dated_dir(kind: str) -> Path:
    """The default output directory of ablate and sweep, like train's: runs/KIND-DATE-TIME."""
    return Path("runs") / time.strftime(f"{kind}-%Y%m%d-%H%M%S")


# The CSV layout flags (train, evaluate, predict, check, report): each is the keyword of the
# API call and the option of the config's `data` section of the same name.
LAYOUT = ("image_col", "caption_col", "labels_col", "label_sep", "image_ext")


def _layout(args: argparse.Namespace) -> dict[str, str]:
    """The CSV layout flags given (only those: a call without them is the same as before)."""
    return {name: getattr(args, name) for name in LAYOUT if getattr(args, name) is not None}


# Every config option's flag (`config.flags`) is made from its field: `train` takes them all;
# the other commands take the ones they share with it, named by key.
LAYOUT_KEYS = tuple(f"data.{name}" for name in LAYOUT)
DEVICE = ("device", "amp")
SPLIT = ("train.seed", "data.val_frac", "train.folds", "cache_dir")  # ablate, sweep


def _add_config_flags(p: "_Parser", keys: typing.Iterable[str] | None = None, **helps: str) -> None:
    """The flags of config options `keys` (None: every one), as their fields declare them;
    `helps` rewords one for a command where it means more (dest=text: sweep's --folds)."""
    declared = flags()
    for key in declared if keys is None else keys:
        f = declared[key]
        kwargs: dict[str, Any] = {"help": helps.get(f.dest, f.help), "default": None}
        if f.kind == "switch":
            kwargs["action"] = "store_true"
        elif f.kind == "toggle":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(metavar=f.metavar, choices=f.choices,
                          type=_auto_or_int if f.kind == "auto-int" else f.kind)
        p.add_argument(f.name, names=f.names, **kwargs)


def _config_values(args: argparse.Namespace, keys: typing.Iterable[str] | None = None) -> dict[str, Any]:
    """The config overrides of the flags `keys` (None: every one) on this command line; a flag
    not given is None, which `Config.override` skips."""
    declared = flags()
    return {key: f.value(getattr(args, f.dest)) for key, f in declared.items()
            if keys is None or key in keys}


def _auto_or_int(text: str) -> int | str:
    """An `auto`-or-integer flag (--folds): its range is the config's to check and to say."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto or an integer, got {text!r}") from None


def _add_split_options(p: "_Parser") -> None:
    """Options of the many-runs commands: the base config and the folds (or one split) they all
    share."""
    p.add_argument("--config", type=Path, metavar="YAML",
                   help="config every run starts from (default: the built-in defaults)")
    _add_config_flags(p, SPLIT, folds="cross-fit every run with K folds and rank by out-of-fold "
                                      "figures; 1: the shared split (default: auto, 5 folds, 1 "
                                      "with --finetune)")


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
    p.add_argument("--audit", action="store_true",
                   help="also audit the training CSV from the run's out-of-fold scores into "
                        "RUN/audit/ (label errors, duplicates, outliers; see mmtag audit)")
    p.add_argument("--config", type=Path, metavar="YAML",
                   help="YAML config (e.g. RUN/config.yaml); flags override it")
    p.add_argument("--preset", names=_preset_names, metavar="NAME",
                   help="start from a named preset: {names} (default: none)")
    p.add_argument("--thresholds", metavar="RULE", help="the older spelling of --decision")
    _add_config_flags(p)
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
    _add_config_flags(p, (*LAYOUT_KEYS, "cache_dir", *DEVICE))
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
    p.add_argument("--group-by", metavar="COLUMN", choices=[GROUP_BY],
                   help=f"{GROUP_BY}: one answer per image, from the averaged scores of its rows "
                        "(an image listed with several captions); default: one per row")
    p.add_argument("--top-k", type=int, metavar="K",
                   help="at most K labels per row, the most probable (default: no cap)")
    _add_config_flags(p, (*LAYOUT_KEYS, "cache_dir", *DEVICE))
    p.set_defaults(func=cmd_predict)

    p = command("export", "copy a run with its encoders exported for ONNX Runtime",
                "mmtag export runs/fused --out runs/fused-onnx",
                "mmtag export runs/fused --out runs/fused-int8 --int8 --retune")
    p.add_argument("run", type=Path, help="a trained run directory (mmtag train --out)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="(default: onnx)")
    p.add_argument("--int8", action="store_true",
                   help="quantise the text encoder to int8 and store the image encoder's large "
                        "weights in fp16 (the head is stored in fp16 in every export)")
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
    _add_config_flags(p, LAYOUT_KEYS)
    p.set_defaults(func=cmd_report)

    p = command("check", "validate a dataset without training (exit 1 on problems)",
                "mmtag check train.csv",
                "mmtag check train.csv --images images/")
    p.add_argument("csv", type=Path, help="the CSV to check (labelled or not)")
    p.add_argument("--images", type=Path, metavar="DIR",
                   help="also check every image exists and decodes (default: not checked)")
    _add_config_flags(p, LAYOUT_KEYS)
    p.set_defaults(func=cmd_check)

    p = command("audit", "find label errors, duplicates, leaks and outliers in a training CSV",
                "mmtag audit train.csv --images images/ --run runs/fused --out audit/",
                "mmtag audit train.csv --images images/ --test test.csv --fix clean.csv")
    p.add_argument("csv", type=Path, help="the labelled training CSV to audit")
    p.add_argument("--images", type=Path, metavar="DIR",
                   help="images folder (without it, the audit reads the captions only)")
    p.add_argument("--run", type=Path, metavar="RUN",
                   help="a run cross-fitted on this CSV: its out-of-fold scores and cached "
                        "features are used (default: cross-fit the default model first)")
    p.add_argument("--test", type=Path, metavar="CSV", action="append", default=[],
                   help="a test or validation CSV to check for rows copied from training "
                        "(repeatable)")
    p.add_argument("--out", type=Path, metavar="DIR", default=Path("audit"),
                   help="where issues.csv and audit.html go (default: %(default)s)")
    p.add_argument("--fix", type=Path, metavar="CSV",
                   help="also write a corrected copy of the CSV (and DIR/changes.csv); the input "
                        "is never modified")
    p.add_argument("--fix-min-score", type=float, metavar="S", default=AUDIT_FIX_MIN_SCORE,
                   help="change a label only when its issue scores at least S (default: %(default)s)")
    _add_config_flags(p, ("cache_dir",))
    p.set_defaults(func=cmd_audit)

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
