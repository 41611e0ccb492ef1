"""`mmtag sweep`: train every combination of a hyper-parameter grid on the same seeded folds.

    grid = parse_grid("lr=1e-4,5e-4 batch=32,64 optimizer=adam,adamw")
    rows = run_sweep("train.csv", "images/", "sweeps/lr", base_config, grid)
    best_row(rows).run   # a normal run bundle: `mmtag predict --run <it>`

Each combination is `base.override(...)` trained into `OUT/runs/<slug>` on the same seeded folds
and ranked by out-of-fold figures of the base's metric (`train.metric`, `--metric`: sample-F1
unless told), or with `folds` 1 on the same validation split (seed and
val_frac of `base`, whatever the axes say), like `mmtag ablate`; encoder features
come from the shared cache, so a sweep over head settings only trains heads. After every run
`sweep.csv`, `sweep.md` and `sweep.png` are rewritten atomically, so an interrupted sweep resumes:
a combination whose run dir is finished (manifest.json), was trained with the same configuration
and has its row in `sweep.csv` is kept, not retrained.
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import logging
import math
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from .ablate import uses_extra_text
from ..data import read_dataset
from ..model.tagger import Tagger
from ..training.trainer import TrainInputs, groups_of, resolve
from ..config import AUTO, Config, flags, read_yaml_mapping
from ..data import Dataset, train_val_split
from ..encoders import Encoder
from ..errors import MmtagError, quoted
from ..io import atomic_write_text, atomic_write_with, csv_cell

log = logging.getLogger("mmtag")

GRID_ALIASES = {"lr": "train.lr", "batch": "train.batch_size", "optimizer": "train.optimizer",
                "epochs": "train.epochs", "loss": "train.loss", "thresholds": "train.thresholds",
                "fusion": "model.fusion", "hidden": "model.hidden",
                "image_encoder": "model.image_encoder", "text_encoder": "model.text_encoder",
                "modalities": "model.modalities", "dropout": "model.dropout"}

METRIC_COLUMNS = ["samples_f1", "micro_f1", "macro_f1", "val_loss", "train_loss", "train_s",
                  "model_size_mb"]
_SAFE = re.compile(r"[^A-Za-z0-9.+-]+")  # what a slug value may contain as is
_SAFE_AXIS = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_SLUG = 120
# Settings that change neither the split nor the model: a finished run differing only in these
# is still the same combination.
_IGNORED_ON_RESUME = {("cache_dir",), ("data", "workers")}


@dataclass
class SweepRow:
    """One trained combination: its axis values (as written in the grid) and what it measured."""

    config: dict[str, str]  # axis → value
    samples_f1: float
    micro_f1: float
    macro_f1: float
    val_loss: float  # at the best epoch
    train_loss: float  # at the best epoch
    train_s: float
    model_size_mb: float
    run: str  # the run directory, a normal bundle


# ------------------------------------------------------------------------------------ grids
def flag_keys() -> dict[str, str]:
    """`mmtag train`'s flag names (without the dashes) → their dotted config keys, read from the
    `flag` each config field declares (`batch-size` → train.batch_size), so a grid axis can be
    written as the flag is. `thresholds` is the older spelling of the `--decision` flag."""
    keys = {flag.name.lstrip("-"): key for key, flag in flags().items()}
    keys.setdefault("thresholds", "train.thresholds")
    return keys


def resolve_axis(axis: str) -> str:
    """The dotted config key of a grid axis: an alias of GRID_ALIASES (`batch`), a flag name of
    `mmtag train` (`batch-size`, also written `batch_size` or `--batch-size`) or a dotted key."""
    flags = flag_keys()
    flag = axis.lstrip("-").replace("_", "-")
    key = GRID_ALIASES.get(axis) or (flags.get(flag) if "." not in axis else None) or axis
    node: Any = Config().to_dict()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            node = None
            break
        node = node[part]
    if node is None or isinstance(node, dict):
        raise MmtagError(f"unknown grid axis {quoted(axis)}; use a flag name of mmtag train "
                         f"({', '.join(sorted(flags))}), one of {', '.join(GRID_ALIASES)}, "
                         "or a dotted config key such as train.weight_decay")
    return key


def _is_list_option(key: str) -> bool:
    node: Any = Config().to_dict()
    for part in key.split("."):
        node = node[part]
    return isinstance(node, list)


def _check_axes(grid: dict[str, list[Any]], source: str) -> None:
    if not grid:
        raise MmtagError(f"{source}: the grid has no axes")
    seen: dict[str, str] = {}
    for axis, values in grid.items():
        key = resolve_axis(axis)
        if key in seen:
            raise MmtagError(f"{source}: axes '{seen[key]}' and '{axis}' both set {key}")
        seen[key] = axis
        if not values:
            raise MmtagError(f"{source}: axis '{axis}' has no values")
        texts = [value_text(v) for v in values]
        if any(v is None or t == "" for v, t in zip(values, texts)):
            raise MmtagError(f"{source}: axis '{axis}' has an empty value")
        dup = sorted({t for t in texts if texts.count(t) > 1})
        if dup:
            raise MmtagError(f"{source}: axis '{axis}' repeats {', '.join(quoted(d) for d in dup)}")


def parse_grid(spec: str) -> dict[str, list[str]]:
    """`"lr=1e-4,5e-4 batch=32,64 optimizer=adam,adamw"` → ordered axes with their values.

    Axes are separated by whitespace, values by commas; an axis is a flag name of `mmtag train`
    (`batch-size`), an alias (GRID_ALIASES: `batch`) or a dotted config key. A list option such as modalities joins its items with '+'
    (`modalities=text,image+text`); fusion names keep their '+' (`fusion=concat,concat+mean`).
    """
    try:
        tokens = shlex.split(spec)
    except ValueError as exc:
        raise MmtagError(f"grid: cannot parse {quoted(spec)} ({exc})") from None
    grid: dict[str, list[str]] = {}
    for token in tokens:
        axis, eq, values = token.partition("=")
        axis = axis.strip()
        if not eq or not axis:
            raise MmtagError(f"grid: expected AXIS=V1,V2,... but got {quoted(token)}")
        if axis in grid:
            raise MmtagError(f"grid: axis '{axis}' given twice")
        items = [v.strip() for v in values.split(",")]
        if not values.strip() or any(not v for v in items):
            raise MmtagError(f"grid: axis '{axis}' has an empty value in {quoted(token)}")
        grid[axis] = items
    _check_axes(grid, "grid")
    return grid


def load_grid_file(path: str | Path) -> dict[str, list[Any]]:
    """A YAML mapping axis → list of values (a scalar is a one-value axis), in file order.

        lr: [1e-4, 5e-4]
        fusion: [concat, concat+mean, gated]
        modalities: [[text], [image, text]]   # or "text", "image+text"
    """
    raw = read_yaml_mapping(path, "grid file")
    if not raw:
        raise MmtagError(f"{path}: expected a mapping of axis → list of values")
    grid: dict[str, list[Any]] = {}
    for axis, values in raw.items():
        axis = str(axis)
        key = resolve_axis(axis)  # an unknown axis is refused before its values are looked at
        if values is None:
            values = []
        elif not isinstance(values, list):
            values = [values]
        for v in values:
            if isinstance(v, dict):
                raise MmtagError(f"{path}: axis '{axis}' has a mapping as a value")
            if isinstance(v, list) and not _is_list_option(key):
                raise MmtagError(f"{path}: axis '{axis}' takes single values, not a list {quoted(v)}")
        grid[axis] = values
    _check_axes(grid, str(path))
    return grid


def value_text(value: Any) -> str:
    """A grid value as the tables show it: lists joined by '+', booleans lower case."""
    if isinstance(value, (list, tuple)):
        return "+".join(str(v).strip() for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value).strip()


def _config_value(key: str, value: Any) -> Any:
    """What `Config.override` gets: list options split on '+' (and ','), the rest as given."""
    if _is_list_option(key) and isinstance(value, str):
        return [v.strip() for v in re.split(r"[+,]", value) if v.strip()]
    return value


def combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination in grid order (the last axis varies fastest)."""
    axes = list(grid)
    return [dict(zip(axes, values)) for values in itertools.product(*grid.values())]


