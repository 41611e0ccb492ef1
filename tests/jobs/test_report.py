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


def test_report_of_an_export_is_of_the_export(fused_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
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
