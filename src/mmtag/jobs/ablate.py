"""`mmtag ablate`: every fusion variant on the same seeded folds (or one split), one table.

The single-modality models and every fusion head are trained on the same folds with the same
seed (out-of-fold figures; `folds=1`: one shared validation split); encoder features are computed
once and shared through the cache, so only heads are trained. The variants are ranked by the
base config's metric (`train.metric`, `--metric`: sample-F1 by default), which the summary
line names.
"""
from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data import read_dataset
from ..decision import mean_and_std
from ..decision.metrics import metric_title
from ..model.tagger import Tagger
from ..config import Config
from ..heads import HEADS, takes_unpaired
from ..io import atomic_write_text

def default_variants() -> list[str]:
    """Every registered head, in registration order: a new head is ablated without editing this."""
    return list(HEADS)


@dataclass
class AblationRow:
    variant: str
    samples_f1: float
    micro_f1: float
    macro_f1: float
    train_s: float
    predict_s: float
    model_size_mb: float
    folds: int = 1  # > 1: the figures are out of fold (cross-fitted), not of the shared split
    samples_f1_std: float = 0.0  # std of the folds' sample-F1s (0 for the split)
    stack: bool = False  # late fusion: branches combined by per-label weights fitted out of fold


def variant_config(base: Config, variant: str) -> Config:
    """`image` / `text` are single-modality models; any other name is a fusion head."""
    if variant in ("image", "text"):
        return base.override({"model.modalities": [variant]})
    return base.override({"model.modalities": ["image", "text"], "model.fusion": variant})


def uses_extra_text(variant: str) -> bool:
    """Extra captions without images can train the text model and late-fusion heads only."""
    return takes_unpaired(variant)


def run_ablation(train_csv: str | Path, images: str | Path, out: str | Path, base: Config,
                 variants: list[str] | None = None, *, extra_text: str | Path | None = None,
                 progress: bool = True) -> list[AblationRow]:
    """Train each variant into `out/runs/<variant>` and write `ablation.csv` + `ablation.md`."""
    out = Path(out)
    variants = variants or default_variants()
    fmt = base.data.csv_format()
    dataset, _ = read_dataset(train_csv, images, labelled=True, skip_bad=base.data.skip_bad,
                              csv_format=fmt)
    extra = (read_dataset(extra_text, None, labelled=True, skip_bad=base.data.skip_bad,
                          csv_format=fmt, vocab=dataset.vocab)[0]
             if extra_text else None)
    rows: list[AblationRow] = []
    for variant in variants:
        tagger = Tagger(variant_config(base, variant))
        tagger.features(dataset, skip_bad=base.data.skip_bad, progress=progress)  # warm the cache
        t0 = time.perf_counter()
        report = tagger.fit(dataset, extra_text=extra if uses_extra_text(variant) else None,
                            progress=progress)
        train_s = time.perf_counter() - t0
        manifest = tagger.save(out / "runs" / variant.replace("+", "_"))
        t0 = time.perf_counter()
        tagger.predict_proba_dataset(report.val_dataset, progress=False)
        predict_s = time.perf_counter() - t0
        m = report.val_metrics
        assert m is not None
        folds = report.fold_samples_f1
        rows.append(AblationRow(variant, m.samples_f1, m.micro_f1, m.macro_f1, train_s, predict_s,
                                float(manifest["model_size_mb"]), report.folds,
                                mean_and_std(folds)[1] if folds else 0.0,
                                bool(tagger.config.train.stack)))
        write_tables(out, rows, extra_text=extra_text,  # after every variant: an interrupted
                     metric=base.train.metric)
        # ablation keeps the rows it finished
    return rows


def figure_of(row: AblationRow, metric: str) -> float:
    """A row's figure of `metric` (a name of registries.METRICS): what the variants rank by."""
    return float(getattr(row, f"{metric}_f1"))


def write_tables(out: Path, rows: list[AblationRow], *, extra_text: str | Path | None = None,
                 metric: str = "samples") -> None:
    """ablation.csv and ablation.md; the best variant (bold) by `metric`'s figure."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(asdict(rows[0])), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(r).items()})
    atomic_write_text(out / "ablation.csv", buf.getvalue())
    best = max(rows, key=lambda r: figure_of(r, metric))
    oof = rows[0].folds > 1
    lines = ["| variant | samples F1 | micro F1 | macro F1 | train s | predict s | model MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r.variant + (" (stacked)" if r.stack else "")
        name = f"**{name}**" if r is best else name
        f1 = f"{r.samples_f1:.4f} ± {r.samples_f1_std:.4f}" if oof else f"{r.samples_f1:.4f}"
        lines.append(f"| {name} | {f1} | {r.micro_f1:.4f} | {r.macro_f1:.4f} | "
                     f"{r.train_s:.1f} | {r.predict_s:.2f} | {r.model_size_mb:.1f} |")
    lines.append("")
    title = metric_title(metric)
    spread = ("± the std of the folds' figures" if metric == "samples"
              else "the samples F1 column's ± is the std of the folds' sample-F1s")
    figure = (f"out-of-fold {title} ({rows[0].folds} folds; {spread})"
              if oof else f"validation {title} (one seeded split)")
    lines.append(f"Best variant by {figure}: {best.variant}.")
    users = [r.variant for r in rows if uses_extra_text(r.variant)]
    if extra_text and users:
        lines.append(f"Extra captions without images ({extra_text}) trained: {', '.join(users)}.")
    atomic_write_text(out / "ablation.md", "\n".join(lines) + "\n")