def combination_config(base: Config, combo: dict[str, Any]) -> Config:
    return base.override({resolve_axis(a): _config_value(resolve_axis(a), v) for a, v in combo.items()})


def run_slug(combo: dict[str, Any]) -> str:
    """`lr=1e-4_batch=32_optimizer=adam`: readable, filesystem-safe and unique per combination.

    A value with characters outside [A-Za-z0-9.+-] has them replaced and a short hash of the
    original appended, so two values never share a slug; an over-long slug is cut and hashed.
    """
    parts = []
    for axis, value in combo.items():
        text = value_text(value)
        safe = _SAFE.sub("-", text).strip("-") or "x"
        if safe != text:
            safe += "-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:6]
        parts.append(f"{_SAFE_AXIS.sub('-', axis)}={safe}")
    slug = "_".join(parts)
    if len(slug) > _MAX_SLUG:
        slug = slug[:_MAX_SLUG - 9] + "~" + hashlib.sha1(slug.encode("utf-8")).hexdigest()[:8]
    return slug


def _combination_configs(base: Config, combos: list[dict[str, Any]],
                         images: str | Path | None) -> list[Config]:
    """Every combination's config, checked before hours of training rather than at its turn in
    the grid. `Config.override` validates each value against the registries (names) and ranges."""
    configs = []
    for combo in combos:
        what = ", ".join(f"{a}={value_text(v)}" for a, v in combo.items())
        try:
            cfg = combination_config(base, combo)
            if "image" in cfg.model.modalities and images is None:
                raise MmtagError("--images DIR is required when the image modality is used")
        except MmtagError as exc:
            raise MmtagError(f"sweep combination {what}: {exc}") from None
        configs.append(cfg)
    return configs


