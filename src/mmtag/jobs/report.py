"""`mmtag report`: one self-contained HTML file (plots and thumbnails embedded), drawn with
matplotlib. `report` assembles a `ReportData` from a run; `render` draws it (no model, no files
read except the example thumbnails). The `*_figure` functions return the matplotlib figures the
report embeds, so their layout can be checked without reading pixels.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..data import DISPLAY_CHARS, ImageDecodeError, decode_thumbnail, display_name, read_dataset
from ..errors import MmtagError
from ..model import bundle as bundle_io
from ..model.tagger import Tagger, warn_unknown_labels
from ..decision import (FEW_VALIDATION_ROWS, GRID, Metrics, Thresholds, ValidationRecord,
                        compute, confusion_counts, decide, f1_by_threshold, pr_curve)
from ..decision.metrics import metric_title
from ..training.loop import BestRule, EpochLog, higher_f1, higher_f1_then_lower_loss

AUDIT_DIR = "audit"  # `mmtag train --audit` writes the run's data audit here
EXAMPLES = 12  # validation items shown with their true and predicted labels
# The report's size must not grow with the label space beyond one table row per label: each
# per-class plot shows at most PLOTTED labels (the most frequent; PR_PLOTTED precision-recall
# panels, at about a quarter of a CPU second each), an example card at most CHIPS labels of each
# kind, a warning names at most NAMED labels; the per-class table has them all.
PLOTTED = 40
PR_PLOTTED = 24
CHIPS = 16
NAMED = 20
# A name longer than DISPLAY_CHARS is shown cut; its whole spelling goes in a tooltip only up to
# this length, so a 100 kB name is not copied into every cell that names it.
TOOLTIP_CHARS = 300
TICK_CHARS = 24  # a name's characters on a plot's axis or panel title
# Below this many validation examples a class's precision, recall and threshold move by whole
# tenths when one example changes: the report names such classes in its warning banner.
FEW_POSITIVES = 5
PR_COLUMNS = 6  # precision-recall small multiples per row
ABSENT = "no validation example"

# Where the validation figures come from (`ValidationSource.kind`): what the report says of each.
SOURCES = {
    "out-of-fold": "out of fold over all {rows} training rows ({folds} folds: each row scored by "
                   "the fold head that did not train on it and decided by the rule tuned on the "
                   "other folds)",
    "split": "a validation split of {rows} rows held out from the training CSV (--val-frac)",
    "val-csv": "your --val CSV {path} ({rows} rows)",
    "csv": "the labelled CSV {path} ({rows} rows), scored by this run",
}


@dataclass
class ValidationSource:
    """Which rows the report's figures are of."""

    kind: str  # a key of SOURCES
    rows: int
    folds: int = 1  # "out-of-fold": how many
    path: str = ""  # "val-csv" and "csv": the file

    def __post_init__(self) -> None:
        if self.kind not in SOURCES:
            raise ValueError(f"validation source {self.kind!r}: expected one of {', '.join(SOURCES)}")

    def describe(self) -> str:
        return SOURCES[self.kind].format(rows=self.rows, folds=self.folds, path=self.path)


