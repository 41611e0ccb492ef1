"""`mmtag info` and `mmtag encoders`: what a run holds (as a record, or as rows for people), and
which encoders this machine has."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Config
from ..data import display_name
from ..decision import mean_and_std
from ..decision.metrics import metric_title
from ..encoders import EncoderInfo, list_encoders
from ..io import load_json
from ..model import bundle as bundle_io

# Labels `info_rows` lists (COCO's 80 fit); a run with more says how many it leaves to `--json`.
LISTED_LABELS = 100


def available_encoders() -> list[EncoderInfo]:
    """Encoders usable here and now (`mmtag encoders`)."""
    return list_encoders()


def info(run: str | Path) -> dict[str, Any]:
    """What a run holds: config, labels, thresholds, encoders (with hashes), metrics, size."""
    # Every file is validated first (encoders excepted: their weights are only parsed), so what
    # follows reads well-formed files.
    manifest = bundle_io.load(run, build_encoders=False).manifest
    run = Path(run)
    metrics = load_json(run / "metrics.json")
    return {
        "run": str(run),
        "head": manifest["head"],
        "encoders": manifest["encoders"],
        "labels": load_json(run / "labels.json"),
        "thresholds": load_json(run / "thresholds.json"),
        "validation": metrics.get("validation"),
        "folds": metrics.get("folds"),  # cross-fitted runs: the validation figures are out of fold
        "config": Config.from_yaml(run / "config.yaml").to_dict(),
        "model_size_mb": manifest["model_size_mb"],
    }


def info_rows(data: dict[str, Any]) -> list[tuple[str, str]]:
    """`info(run)` for people: (field, text) rows of plain words and numbers, no nested dicts or
    long lists (`mmtag info RUN`; `--json` gives the whole record)."""
    head = data["head"]
    inputs = ", ".join(f"{kind} {width}" for kind, width in head["dims"].items())
    rows = [("run", data["run"]),
            ("head", f"{head['name']} (hidden {head['hidden']}; inputs: {inputs})")]
    for modality, enc in data["encoders"].items():
        src = enc.get("source") or {}
        where = f"; from {src.get('package')}/{src.get('file')}" if src else ""
        rows.append((f"{modality} encoder",
                     f"{enc['name']} (weights sha256 {enc['weights_sha256'][:16]}…{where})"))
    labels = data["labels"]
    count = len(labels["ids"])
    listed = [f"{i} {display_name(n)}" for i, n in
              zip(labels["ids"][:LISTED_LABELS], labels["names"][:LISTED_LABELS])]
    more = f", … and {count - LISTED_LABELS:,} more (--json lists all)" if count > LISTED_LABELS else ""
    rows.append((f"labels ({count:,})", ", ".join(listed) + more))
    thr = data["thresholds"]
    for branch, values in (thr.get("branches") or {"": thr["values"]}).items():
        rows.append(("thresholds", f"{thr['mode']}{' ' + branch if branch else ''} {_spread(values)}"))
    val = data.get("validation")
    if val:
        folds = data.get("folds") or {}
        per_fold = folds.get("samples_f1") or []
        where = (f"out of fold, {val['n']} rows, {len(per_fold)} folds: per fold "
                 "{:.4f} ± {:.4f}".format(*mean_and_std(per_fold))
                 if len(per_fold) > 1 else f"{val['n']} rows")
        rows.append(("validation", f"samples F1 {val['samples_f1']:.4f}, micro F1 "
                                   f"{val['micro_f1']:.4f}, macro F1 {val['macro_f1']:.4f} "
                                   f"({where})"))
    # what the thresholds, the decision rule and the best epoch were chosen by (a run saved
    # before `--metric` existed chose by sample-F1)
    metric = (data["config"].get("train") or {}).get("metric") or "samples"
    rows.append(("optimised for", f"{metric_title(metric)} (--metric {metric})"))
    changed = _changed_settings(data["config"], Config().to_dict())
    rows.append(("settings", ", ".join(f"{k}={v}" for k, v in changed) if changed
                 else "the defaults"))
    rows.append(("model size", f"{data['model_size_mb']} MB"))
    return rows


def _spread(values: list[float]) -> str:
    """One threshold, or the range of per-label ones: `0.55`, `0.20–0.61 (median 0.40)`."""
    ordered = sorted(values)
    lo, hi, mid = ordered[0], ordered[-1], ordered[len(ordered) // 2]
    return f"{lo:.2f}" if round(lo, 2) == round(hi, 2) else f"{lo:.2f}–{hi:.2f} (median {mid:.2f})"


def _changed_settings(config: dict[str, Any], defaults: dict[str, Any],
                      prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) of every option that differs from the default config, in config order
    (paths such as data.train_csv included: where the run came from)."""
    changed: list[tuple[str, str]] = []
    for key, value in config.items():
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if isinstance(value, dict):
            changed += _changed_settings(value, default or {}, f"{prefix}{key}.")
        elif value != default:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            changed.append((f"{prefix}{key}", text))
    return changed