# ------------------------------------------------------------------------------------ sweep
def run_sweep(train_csv: str | Path, images: str | Path | None, out: str | Path, base: Config,
              grid: dict[str, list[Any]], *, progress: bool = True) -> list[SweepRow]:
    """Train every combination of `grid` into `out/runs/<slug>`; write sweep.csv/.md/.png.

    Returns one row per combination in grid order; `best_row(rows).run` is the best bundle.
    Finished combinations found in `out` (manifest.json, same configuration, row in sweep.csv)
    are kept without retraining.
    """
    out = Path(out)
    _check_axes(grid, "grid")
    combos = combinations(grid)
    configs = _combination_configs(base, combos, images)
    slugs = [run_slug(c) for c in combos]
    if len(set(slugs)) != len(slugs):  # cannot happen with distinct values; guard the resume logic
        raise MmtagError("grid: two combinations map to the same run directory")

    done = _finished_rows(out, slugs, configs)
    rows: dict[int, SweepRow] = {}
    for i, row in done.items():
        row.config = {a: value_text(v) for a, v in combos[i].items()}
        row.run = str(out / "runs" / slugs[i])
        rows[i] = row
    if done:
        log.info("sweep: %d of %d combinations already trained in %s", len(done), len(combos), out)
        _write_tables(out, grid, [rows[i] for i in sorted(rows)], base.train.metric)
    todo = [i for i in range(len(combos)) if i not in rows]
    if not todo:
        return [rows[i] for i in range(len(combos))]

    needs_images = any("image" in c.model.modalities for c in configs)
    image_dir = images if needs_images else None
    dataset, _ = read_dataset(train_csv, image_dir, labelled=True, skip_bad=base.data.skip_bad,
                              csv_format=base.data.csv_format())
    # One split for all: the base's seed and val_frac, even when an axis sets train.seed.
    try:
        tr_idx, va_idx = train_val_split(len(dataset), base.data.val_frac, base.train.seed,
                                         groups_of(base, dataset))
    except ValueError as exc:
        raise MmtagError(f"{train_csv}: {exc}") from None
    train_part, val_part = dataset.subset(tr_idx), dataset.subset(va_idx)
    side_data: dict[tuple[str, bool], Dataset] = {}
    encoders: dict[tuple[str, str], Encoder] = {}  # frozen encoders shared between combinations

    for n, i in enumerate(todo, 1):
        cfg, slug = configs[i], slugs[i]
        log.info("sweep %d/%d: %s", n, len(todo), slug)
        rows[i] = _train_one(cfg, combos[i], out / "runs" / slug, dataset, train_part, val_part,
                             image_dir, side_data, encoders, progress=progress)
        _write_tables(out, grid, [rows[k] for k in sorted(rows)],  # after every run: resumable
                      base.train.metric)
    return [rows[i] for i in range(len(combos))]