@dataclass
class ReportData:
    """What one report shows."""

    title: str
    label_ids: list[int]
    label_names: list[str]
    record: ValidationRecord
    mask: np.ndarray  # (N, C) the model's decisions
    thresholds: Thresholds
    metrics: Metrics
    history: list[dict[str, float]]
    finetune_history: dict[str, list[dict[str, float]]]
    config_yaml: str
    source: ValidationSource
    train_folds: int = 1  # the run's own training: > 1 = cross-fitted, `history` is fold 1's
    metric: str = "samples"  # what the run optimised (train.metric, --metric)
    audit: str = ""  # the run's data audit (RUN/audit/audit.html), relative to the report


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def _figure_html(fig: Any, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _present(d: ReportData) -> np.ndarray:
    """(C,) whether each class has at least one validation example."""
    return d.record.y_true.astype(bool).any(0)


def plotted(d: ReportData, k: int = PLOTTED) -> np.ndarray:
    """The label columns a per-class plot shows: all of them, in label order, when there are at
    most k; else the k most frequent in the validation rows, most frequent first (ties: more
    often predicted, then label order)."""
    c = len(d.label_names)
    if c <= k:
        return np.arange(c)
    support, predicted = d.record.y_true.astype(bool).sum(0), d.mask.astype(bool).sum(0)
    return np.lexsort((np.arange(c), -predicted, -support))[:k]


def _plotted_note(d: ReportData, k: int = PLOTTED) -> str:
    """What a plot of `plotted(d, k)` leaves out: '' when it shows every label."""
    c = len(d.label_names)
    return "" if c <= k else f"top {k} of {c:,} labels by frequency; all in the per-class table"


def _tick(name: str) -> str:
    """A label name as matplotlib gets it: cut shorter than elsewhere (PLOTTED of them share an
    axis) and with `$` escaped, so that no name is read as mathtext (an unbalanced `\\frac`
    would stop the drawing)."""
    return display_name(name, TICK_CHARS).replace("$", r"\$")


def _name_html(name: str) -> str:
    """A label name in the page: cut, escaped, the whole name in a tooltip when not too long."""
    shown = html.escape(display_name(name))
    if DISPLAY_CHARS < len(name) <= TOOLTIP_CHARS:
        return f'<span title="{html.escape(name)}">{shown}</span>'
    return shown


def _named(shown: list[str], total: int) -> str:
    """A list of `total` labels of which `shown` (already cut, at most NAMED) are written out."""
    return ", ".join(shown) + (f", and {total - len(shown):,} more" if total > len(shown) else "")


# ------------------------------------------------------------------------ training curves
def best_epoch(history: list[dict[str, float]], better: BestRule) -> int:
    """The epoch whose weights training kept: its own rule `better` replayed on the history it
    logged (0 for an empty history)."""
    best: EpochLog | None = None
    at = 0
    for h in history:
        # a history written before `val_metric` was kept lacks it (EpochLog reads it as sample-F1)
        entry = EpochLog(**{f.name: h[f.name] for f in fields(EpochLog) if f.name in h})
        if better(entry, best):
            best, at = entry, int(entry.epoch)
    return at


def training_figure(d: ReportData) -> Any | None:
    """Loss and validation sample-F1 per epoch for the head and each fine-tuned encoder (and the
    run's metric when it is not sample-F1: what the head's best epoch was chosen by), the best
    epoch (the weights kept) marked by a vertical line; None without any history."""
    head = "head" if d.train_folds <= 1 else f"head (fold 1 of {d.train_folds})"
    runs = [(head, d.history, higher_f1)]
    runs += [(f"fine-tune {m}", h, higher_f1_then_lower_loss) for m, h in d.finetune_history.items()]
    runs = [r for r in runs if r[1]]
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 3.2 * len(runs)), squeeze=False)
    for (name, hist, rule), (ax_loss, ax_f1) in zip(runs, axes):
        epochs = [h["epoch"] for h in hist]
        # the epochs were chosen by the run's metric (a history without it: by sample-F1)
        chosen_by = d.metric if all(h.get("val_metric") is not None for h in hist) else "samples"
        f1 = [h["val_samples_f1"] if chosen_by == "samples" else h["val_metric"] for h in hist]
        best = best_epoch(hist, rule)
        best_f1 = f1[epochs.index(best)]
        ax_loss.plot(epochs, [h["train_loss"] for h in hist], label="train loss")
        ax_loss.plot(epochs, [h["val_loss"] for h in hist], label="validation loss")
        if chosen_by != "samples":
            ax_f1.plot(epochs, [h["val_samples_f1"] for h in hist], color="tab:olive", lw=1,
                       alpha=0.7, label="validation sample-F1")
        ax_f1.plot(epochs, f1, color="tab:green", label=f"validation {metric_title(chosen_by)}")
        ax_f1.plot([best], [best_f1], "o", color="tab:red", ms=5)
        for ax in (ax_loss, ax_f1):
            ax.axvline(best, color="tab:red", ls="--", lw=1, label=f"best epoch {best}")
        # The label beside the F1 panel's dashed line, on the side with more room (inside the
        # axes), on white so no curve hides it.
        left = best > (epochs[0] + epochs[-1]) / 2
        ax_f1.annotate(f"best epoch {best}\nF1 {best_f1:.4f}", (best, best_f1),
                       xytext=(-8 if left else 8, -30), textcoords="offset points",
                       ha="right" if left else "left", fontsize=8, color="tab:red",
                       bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85})
        ax_loss.set(title=f"{name}: loss", xlabel="epoch")
        ax_f1.set(title=f"{name}: validation {metric_title(chosen_by)}", xlabel="epoch")
        ax_loss.legend(fontsize=8, loc="best")
        if chosen_by != "samples":
            ax_f1.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def _training_curves(d: ReportData) -> str:
    fig = training_figure(d)
    if fig is None:
        return "<p>No per-epoch history in this run.</p>"
    note = ("<p>The head's curves are fold 1's; every fold stops at its own best epoch.</p>"
            if d.train_folds > 1 and d.history else "")
    return note + _figure_html(fig, "training curves")


