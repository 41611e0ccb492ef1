"""`mmtag report`: one self-contained HTML file (plots and thumbnails embedded), drawn with
matplotlib. `report` assembles a `ReportData` from a run; `render` draws it (no model, no files
read except the example thumbnails).
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import ImageDecodeError, decode_thumbnail, read_dataset
from ..errors import MmtagError
from ..model import bundle as bundle_io
from ..model.tagger import Tagger, warn_unknown_labels
from ..decision import (GRID, Metrics, Scores, Thresholds, ValidationRecord, compute,
                        confusion_counts, decide, f1_by_threshold, pr_curve)

EXAMPLES = 12  # validation items shown with their true and predicted labels


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


def _training_curves(d: ReportData) -> str:
    plt = _plt()
    runs = [("head", d.history)] + [(f"fine-tune {m}", h) for m, h in d.finetune_history.items() if h]
    runs = [(name, h) for name, h in runs if h]
    if not runs:
        return "<p>No per-epoch history in this run.</p>"
    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 3.2 * len(runs)), squeeze=False)
    for (name, hist), (ax_loss, ax_f1) in zip(runs, axes):
        epochs = [h["epoch"] for h in hist]
        ax_loss.plot(epochs, [h["train_loss"] for h in hist], label="train loss")
        ax_loss.plot(epochs, [h["val_loss"] for h in hist], label="validation loss")
        ax_loss.set(title=f"{name}: loss", xlabel="epoch")
        ax_loss.legend()
        ax_f1.plot(epochs, [h["val_samples_f1"] for h in hist], color="tab:green")
        ax_f1.set(title=f"{name}: validation sample-F1", xlabel="epoch")
    fig.tight_layout()
    return _figure_html(fig, "training curves")


def _per_class_bars(d: ReportData) -> str:
    plt = _plt()
    pc = d.metrics.per_class
    x = np.arange(len(pc))
    fig, ax = plt.subplots(figsize=(11, 4))
    for k, (attr, color) in enumerate((("precision", "tab:blue"), ("recall", "tab:orange"), ("f1", "tab:green"))):
        ax.bar(x + (k - 1) * 0.27, [getattr(c, attr) for c in pc], 0.27, label=attr, color=color)
    ax.set_xticks(x, [f"{c.name}\n(n={c.support})" for c in pc], rotation=60, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.05), title="per-class precision / recall / F1 (support in brackets)")
    ax.legend(ncol=3)
    return _figure_html(fig, "per-class precision, recall and F1")


def _confusion_table(d: ReportData) -> str:
    counts = confusion_counts(d.record.y_true, d.mask)
    rows = "".join(f"<tr><td>{i}</td><td>{html.escape(n)}</td>" + "".join(f"<td>{v}</td>" for v in c) + "</tr>"
                   for i, n, c in zip(d.label_ids, d.label_names, counts))
    return ("<table><tr><th>id</th><th>label</th><th>TP</th><th>FP</th><th>FN</th><th>TN</th></tr>"
            f"{rows}</table>")


def _pr_curves(d: ReportData) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 6))
    y, p = d.record.y_true, d.record.probs
    for j, name in enumerate(d.label_names):
        if y[:, j].any():
            precision, recall, ap = pr_curve(y[:, j], p[:, j])
            ax.plot(recall, precision, label=f"{name} (AP {ap:.2f})", lw=1)
    ax.set(xlabel="recall", ylabel="precision", title="precision-recall per class", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    return _figure_html(fig, "precision-recall curves")


def _threshold_curve(d: ReportData) -> str:
    plt = _plt()
    f1 = f1_by_threshold(d.record.probs, d.record.y_true, GRID)
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
                         f"(F1 {d.metrics.samples_f1:.4f})")
    ax.set(xlabel="threshold", ylabel="sample-F1", title="validation sample-F1 vs threshold")
    ax.legend(fontsize=8)
    return _figure_html(fig, "threshold versus F1")


def _label_frequency(d: ReportData) -> str:
    plt = _plt()
    x = np.arange(len(d.label_ids))
    fig, ax = plt.subplots(figsize=(11, 3.5))
    ax.bar(x - 0.2, d.record.y_true.sum(0), 0.4, label="true")
    ax.bar(x + 0.2, d.mask.sum(0), 0.4, label="predicted")
    ax.set_xticks(x, d.label_names, rotation=60, ha="right", fontsize=8)
    ax.set(yscale="log", title="label frequency (items carrying the label, log scale)")
    ax.legend()
    return _figure_html(fig, "label frequency")


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


def _examples(d: ReportData) -> str:
    r = d.record
    n = len(r.image_ids)
    # Mistakes first (they teach more), then correct ones, in a fixed order.
    is_wrong = [not np.array_equal(r.y_true[i].astype(bool), d.mask[i]) for i in range(n)]
    wrong = [i for i in range(n) if is_wrong[i]]
    right = [i for i in range(n) if not is_wrong[i]]
    pick = wrong[:EXAMPLES // 2]
    pick += right[:EXAMPLES - len(pick)]
    pick += wrong[len(wrong[:EXAMPLES // 2]):][:EXAMPLES - len(pick)]
    names = np.array(d.label_names)
    cards = []
    for i in pick:
        true = set(names[r.y_true[i].astype(bool)])
        pred = set(names[d.mask[i]])
        chips = "".join(f'<span class="chip {"ok" if x in true else "fp"}">{html.escape(x)}</span>'
                        for x in sorted(pred))
        missed = "".join(f'<span class="chip fn">{html.escape(x)}</span>' for x in sorted(true - pred))
        cards.append(f'<div class="card">{_thumbnail(r.image_paths[i])}<div class="id">{html.escape(r.image_ids[i])}</div>'
                     f'<div class="cap">{html.escape(r.captions[i])}</div><div>{chips}{missed}</div></div>')
    return ('<p>Green: predicted and true. Red: predicted, not true. Grey: true, missed.</p>'
            f'<div class="grid">{"".join(cards)}</div>')


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1150px; color: #1d2330; }
h1 { margin-bottom: 4px; } h2 { margin-top: 32px; border-bottom: 1px solid #dde; }
img { max-width: 100%; } table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ccd; padding: 3px 8px; text-align: right; } td:nth-child(2) { text-align: left; }
.headline { font-size: 17px; } .grid { display: grid; grid-template-columns: repeat(4, 1fr); gap: 12px; }
.card { border: 1px solid #dde; border-radius: 6px; padding: 8px; } .card img { display: block; margin: auto; }
.id { color: #667; font-size: 12px; } .cap { margin: 4px 0; }
.chip { display: inline-block; padding: 1px 8px; margin: 2px; border-radius: 10px; color: #fff; font-size: 12px; }
.ok { background: #2e8b57; } .fp { background: #c0392b; } .fn { background: #999; }
pre { background: #f4f5f8; padding: 12px; overflow: auto; }
"""