def _train_one(cfg: Config, combo: dict[str, Any], run_dir: Path, dataset: Dataset,
               train_part: Dataset, val_part: Dataset, image_dir: str | Path | None,
               side_data: dict[tuple[str, bool], Dataset],
               encoders: dict[tuple[str, str], Encoder], *, progress: bool) -> SweepRow:
    finetuning = bool(cfg.finetune.modalities)
    names = {"image": cfg.model.image_encoder, "text": cfg.model.text_encoder}
    # Encoders loaded for an earlier combination are reused; fine-tuning changes the encoders in
    # place, so a fine-tuning run gets its own.
    shared = {} if finetuning else {m: encoders[(m, names[m])] for m in cfg.model.modalities
                                    if (m, names[m]) in encoders}
    tagger = Tagger(cfg, encoders=shared)
    if not finetuning:
        tagger.features(dataset, skip_bad=cfg.data.skip_bad, progress=progress)  # warm the cache
        for modality, enc in tagger.encoders.items():
            encoders.setdefault((modality, enc.name), enc)
    extra = None
    if cfg.data.extra_text and uses_extra_text(cfg.model.head_name()):
        extra = _side_dataset(side_data, cfg.data.extra_text, None, True, cfg, dataset)
    unlabeled = None
    if cfg.data.unlabeled and cfg.pseudo.rounds > 0:
        unlabeled = _side_dataset(side_data, cfg.data.unlabeled,
                                  image_dir if "image" in tagger.modalities else None, False,
                                  cfg, dataset)
    t0 = time.perf_counter()
    # `auto` settled for the whole dataset: the shared split is the sweep's, not the user's --val
    tagger.config = resolve(cfg, TrainInputs(train=dataset))
    if tagger.config.train.folds > 1:  # cross-fitted: every row trains and is validated out of fold
        report = tagger.fit(dataset, unlabeled=unlabeled, extra_text=extra, progress=progress)
    else:
        report = tagger.fit(train_part, val_part, unlabeled=unlabeled, extra_text=extra,
                            progress=progress)
    train_s = time.perf_counter() - t0
    manifest = tagger.save(run_dir)
    m = report.val_metrics
    assert m is not None
    best = _best_epoch(tagger.history, report.best_epoch)
    return SweepRow(config={a: value_text(v) for a, v in combo.items()}, samples_f1=m.samples_f1,
                    micro_f1=m.micro_f1, macro_f1=m.macro_f1,
                    val_loss=float(best.get("val_loss", math.nan)),
                    train_loss=float(best.get("train_loss", math.nan)), train_s=train_s,
                    model_size_mb=float(manifest["model_size_mb"]), run=str(run_dir))


def _side_dataset(memo: dict[tuple[str, bool], Dataset], path: str, images: str | Path | None,
                  labelled: bool, cfg: Config, train: Dataset) -> Dataset:
    """An --extra-text or --unlabeled CSV, read once per sweep in the run's layout and with the
    training file's label vocabulary (so named labels get the same ids)."""
    key = (f"{path}\0{images}", labelled)
    if key not in memo:
        memo[key] = read_dataset(path, images, labelled=labelled, skip_bad=cfg.data.skip_bad,
                                 csv_format=cfg.data.csv_format(), vocab=train.vocab)[0]
    return memo[key]


def _best_epoch(history: list[dict[str, float]], best_epoch: int) -> dict[str, float]:
    """The history entry of the 1-based best epoch ({} when there is none)."""
    for h in history:
        if int(h.get("epoch", -1)) == best_epoch:
            return h
    if 1 <= best_epoch <= len(history):
        return history[best_epoch - 1]
    return {}


def best_row(rows: list[SweepRow], metric: str = "samples") -> SweepRow:
    """Highest validation F1 of `metric` (the base config's `train.metric`; sample-F1 unless
    told); ties go to the earlier combination in grid order."""
    if not rows:
        raise MmtagError("the sweep has no finished runs")
    return max(rows, key=lambda r: figure_of(r, metric))


def figure_of(row: SweepRow, metric: str) -> float:
    """A row's figure of `metric` (a name of registries.METRICS): what the sweep ranks by."""
    return float(getattr(row, f"{metric}_f1"))


# ------------------------------------------------------------------------------------ resume
def _finished_rows(out: Path, slugs: list[str], configs: list[Config]) -> dict[int, SweepRow]:
    """Rows of sweep.csv whose run dir is finished and was trained with the same configuration."""
    path = out / "sweep.csv"
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            table = list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError):
        log.warning("sweep: %s is unreadable; retraining everything", path)
        return {}
    by_slug: dict[str, dict[str, str]] = {}
    for rec in table:
        if rec.get("run"):
            by_slug[Path(rec["run"]).name] = rec
    found: dict[int, SweepRow] = {}
    for i, slug in enumerate(slugs):
        rec, run_dir = by_slug.get(slug), out / "runs" / slug
        if rec is None or not (run_dir / "manifest.json").is_file():
            continue
        if not _same_config(run_dir, configs[i]):
            log.info("sweep: %s was trained with another configuration; retraining it", run_dir)
            continue
        try:
            metrics = {k: float(rec[k]) for k in METRIC_COLUMNS}
        except (KeyError, TypeError, ValueError):
            continue
        found[i] = SweepRow(config={}, run=str(run_dir), **metrics)
    return found