# ------------------------------------------------------------------------ per class
def per_class_figure(d: ReportData) -> Any:
    """Precision, recall and F1 bars per class (the `plotted` ones), the legend above the axes
    (never over a bar); a class with no validation example gets a grey band saying so instead of
    zero bars."""
    plt = _plt()
    shown = plotted(d)
    pc = [d.metrics.per_class[j] for j in shown]
    present = _present(d)[shown]
    x = np.arange(len(pc))
    fig, ax = plt.subplots(figsize=(11, 4))
    for k, (attr, color) in enumerate((("precision", "tab:blue"), ("recall", "tab:orange"),
                                       ("f1", "tab:green"))):
        ax.bar(x[present] + (k - 1) * 0.27, [getattr(c, attr) for c, ok in zip(pc, present) if ok],
               0.27, label=attr, color=color)
    for i in np.flatnonzero(~present):
        ax.axvspan(i - 0.45, i + 0.45, color="#e4e4e4", lw=0)
        ax.text(i, 0.5, ABSENT, rotation=90, ha="center", va="center", fontsize=7, color="#666")
    # One line per tick: PLOTTED two-line ticks, turned, would overlap their neighbours.
    ax.set_xticks(x, [f"{_tick(c.name)} (n={c.support})" for c in pc], rotation=60, ha="right",
                  fontsize=8)
    for tick, ok in zip(ax.get_xticklabels(), present):
        if not ok:
            tick.set_color("#888")
    ax.set_xlim(-0.6, len(pc) - 0.4)
    ax.set_ylim(0, 1.05)
    note = _plotted_note(d)
    ax.set_title("per-class precision / recall / F1 (support in brackets)"
                 + (f"\n{note}" if note else ""), loc="left")
    # Above the axes, right-aligned, beside the left-aligned title: no bar can be under it.
    ax.legend(ncol=3, loc="lower right", bbox_to_anchor=(1.0, 1.01), borderaxespad=0, fontsize=9,
              frameon=False)
    return fig


def _note_html(d: ReportData, k: int = PLOTTED) -> str:
    note = _plotted_note(d, k)
    return f"<p>This plot: the {note}.</p>" if note else ""


def _per_class_bars(d: ReportData) -> str:
    return _note_html(d) + _figure_html(per_class_figure(d), "per-class precision, recall and F1")


