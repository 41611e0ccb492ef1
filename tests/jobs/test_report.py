"""The HTML run report: written by every train, regenerable, self-contained, every plot present."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from mmtag import api
from mmtag.errors import MmtagError
from mmtag.data.synthetic import SyntheticPaths

SECTIONS = ["training-curves", "per-class-precision,-recall,-f1", "per-class-confusion-counts",
            "precision-recall-curves", "threshold-vs-f1", "label-frequency", "validation-examples",
            "configuration"]


def _check(html: str) -> None:
    for section in SECTIONS:
        assert f'id="{section}"' in html, section
    # five matplotlib figures + example thumbnails, all inline: nothing to fetch
    assert len(re.findall(r'src="data:image/png;base64,', html)) >= 5
    assert len(re.findall(r'src="data:image/jpeg;base64,', html)) >= 6
    assert not re.search(r'src="(?!data:)', html)
    assert "<td>TP</td>" not in html and "<th>TP</th>" in html


def test_train_writes_report(fused_run: Path) -> None:
    html = (fused_run / "report.html").read_text()
    _check(html)
    info = api.info(fused_run)
    assert f"{info['validation']['samples_f1']:.4f}" in html  # headline = the run's own metric
    n = info["validation"]["n"]
    assert f"Validation figures: a validation split of {n} rows" in html  # the fixture: one split


def test_report_regenerates_and_reports_on_a_csv(fused_run: Path, tiny: SyntheticPaths,
                                                 tmp_path: Path) -> None:
    again = api.report(fused_run, tmp_path / "again.html")
    assert again.read_text() == (fused_run / "report.html").read_text()  # deterministic
    on_csv = api.report(fused_run, tmp_path / "holdout.html", csv_path=tiny.holdout_csv,
                        images=tiny.images, progress=False)
    html = on_csv.read_text()
    _check(html)
    m = api.evaluate(fused_run, tiny.holdout_csv, tiny.images, progress=False)
    assert f"{m.samples_f1:.4f}" in html
    assert f"Validation figures: the labelled CSV {tiny.holdout_csv} ({m.n} rows)" in html


def test_report_of_an_export_is_of_the_export(fused_run: Path, tmp_path: Path) -> None:
    api.export(fused_run, tmp_path / "onnx", int8=True)
    html = api.report(tmp_path / "onnx").read_text()
    _check(html)
    assert f"{api.info(tmp_path / 'onnx')['validation']['samples_f1']:.4f}" in html


def test_run_without_validation_record_needs_a_csv(fused_run: Path, tmp_path: Path) -> None:
    import shutil

    from mmtag.model import bundle

    copy = tmp_path / "old"
    shutil.copytree(fused_run, copy)
    b = bundle.load(copy)
    b.validation = None  # as runs saved before mmtag kept validation records
    (copy / "validation.safetensors").unlink()
    (copy / "validation.json").unlink()
    bundle.save(copy, b)
    with pytest.raises(MmtagError, match="--csv"):
        api.report(copy)


# ---------------------------------------------------------------- rendering, on synthetic inputs
def _data(rows: int, classes: int = 18, *, absent: tuple[int, ...] = (), few: dict[int, int] | None = None,
          folds: int = 1, seed: int = 0, names: dict[int, str] | None = None):
    """A ReportData built without a model: `rows` items, `classes` labels (`class{j}`, or as
    `names` says), columns `absent` with no positive, columns `few` with that many, noisy scores
    that rank positives higher."""
    import numpy as np

    from mmtag.decision import Thresholds, ValidationRecord, compute
    from mmtag.jobs.report import ReportData, ValidationSource

    rng = np.random.default_rng(seed)
    y = (rng.random((rows, classes)) < 0.3).astype(np.float32)
    for j in absent:
        y[:, j] = 0
    for j, k in (few or {}).items():
        y[:, j] = 0
        y[rng.choice(rows, k, replace=False), j] = 1
    probs = np.clip(0.35 * y + rng.random((rows, classes)) * 0.65, 0, 1)
    thresholds = Thresholds.constant(0.5, classes)
    mask = probs >= 0.5
    ids = list(range(classes))
    names = [(names or {}).get(j, f"class{j}") for j in ids]
    record = ValidationRecord(probs=probs, y_true=y, image_ids=[f"{i}.jpg" for i in range(rows)],
                              captions=[f"caption {i}" for i in range(rows)], image_paths=[""] * rows)
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 0.5 + abs(e - 4) / 20,
                "val_samples_f1": 0.7 - abs(e - 4) / 50, "threshold": 0.4} for e in range(1, 11)]
    source = (ValidationSource("out-of-fold", rows, folds=folds) if folds > 1
              else ValidationSource("split", rows))
    return ReportData(title="synthetic", label_ids=ids, label_names=names, record=record, mask=mask,
                      thresholds=thresholds, metrics=compute(y, mask, tuple(ids), tuple(names)),
                      history=history, finetune_history={}, config_yaml="{}", source=source,
                      train_folds=folds)


def test_per_class_legend_sits_outside_the_bars() -> None:
    from mmtag.jobs.report import per_class_figure

    fig = per_class_figure(_data(300))
    fig.canvas.draw()
    (ax,) = fig.axes
    legend = ax.get_legend()
    assert legend is not None
    renderer = fig.canvas.get_renderer()
    assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    assert not legend.get_window_extent(renderer).overlaps(ax.title.get_window_extent(renderer))


def test_absent_classes_are_marked_not_plotted_as_zeros() -> None:
    import matplotlib.pyplot as plt

    from mmtag.jobs.report import ABSENT, per_class_figure, pr_figure, render

    d = _data(300, absent=(2, 7))
    (ax,) = per_class_figure(d).axes
    bar_x = {round(p.get_x() + p.get_width() / 2) for p in ax.patches if p.get_width() < 0.5}
    assert bar_x == set(range(18)) - {2, 7}  # no bar at all for the absent classes
    assert sum(t.get_text() == ABSENT for t in ax.texts) == 2
    pr = pr_figure(d)
    for j, panel in enumerate(pr.axes):
        assert (len(panel.get_lines()) == 0) == (j in (2, 7)), j
    plt.close("all")
    html = render(d)
    assert len(re.findall(r'<tr class="absent"><td>\d+</td><td>class[27]</td>', html)) == 2
    assert "2 class(es) with no validation example (not scored): class2, class7." in html


def test_pr_curves_are_small_multiples_one_axes_per_class() -> None:
    from mmtag.jobs.report import pr_figure

    for classes in (18, 4, 13):  # a full grid, one row, a ragged last row
        fig = pr_figure(_data(200, classes))
        assert len(fig.axes) == classes
        assert [ax.get_title().split("\n")[0] for ax in fig.axes] == [f"class{j}" for j in range(classes)]
        assert len({(round(ax.get_xlim()[1], 3), round(ax.get_ylim()[1], 3)) for ax in fig.axes}) == 1
        assert fig.legends and len(fig.legends[0].get_texts()) == 3


def test_training_curves_mark_the_best_epoch() -> None:
    from mmtag.jobs.report import best_epoch, render, training_figure
    from mmtag.training.loop import higher_f1

    d = _data(300, folds=5)
    assert best_epoch(d.history, higher_f1) == 4
    fig = training_figure(d)
    for ax in fig.axes:
        marks = [ln for ln in ax.get_lines() if ln.get_label() == "best epoch 4"]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [4, 4]
    assert "best epoch 4" in fig.axes[1].texts[0].get_text()
    assert "head (fold 1 of 5)" in fig.axes[0].get_title()
    assert "out of fold over all 300 training rows (5 folds" in render(d)


def test_example_cards_show_each_label_with_its_score() -> None:
    import numpy as np

    from mmtag.jobs.report import render

    d = _data(40)
    html = render(d)
    cards = re.findall(r'<div class="card">.*?</div></div>', html)
    assert cards
    shown = re.findall(r'<div class="id">(\d+)\.jpg</div>', html)
    for card, i in zip(cards, map(int, shown)):
        want = np.flatnonzero(d.mask[i] | d.record.y_true[i].astype(bool))
        for j in want:
            assert f'class{j} <span class="p">{d.record.probs[i, j]:.2f}</span>' in card


def test_small_validation_warns_with_counts_and_large_does_not() -> None:
    from mmtag.jobs.report import FEW_POSITIVES, render
    from mmtag.decision import FEW_VALIDATION_ROWS

    small = render(_data(150, 6, few={3: 2}))
    assert 'class="warn"' in small
    assert "Only 150 validation row(s)" in small
    assert f"fewer than {FEW_POSITIVES} validation examples" in small and "class3 (2)" in small
    large = render(_data(FEW_VALIDATION_ROWS, 6, seed=1))
    assert 'class="warn"' not in large
    # many rows, but one class with few examples: still warned, about that class only
    rare = render(_data(FEW_VALIDATION_ROWS, 6, few={0: FEW_POSITIVES - 1}))
    assert 'class="warn"' in rare and "validation row(s)" not in rare and "class0 (4)" in rare


# ---------------------------------------------------------------- many labels, long label names
def _long_name(chars: int) -> str:
    """A label name of `chars` characters that never repeats itself (so any 50 of them found in
    a page were copied from it)."""
    import hashlib

    hexes = "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(chars // 64 + 1))
    return ("long" + hexes)[:chars]


LONG = _long_name(100_000)
MATH = r"$\frac$"  # matplotlib would read it as (broken) mathtext and stop drawing


def test_long_names_are_cut_in_the_plots_and_drawn() -> None:
    import matplotlib.pyplot as plt

    from mmtag.jobs.report import label_frequency_figure, per_class_figure, pr_figure

    d = _data(120, 6, names={0: LONG, 1: MATH})
    for fig in (per_class_figure(d), pr_figure(d), label_frequency_figure(d)):
        fig.canvas.draw()  # mathtext is parsed here: a `$` read as math would raise
        texts = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels() + [ax.title]]
        assert texts and max(map(len, texts)) < 100
        assert any("…" in t and "(100,000 chars)" in t for t in texts)
    plt.close("all")


def test_many_labels_plot_the_most_frequent_and_table_them_all() -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    from mmtag.jobs.report import (NAMED, PLOTTED, PR_PLOTTED, caveats, label_frequency_figure,
                                   per_class_figure, plotted, pr_figure)

    classes = 300
    d = _data(60, classes, absent=tuple(range(100, 160)))
    support = d.record.y_true.sum(0)
    shown = plotted(d)
    assert len(shown) == PLOTTED and len(set(shown)) == PLOTTED
    assert support[shown].min() >= np.delete(support, shown).max()  # the most frequent ones
    assert list(support[shown]) == sorted(support[shown], reverse=True)
    (ax,) = per_class_figure(d).axes
    assert [t.get_text().split(" (n=")[0] for t in ax.get_xticklabels()] == [f"class{j}" for j in shown]
    assert f"top {PLOTTED} of {classes} labels by frequency" in ax.get_title(loc="left")
    (ax,) = label_frequency_figure(d).axes
    assert len(ax.get_xticklabels()) == PLOTTED
    pr = pr_figure(d)
    assert len(pr.axes) == PR_PLOTTED
    assert pr.legends[0].get_title().get_text().startswith(f"top {PR_PLOTTED} of {classes}")
    plt.close("all")
    (absent,) = [c for c in caveats(d) if "no validation example" in c]
    assert absent.startswith("60 class(es) with no validation example")
    assert absent.count("class") == NAMED + 1 and absent.endswith(f"and {60 - NAMED} more.")


def test_average_precision_is_scikit_learns_for_every_column_at_once() -> None:
    import numpy as np
    from sklearn.metrics import average_precision_score

    from mmtag.jobs.report import average_precision

    rng = np.random.default_rng(3)
    y = rng.random((80, 40)) < 0.3
    probs = np.round(rng.random((80, 40)), 1).astype(np.float32)  # many tied scores
    probs[:, 0] = 0.5  # every score tied
    y[:, 1] = False  # no positive: no AP
    ap = average_precision(y, probs)
    assert np.isnan(ap[1])
    for j in set(range(40)) - {1}:
        assert ap[j] == pytest.approx(average_precision_score(y[:, j], probs[:, j]), abs=1e-12), j


@pytest.fixture(scope="module")
def many_labels_run(make_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text-only run on 3,000 named labels, among them a 100 kB name and MATH, each on a third
    of the rows (so among the plotted ones)."""
    import csv

    root = tmp_path_factory.mktemp("many-labels")
    with open(root / "train.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["ImageID", "Labels", "Caption"])
        for i in range(120):
            names = [f"t{j:04d}" for j in range(i * 25, i * 25 + 25)]
            names += [LONG] if i % 3 == 0 else []
            names += [MATH] if i % 3 == 1 else []
            w.writerow([f"{i}.jpg", " ".join(names), f"a photo of row {i % 7}"])
    cfg = make_config(**{"model.modalities": ["text"], "train.epochs": 2, "train.patience": 2,
                         "model.hidden": 32, "train.thresholds": "global", "data.val_frac": 0.25})
    api.train(root / "train.csv", None, root / "run", cfg, progress=False)
    return root / "run"


def test_a_100kB_label_name_trains_and_is_shown_cut(many_labels_run: Path) -> None:
    import html as html_lib
    import json

    from mmtag.data import display_name

    names = json.loads((many_labels_run / "labels.json").read_text(encoding="utf-8"))["names"]
    assert LONG in names and MATH in names  # the full name is the model's
    page = (many_labels_run / "report.html").read_text(encoding="utf-8")
    assert LONG[40:90] not in page  # no copy of it, in a cell, a tooltip or a plot's alt text
    assert html_lib.escape(display_name(LONG)) in page and html_lib.escape(MATH) in page


def test_a_run_with_thousands_of_labels_reports_every_label_once_in_the_table(
        many_labels_run: Path) -> None:
    import json

    from mmtag.jobs.report import PLOTTED, PR_PLOTTED

    labels = len(json.loads((many_labels_run / "labels.json").read_text())["ids"])
    assert labels > 2_000  # the training split's labels
    page = (many_labels_run / "report.html").read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f'id="{section}"' in page, section
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 5  # text only: no thumbnails
    table = page.split('id="per-class-confusion-counts"')[1].split("<h2")[0]
    assert table.count("<tr") == labels + 1  # the header and one row per label
    assert f"the top {PLOTTED} of {labels:,} labels by frequency" in page
    assert f"the top {PR_PLOTTED} of {labels:,} labels by frequency" in page
    assert len(page) < 3_000_000  # ~400 bytes a label, five plots and twelve cards