def _same_config(run_dir: Path, cfg: Config) -> bool:
    try:
        saved = Config.from_yaml(run_dir / "config.yaml").to_dict()
    except MmtagError:
        return False
    wanted = cfg.to_dict()
    for key in ("folds", "stack"):  # a run saves what `auto` became for the sweep's data
        if wanted["train"][key] == AUTO:
            wanted["train"][key] = saved["train"][key]
    return _strip(saved) == _strip(wanted)


def _strip(d: dict[str, Any]) -> dict[str, Any]:
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    for path in _IGNORED_ON_RESUME:
        node = d
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)
    return d


# ------------------------------------------------------------------------------------ tables
def _write_tables(out: Path, grid: dict[str, list[Any]], rows: list[SweepRow],
                  metric: str = "samples") -> None:
    """sweep.csv, sweep.md and sweep.png; the best combination by `metric`'s figure."""
    axes = list(grid)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=axes + METRIC_COLUMNS + ["run"], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        rec: dict[str, Any] = dict(r.config)
        rec.update({k: round(getattr(r, k), 4) for k in METRIC_COLUMNS})
        rec["run"] = r.run
        # axis values and the run's path are the user's text: no cell may read as a formula
        writer.writerow({k: csv_cell(v) if isinstance(v, str) else v for k, v in rec.items()})
    atomic_write_text(out / "sweep.csv", buf.getvalue())

    best = best_row(rows, metric)
    lines = ["| " + " | ".join(axes + ["samples F1", "micro F1", "macro F1", "val loss",
                                        "train loss", "train s", "model MB", "run"]) + " |",
             "|" + "---|" * (len(axes) + 8)]
    for r in rows:
        cells = [r.config.get(a, "") for a in axes] + [
            f"{r.samples_f1:.4f}", f"{r.micro_f1:.4f}", f"{r.macro_f1:.4f}", f"{r.val_loss:.4f}",
            f"{r.train_loss:.4f}", f"{r.train_s:.2f}", f"{r.model_size_mb:.1f}", r.run]
        cells = [c.replace("|", "\\|") for c in cells]
        if r is best:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    title = _figure_title(metric)
    lines.append(f"Best configuration: {_describe(best, axes)} (validation {title} "
                 f"{figure_of(best, metric):.4f}) → {best.run}")
    if metric != "samples":
        lines.append(f"Ranked by validation {title} (--metric {metric}).")
    atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")
    _write_chart(out / "sweep.png", axes, rows, best, metric)


def _figure_title(metric: str) -> str:
    """A metric as the sweep's table heads name it: samples F1, micro F1, macro F1."""
    return f"{metric} F1"


def _describe(row: SweepRow, axes: list[str]) -> str:
    return ", ".join(f"{a}={row.config.get(a, '')}" for a in axes)


def _write_chart(path: Path, axes: list[str], rows: list[SweepRow], best: SweepRow,
                 metric: str = "samples") -> None:
    """Horizontal bars of the validation F1 ranked by (`metric`), one per configuration, the
    best highlighted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [" ".join(f"{a}={r.config.get(a, '')}" for a in axes) for r in rows]
    scores = [figure_of(r, metric) for r in rows]
    fig = Figure(figsize=(8, 1.2 + 0.35 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y = list(range(len(rows)))[::-1]  # first combination at the top
    bars = ax.barh(y, scores, color=["#d62728" if r is best else "#7f9fbf" for r in rows])
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlim(0, max(1.0, max(scores) * 1.05))
    ax.set_xlabel(f"validation {_figure_title(metric)}")
    ax.set_title(f"sweep: {len(rows)} configurations (best in red)")
    for bar, s in zip(bars, scores):
        ax.text(bar.get_width() + 0.005, bar.get_y() + bar.get_height() / 2, f"{s:.3f}",
                va="center", fontsize=7)
    fig.tight_layout()
    atomic_write_with(path, lambda p: fig.savefig(str(p), format="png"))