def average_precision(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(C,) each column's average precision, as scikit-learn's `average_precision_score` gives
    it (NaN for a column without a positive), computed for all columns at once: scikit-learn
    takes about 5 ms a column, a minute for 10,000 labels.

    AP = sum over distinct scores s, highest first, of (recall gained at s) x (precision of the
    items scoring >= s): each positive adds 1/P times the precision at the last item tied with it.
    """
    n, c = y_true.shape
    ap = np.full(c, np.nan)
    step = max(1, 4_000_000 // max(n, 1))  # columns per block: memory stays bounded
    for lo in range(0, c, step):
        order = np.argsort(-probs[:, lo:lo + step], axis=0, kind="stable")
        s = np.take_along_axis(probs[:, lo:lo + step], order, axis=0)
        y = np.take_along_axis(y_true[:, lo:lo + step].astype(bool), order, axis=0)
        precision = np.cumsum(y, axis=0) / np.arange(1, n + 1)[:, None]
        # The last row of each run of tied scores: where the precision of the tie is read.
        last = np.ones_like(s, dtype=bool)
        last[:-1] = s[:-1] != s[1:]
        end = np.where(last, np.arange(n)[:, None], n)
        end = np.minimum.accumulate(end[::-1], axis=0)[::-1]
        positives = y.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            block = (y * np.take_along_axis(precision, end, axis=0)).sum(0) / positives
        ap[lo:lo + step] = np.where(positives > 0, block, np.nan)
    return ap


def _per_class_table(d: ReportData) -> str:
    """One row per label, every label: plain HTML, nothing drawn."""
    counts = confusion_counts(d.record.y_true, d.mask)
    present = _present(d)
    ap = average_precision(d.record.y_true, d.record.probs)
    rows = []
    for j, (i, n, c, m) in enumerate(zip(d.label_ids, d.label_names, counts, d.metrics.per_class)):
        if present[j]:
            scores = [f"{v:.3f}" for v in (m.precision, m.recall, m.f1, ap[j])]
            note = f"only {m.support} validation example(s)" if m.support < FEW_POSITIVES else ""
            cls = ' class="few"' if note else ""
        else:
            scores, note, cls = ["—"] * 4, ABSENT, ' class="absent"'
        rows.append(f"<tr{cls}><td>{i}</td><td>{_name_html(n)}</td><td>{m.support}</td>"
                    + "".join(f"<td>{v}</td>" for v in c) + "".join(f"<td>{s}</td>" for s in scores)
                    + f"<td>{note}</td></tr>")
    return ("<table><tr><th>id</th><th>label</th><th>support</th><th>TP</th><th>FP</th><th>FN</th>"
            "<th>TN</th><th>precision</th><th>recall</th><th>F1</th><th>AP</th><th>note</th></tr>"
            f"{''.join(rows)}</table>")


# ------------------------------------------------------------------------ precision-recall
def pr_figure(d: ReportData) -> Any:
    """Precision-recall small multiples: one panel per class (the PR_PLOTTED `plotted` ones,
    same axes everywhere), each with the class's chance level and the model's own operating
    point; a class with no validation example gets a grey panel saying so."""
    from matplotlib.lines import Line2D

    plt = _plt()
    shown = plotted(d, PR_PLOTTED)
    n = len(shown)
    cols = max(1, min(PR_COLUMNS, n))
    rows = math.ceil(n / cols) if n else 1
    # Constrained layout keeps the figure legend "outside", above every panel.
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 1.95 * rows + 0.5), sharex=True,
                             sharey=True, squeeze=False, layout="constrained")
    y, p = d.record.y_true.astype(bool), d.record.probs
    for k, ax in enumerate(axes.flat):
        if k >= n:
            # An empty slot of the last row: the panel above it shows the recall ticks instead.
            axes.flat[k - cols].xaxis.set_tick_params(labelbottom=True)
            ax.remove()
            continue
        j = int(shown[k])
        # A cut name's length on a line of its own: the panel is narrower than the cut name.
        name, c = _tick(d.label_names[j]).replace("…(", "…\n("), d.metrics.per_class[j]
        ax.set(xlim=(0, 1.02), ylim=(0, 1.05))  # a perfect curve stays off the frame
        ax.tick_params(labelsize=7)
        if not y[:, j].any():
            ax.set_facecolor("#eeeeee")
            ax.text(0.5, 0.5, "no validation\nexample", ha="center", va="center", fontsize=8,
                    color="#666", transform=ax.transAxes)
            ax.set_title(name, fontsize=8, color="#888")
            continue
        precision, recall, ap = pr_curve(y[:, j], p[:, j])
        ax.plot(recall, precision, color="tab:blue", lw=1.2)
        ax.axhline(float(y[:, j].mean()), color="#999", ls=":", lw=1)
        ax.plot([c.recall], [c.precision], "o", color="tab:red", ms=4)
        ax.set_title(f"{name}\nAP {ap:.2f} · n={c.support}", fontsize=8)
    fig.supxlabel("recall", fontsize=9)
    fig.supylabel("precision", fontsize=9)
    handles = [Line2D([], [], color="tab:blue", lw=1.2, label="precision-recall curve"),
               Line2D([], [], color="#999", ls=":", label="chance (the class's share of rows)"),
               Line2D([], [], color="tab:red", marker="o", ls="", ms=4,
                      label="the model's decision (its threshold)")]
    # The note of a cut plot as the legend's title: a suptitle would sit on the legend.
    fig.legend(handles=handles, loc="outside upper center", ncol=3, fontsize=8, frameon=False,
               title=_plotted_note(d, PR_PLOTTED) or None, title_fontsize=9)
    return fig


def _pr_curves(d: ReportData) -> str:
    return (_note_html(d, PR_PLOTTED)
            + _figure_html(pr_figure(d), "precision-recall curves, one panel per class"))


def _threshold_curve(d: ReportData) -> str:
    plt = _plt()
    f1 = f1_by_threshold(d.record.probs, d.record.y_true, GRID, metric=d.metric)
    title = metric_title(d.metric)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(GRID, f1, label="one global threshold")
    thr = d.thresholds
    if thr.branches:
        for name, v in thr.branches.items():
            ax.axvline(float(np.mean(v)), ls="--", color="tab:red" if name == "image" else "tab:purple",
                       label=f"chosen {name} threshold {float(np.mean(v)):.2f}")
    elif thr.mode == "global":
        t = float(thr.values[0])
        ax.axvline(t, color="tab:red", ls="--", label=f"chosen {t:.2f} (F1 {np.interp(t, GRID, f1):.4f})")
    else:
        ax.axvline(float(np.mean(thr.values)), color="tab:red", ls="--",
                   label=f"{thr.mode} thresholds, mean {float(np.mean(thr.values)):.2f} "
                         f"(F1 {d.metrics.figure(d.metric):.4f})")
    ax.set(xlabel="threshold", ylabel=title, title=f"validation {title} vs threshold")
    ax.legend(fontsize=8)
    return _figure_html(fig, "threshold versus F1")


def label_frequency_figure(d: ReportData) -> Any:
    """Validation items carrying each label (the `plotted` ones), in truth and as predicted."""
    plt = _plt()
    shown = plotted(d)
    x = np.arange(len(shown))
    fig, ax = plt.subplots(figsize=(11, 3.5))
    ax.bar(x - 0.2, d.record.y_true.astype(bool).sum(0)[shown], 0.4, label="true")
    ax.bar(x + 0.2, d.mask.astype(bool).sum(0)[shown], 0.4, label="predicted")
    ax.set_xticks(x, [_tick(d.label_names[j]) for j in shown], rotation=60, ha="right", fontsize=8)
    ax.set_yscale("log")
    note = _plotted_note(d)
    ax.set_title("label frequency (items carrying the label, log scale)"
                 + (f"\n{note}" if note else ""), loc="left")
    ax.legend(ncol=2, loc="lower right", bbox_to_anchor=(1.0, 1.01), borderaxespad=0, fontsize=9,
              frameon=False)  # above the axes, as on the per-class bars
    return fig


def _label_frequency(d: ReportData) -> str:
    return _note_html(d) + _figure_html(label_frequency_figure(d), "label frequency")


# ------------------------------------------------------------------------ examples
def _thumbnail(path: str) -> str:
    if not path:
        return ""
    try:
        img = decode_thumbnail(path, 180)  # the model's decoder: same formats, upright, on white
    except ImageDecodeError:
        return '<div class="missing">image not available</div>'
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return f'<img alt="" src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _chip(kind: str, name: str, prob: float) -> str:
    return (f'<span class="chip {kind}">{_name_html(name)} '
            f'<span class="p">{prob:.2f}</span></span>')


def _chips(d: ReportData, i: int, columns: np.ndarray, kind: Any) -> str:
    """Chips of item i's labels `columns` (highest score first), at most CHIPS and a count of
    the rest; `kind(j)` is the chip's class."""
    probs = d.record.probs[i]
    # Highest score first: the chip order says how sure the model was.
    columns = columns[np.argsort(-probs[columns], kind="stable")]
    more = len(columns) - CHIPS
    return ("".join(_chip(kind(j), d.label_names[j], float(probs[j])) for j in columns[:CHIPS])
            + (f'<span class="more">+{more:,} more</span>' if more > 0 else ""))


def _examples(d: ReportData) -> str:
    r = d.record
    truth_all, pred_all = r.y_true.astype(bool), d.mask.astype(bool)
    # Mistakes first (they teach more), then correct ones, in a fixed order.
    is_wrong = (truth_all != pred_all).any(1)
    wrong = np.flatnonzero(is_wrong).tolist()
    right = np.flatnonzero(~is_wrong).tolist()
    pick = wrong[:EXAMPLES // 2]
    pick += right[:EXAMPLES - len(pick)]
    pick += wrong[len(wrong[:EXAMPLES // 2]):][:EXAMPLES - len(pick)]
    cards = []
    for i in pick:
        truth, pred = truth_all[i], pred_all[i]
        chips = _chips(d, i, np.flatnonzero(pred), lambda j: "ok" if truth[j] else "fp")
        missed = _chips(d, i, np.flatnonzero(truth & ~pred), lambda j: "fn")
        cards.append(f'<div class="card">{_thumbnail(r.image_paths[i])}<div class="id">{html.escape(r.image_ids[i])}</div>'
                     f'<div class="cap">{html.escape(r.captions[i])}</div><div>{chips}{missed}</div></div>')
    return ('<p>Each label with the model\'s score for it. Green: predicted and true. Red: '
            f'predicted, not true. Grey: true, missed. At most {CHIPS} of each.</p>'
            f'<div class="grid">{"".join(cards)}</div>')


# ------------------------------------------------------------------------ page
def caveats(d: ReportData) -> list[str]:
    """What makes this report's figures shaky, one sentence each (shown as a banner)."""
    out = []
    rows = len(d.record.y_true)
    if rows < FEW_VALIDATION_ROWS:
        out.append(f"Only {rows} validation row(s): below {FEW_VALIDATION_ROWS} the figures, the "
                   "best epoch and the thresholds are noisy, and the figures optimistic.")
    support = d.record.y_true.astype(bool).sum(0)
    absent = [n for n, s in zip(d.label_names, support) if s == 0]
    few = [(n, s) for n, s in zip(d.label_names, support) if 0 < s < FEW_POSITIVES]
    if absent:
        out.append(f"{len(absent):,} class(es) with no validation example (not scored): "
                   f"{_named([display_name(n) for n in absent[:NAMED]], len(absent))}.")
    if few:
        out.append(f"{len(few):,} class(es) with fewer than {FEW_POSITIVES} validation examples "
                   "(their figures rest on a handful of rows): "
                   f"{_named([f'{display_name(n)} ({s})' for n, s in few[:NAMED]], len(few))}.")
    return out


def _banner(d: ReportData) -> str:
    items = caveats(d)
    if not items:
        return ""
    return ('<div class="warn"><b>Read with care.</b><ul>'
            + "".join(f"<li>{html.escape(w)}</li>" for w in items) + "</ul></div>")


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1150px; color: #1d2330; }
h1 { margin-bottom: 4px; } h2 { margin-top: 32px; border-bottom: 1px solid #dde; }
img { max-width: 100%; } table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ccd; padding: 3px 8px; text-align: right; } td:nth-child(2) { text-align: left; }
td:last-child, th:last-child { text-align: left; } td:last-child { color: #667; }
tr.absent td { color: #999; background: #f2f2f2; } tr.few td:last-child { color: #a66a00; }
.headline { font-size: 17px; } .source { color: #445; margin-top: 0; }
.warn { background: #fff4d6; border: 1px solid #e0b84a; border-radius: 6px; padding: 8px 14px; }
.warn ul { margin: 4px 0; padding-left: 20px; }
.grid { display: grid; grid-template-columns: repeat(4, 1fr); gap: 12px; }
.card { border: 1px solid #dde; border-radius: 6px; padding: 8px; } .card img { display: block; margin: auto; }
.id { color: #667; font-size: 12px; } .cap { margin: 4px 0; }
.chip { display: inline-block; padding: 1px 8px; margin: 2px; border-radius: 10px; color: #fff; font-size: 12px; }
.chip .p { font-weight: 600; font-variant-numeric: tabular-nums; opacity: .9; }
.ok { background: #2e8b57; } .fp { background: #c0392b; } .fn { background: #999; }
.more { color: #667; font-size: 12px; margin-left: 4px; }
pre { background: #f4f5f8; padding: 12px; overflow: auto; }
"""


def render(d: ReportData) -> str:
    """The report as one HTML string."""
    m = d.metrics
    sections = [
        ("Training curves", _training_curves(d)),
        ("Per-class precision, recall, F1", _per_class_bars(d)),
        ("Per-class confusion counts", _per_class_table(d)),
        ("Precision-recall curves", _pr_curves(d)),
        ("Threshold vs F1", _threshold_curve(d)),
        ("Label frequency", _label_frequency(d)),
        ("Validation examples", _examples(d)),
        ("Configuration", f"<pre>{html.escape(d.config_yaml)}</pre>"),
    ]
    body = "".join(f'<h2 id="{html.escape(t.lower().replace(" ", "-"))}">{html.escape(t)}</h2>{s}'
                   for t, s in sections)
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>mmtag report: "
            f"{html.escape(d.title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>mmtag report</h1><p>{html.escape(d.title)}</p>"
            f'<p class="headline">sample-F1 <b>{m.samples_f1:.4f}</b> · micro-F1 {m.micro_f1:.4f} · '
            f"macro-F1 {m.macro_f1:.4f} · n = {m.n} · thresholds: {html.escape(d.thresholds.mode)} · "
            f"optimised for {html.escape(metric_title(d.metric))}</p>"
            f'<p class="source">Validation figures: {html.escape(d.source.describe())}.</p>'
            + (f'<p class="audit">Data audit of the training CSV (label errors, duplicates, leaks, '
               f'outliers): <a href="{html.escape(d.audit)}">{html.escape(d.audit)}</a></p>'
               if d.audit else "")
            + f"{_banner(d)}{body}</body></html>\n")


def report(run: str | Path, out: str | Path | None = None, *, csv_path: str | Path | None = None,
           images: str | Path | None = None, progress: bool = True, image_col: str | None = None,
           caption_col: str | None = None, labels_col: str | None = None,
           label_sep: str | None = None, image_ext: str | None = None) -> Path:
    """Write a self-contained HTML report of a run (default RUN/report.html): of its validation
    split, or with `csv_path`, of that labelled CSV scored by the run (read as the run's config
    says, or as `image_col=`, ... say; see `DataConfig.csv_format`)."""
    tagger = Tagger.load(run)
    ls = tagger.label_space
    if csv_path is not None:
        fmt = tagger.config.data.csv_format(image_col=image_col, caption_col=caption_col,
                                            labels_col=labels_col, label_sep=label_sep,
                                            image_ext=image_ext)
        dataset, _ = read_dataset(csv_path, images if "image" in tagger.modalities else None,
                                  labelled=True, csv_format=fmt, vocab=ls.vocab)
        fs = tagger.features(dataset, progress=progress)
        d = fs.dataset
        warn_unknown_labels(ls, d.label_rows(), dataset.path,
                            "the report shows the model's own labels only (see mmtag evaluate)",
                            vocab=d.vocab)
        scores = tagger.scores(fs.features)
        record = ValidationRecord.of(scores.probs, scores.branches, ls.encode(d.label_rows()), d,
                                     with_images="image" in tagger.modalities)
        title = f"{Path(run).name} on {Path(csv_path).name}"
        source = ValidationSource("csv", len(record.y_true), path=str(csv_path))
        mask = decide(scores, tagger.thresholds)
    elif tagger.validation is not None:
        record = tagger.validation
        source = validation_source(tagger, len(record.y_true))
        title = Path(run).name
        mask = tagger.validation_decisions()  # what the run's figures are of
        assert mask is not None
    else:
        raise MmtagError(f"{run}: no validation record in this run (an export, or trained before "
                         "mmtag kept one); use --csv to report on a labelled CSV")
    data = ReportData(
        title=title, label_ids=list(ls.ids), label_names=list(ls.names), record=record, mask=mask,
        thresholds=tagger.thresholds, metrics=compute(record.y_true, mask, ls.ids, ls.names),
        history=tagger.history, finetune_history=tagger.finetune_history,
        config_yaml=_yaml(tagger.config.to_dict()), source=source,
        train_folds=int(tagger.config.train.folds), metric=tagger.config.train.metric)
    target = Path(out) if out is not None else Path(run) / "report.html"
    audited = Path(run) / AUDIT_DIR / "audit.html"
    if csv_path is None and audited.is_file():
        data.audit = os.path.relpath(audited, target.resolve().parent if out is not None else run)
    bundle_io.write_file(run, target, render(data))  # RUN/report.html: the manifest follows
    return target


def validation_source(tagger: Tagger, rows: int) -> ValidationSource:
    """Which rows a run's own validation record holds, from the config it was trained with."""
    data, folds = tagger.config.data, int(tagger.config.train.folds)
    if folds > 1:
        return ValidationSource("out-of-fold", rows, folds=folds)
    if data.val_csv:
        return ValidationSource("val-csv", rows, path=data.val_csv)
    return ValidationSource("split", rows)


def _yaml(obj: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)