def render(d: ReportData) -> str:
    """The report as one HTML string."""
    m = d.metrics
    sections = [
        ("Training curves", _training_curves(d)),
        ("Per-class precision, recall, F1", _per_class_bars(d)),
        ("Per-class confusion counts", _confusion_table(d)),
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
            f"macro-F1 {m.macro_f1:.4f} · n = {m.n} · thresholds: {html.escape(d.thresholds.mode)}</p>"
            f"{body}</body></html>\n")


def report(run: str | Path, out: str | Path | None = None, *, csv_path: str | Path | None = None,
           images: str | Path | None = None, progress: bool = True) -> Path:
    """Write a self-contained HTML report of a run (default RUN/report.html): of its validation
    split, or with `csv_path`, of that labelled CSV scored by the run."""
    tagger = Tagger.load(run)
    ls = tagger.label_space
    if csv_path is not None:
        dataset, _ = read_dataset(csv_path, images if "image" in tagger.modalities else None,
                                  labelled=True)
        fs = tagger.features(dataset, progress=progress)
        d = fs.dataset
        warn_unknown_labels(ls, d.label_rows(), dataset.path,
                            "the report shows the model's own labels only (see mmtag evaluate)")
        scores = tagger.scores(fs.features)
        record = ValidationRecord.of(scores.probs, scores.branches, ls.encode(d.label_rows()), d,
                                     with_images="image" in tagger.modalities)
        title = f"{Path(run).name} on {Path(csv_path).name}"
    elif tagger.validation is not None:
        folds = tagger.config.train.folds
        what = (f"out of fold ({folds} folds, every training row)" if folds > 1 else
                "your validation set" if tagger.config.data.val_csv else "validation split")
        record, title = tagger.validation, f"{Path(run).name}: {what}"
    else:
        raise MmtagError(f"{run}: no validation record in this run (an export, or trained before "
                         "mmtag kept one); use --csv to report on a labelled CSV")
    scores = Scores(probs=record.probs, branches=record.branches,
                    union=tagger.head.decision == "union")
    mask = decide(scores, tagger.thresholds)
    data = ReportData(
        title=title, label_ids=list(ls.ids), label_names=list(ls.names), record=record, mask=mask,
        thresholds=tagger.thresholds, metrics=compute(record.y_true, mask, ls.ids, ls.names),
        history=tagger.history, finetune_history=tagger.finetune_history,
        config_yaml=_yaml(tagger.config.to_dict()))
    target = Path(out) if out is not None else Path(run) / "report.html"
    bundle_io.write_file(run, target, render(data))  # RUN/report.html: the manifest follows
    return target


def _yaml(obj: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)
