"""ONNX export: exported bundles predict like the eager ones, verify, and refuse misuse."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmtag import api
from mmtag.encoders import create_encoder
from mmtag.errors import MmtagError
from mmtag.data.synthetic import SyntheticPaths

import onnxruntime  # noqa: E402,F401  (a hard dependency: missing, these fail)


@pytest.fixture(scope="module")
def exported(fused_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    api.export(fused_run, root / "fp32")
    api.export(fused_run, root / "int8", int8=True)
    return {"fp32": root / "fp32", "int8": root / "int8"}


def _holdout(tiny: SyntheticPaths) -> tuple[list[Path], list[str]]:
    data, _ = api.read_dataset(tiny.holdout_csv, tiny.images, labelled=True)
    return [data.image_path(i) for i in range(len(data))], list(data.captions)


def test_fp32_export_scores_match_eager(fused_run: Path, exported: dict[str, Path],
                                        tiny: SyntheticPaths) -> None:
    # fp32 graphs and the head stored in fp16: the same scores to 1e-3, the same labels
    images, captions = _holdout(tiny)
    run, export = api.Tagger.load(fused_run), api.Tagger.load(exported["fp32"])
    assert np.abs(run.predict_proba(images, captions) - export.predict_proba(images, captions)).max() < 1e-3
    assert ([p.labels for p in run.predict(images, captions)]
            == [p.labels for p in export.predict(images, captions)])


def test_export_stores_the_head_in_fp16_and_loads_it_as_fp32(fused_run: Path,
                                                             exported: dict[str, Path]) -> None:
    import torch
    from safetensors.torch import load_file

    from mmtag.model import bundle

    trained = load_file(str(fused_run / "head.safetensors"))
    assert {v.dtype for v in trained.values()} == {torch.float32}  # training writes fp32, as ever
    for kind, path in exported.items():
        stored = load_file(str(path / "head.safetensors"))
        assert {v.dtype for v in stored.values()} == {torch.float16}, kind
        assert (path / "head.safetensors").stat().st_size < 0.55 * (fused_run / "head.safetensors").stat().st_size
        loaded = bundle.load(path, build_encoders=False).head_state
        assert {v.dtype for v in loaded.values()} == {torch.float32}
        for key, value in trained.items():  # the run's weights, rounded to fp16 once
            assert torch.equal(loaded[key], value.half().float()), key
        assert json.loads((path / "metrics.json").read_text())["export"]["head_dtype"] == "float16"


def test_int8_export_stores_the_image_encoders_large_weights_in_fp16(
        exported: dict[str, Path], tiny: SyntheticPaths) -> None:
    """With --int8 the image graph keeps its small tensors fp32 and stores its large ones in
    fp16 behind Casts, which ONNX Runtime folds back into fp32 constants: about half the file,
    features equal to the fp32 graph's to rounding, labels unchanged."""
    import onnx
    import torch
    from onnx import TensorProto

    from mmtag.data.images import decode_image
    from mmtag.encoders.onnx_export import FP16_MIN_ELEMENTS
    from mmtag.features import encode_images

    graphs = {k: v / "encoders/image/model.onnx" for k, v in exported.items()}
    assert graphs["int8"].stat().st_size < 0.6 * graphs["fp32"].stat().st_size
    init = onnx.load(str(graphs["int8"])).graph.initializer
    half = [i for i in init if i.data_type == TensorProto.FLOAT16]
    assert half and all(int(np.prod(i.dims)) >= FP16_MIN_ELEMENTS for i in half)
    assert all(i.data_type == TensorProto.FLOAT for i in onnx.load(str(graphs["fp32"])).graph.initializer)
    meta = json.loads((exported["int8"] / "encoders/image/encoder.json").read_text())
    assert meta["stored_weights"] == "fp16" and meta["precision"] == "fp32"
    assert "stored_weights" not in json.loads((exported["fp32"] / "encoders/image/encoder.json").read_text())
    # real (synthetic) images, not the export's random probes
    images, _ = _holdout(tiny)
    x = torch.from_numpy(np.stack([decode_image(p, 224) for p in images[:16]]))
    feats = {k: encode_images(api.Tagger.load(v).encoders["image"], x.clone())["image"]
             for k, v in exported.items()}
    rel = np.linalg.norm(feats["int8"] - feats["fp32"], axis=1) / np.linalg.norm(feats["fp32"], axis=1)
    assert rel.max() < 0.01


def test_exported_scores_match_the_runs_on_its_validation_rows(exported: dict[str, Path]) -> None:
    # export.agreement: the export's scores and decisions on the run's validation rows against
    # the run's own; the fp32 export agrees to 1e-3 and decides every row alike
    agreement = {k: json.loads((v / "metrics.json").read_text())["export"]["agreement"]
                 for k, v in exported.items()}
    assert agreement["fp32"]["rows"] > 0
    assert agreement["fp32"]["max_score_diff"] < 1e-3 and agreement["fp32"]["decisions_equal"] == 1.0
    assert agreement["int8"]["rows"] == agreement["fp32"]["rows"]
    assert agreement["int8"]["decisions_equal"] >= 0.9


def test_int8_exports_fp16_head_scores_like_the_fp32_head(fused_run: Path, exported: dict[str, Path],
                                                         tiny: SyntheticPaths) -> None:
    # The head's fp16 storage alone, on a few rows: the same export with the run's fp32 head
    from mmtag.model import bundle

    images, captions = _holdout(tiny)
    export = api.Tagger.load(exported["int8"])
    stored = export.predict_proba(images, captions)
    labels = [p.labels for p in export.predict(images, captions)]
    export.head.load_state_dict(bundle.load(fused_run, build_encoders=False).head_state)
    assert np.abs(export.predict_proba(images, captions) - stored).max() < 1e-3
    assert [p.labels for p in export.predict(images, captions)] == labels


def test_parallel_runs_match_one_at_a_time(exported: dict[str, Path], tiny: SyntheticPaths) -> None:
    # The ONNX encoders run several batches at once on single-threaded sessions; the order of
    # rows and the values must be what one sequential run gives.
    images, captions = _holdout(tiny)
    tagger = api.Tagger.load(exported["fp32"])
    for enc in tagger.encoders.values():
        enc._threads = 3  # more runs at once than this machine has cores: still in order
    parallel = tagger.predict_proba(images, captions)
    for enc in tagger.encoders.values():
        enc._threads = 1
    sequential = tagger.predict_proba(images, captions)
    assert np.abs(parallel - sequential).max() < 1e-5


def test_int8_export_is_smaller_and_agrees(fused_run: Path, exported: dict[str, Path],
                                           tiny: SyntheticPaths) -> None:
    sizes = {k: api.info(v)["model_size_mb"] for k, v in exported.items()}
    assert sizes["int8"] < 0.5 * sizes["fp32"]
    images, captions = _holdout(tiny)
    eager = [p.labels for p in api.Tagger.load(fused_run).predict(images, captions)]
    int8 = [p.labels for p in api.Tagger.load(exported["int8"]).predict(images, captions)]
    assert sum(a == b for a, b in zip(eager, int8)) >= 0.9 * len(eager)


def test_exported_bundle_records_its_origin(exported: dict[str, Path]) -> None:
    info = api.info(exported["int8"])
    assert info["encoders"]["image"]["name"] == "onnx:efficientnet-lite0"
    assert info["encoders"]["text"]["name"] == "onnx:minilm-l6"
    meta = json.loads((exported["int8"] / "encoders/text/encoder.json").read_text())
    assert meta["precision"] == "int8" and meta["probe_cosine"] >= 0.98
    metrics = json.loads((exported["int8"] / "metrics.json").read_text())
    assert metrics["export"]["int8"] is True and len(metrics["export"]["from_manifest_sha256"]) == 64
    assert metrics["export"]["thresholds_retuned"] is False


def test_export_keeps_the_runs_thresholds_unless_asked_to_retune(
        fused_run: Path, exported: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from mmtag import cli

    run = api.Tagger.load(fused_run).thresholds.to_dict()
    assert api.Tagger.load(exported["int8"]).thresholds.to_dict() == run  # the default
    assert cli.main(["export", str(fused_run), "--int8", "--retune", "--out",
                     str(tmp_path / "retuned")]) == 0
    out = capsys.readouterr().out
    assert "thresholds re-tuned on the run's validation split (--retune): " in out
    record = json.loads((tmp_path / "retuned" / "metrics.json").read_text())["export"]
    assert record["thresholds_retuned"] is True and record["thresholds_before"] == run
    assert record["thresholds_after"] == api.Tagger.load(tmp_path / "retuned").thresholds.to_dict()


def test_int8_export_reports_its_own_validation_metrics(exported: dict[str, Path]) -> None:
    # the export's metrics are of the export: re-scoring its validation split at the thresholds
    # it keeps reproduces them
    t = api.Tagger.load(exported["int8"])
    recorded = t.val_metrics
    again = t.recalibrate(retune=False)
    assert again is not None and recorded is not None
    assert again.samples_f1 == pytest.approx(recorded.samples_f1, abs=1e-9)


def test_recalibrate_needs_the_validation_images(fused_run: Path, tmp_path: Path) -> None:
    t = api.Tagger.load(fused_run)
    before = t.thresholds.to_dict()
    assert t.validation is not None
    t.config.data.images = str(tmp_path / "moved")  # the run's images folder, gone
    assert t.recalibrate() is None
    assert t.thresholds.to_dict() == before


def test_predict_job_with_exported_bundle(exported: dict[str, Path], tiny: SyntheticPaths,
                                          tmp_path: Path, cache_dir: str) -> None:
    out = tmp_path / "sub.csv"
    preds = api.predict(exported["int8"], tiny.test_csv, tiny.images, out, progress=False)
    rows = out.read_text().splitlines()
    assert rows[0] == "ImageID,Labels" and len(rows) == len(preds.labels) + 1
    assert all(r.split(",")[1] for r in rows[1:])  # top-1 fallback: never an empty label set


def test_tampered_onnx_graph_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exported["fp32"], copy)
    graph = copy / "encoders/image/model.onnx"
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(MmtagError, match="sha256 does not match"):
        api.Tagger.load(copy)


def test_export_refuses_misuse(fused_run: Path, exported: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(MmtagError, match="new directory"):
        api.export(fused_run, fused_run)
    with pytest.raises(MmtagError, match="unknown export format"):
        api.export(fused_run, tmp_path / "x", format="tflite")
    with pytest.raises(MmtagError, match="already an ONNX export"):
        api.export(exported["fp32"], tmp_path / "again")


@pytest.mark.parametrize("modality", ["image", "text"])
def test_export_that_disagrees_with_eager_is_refused(fused_run: Path, tmp_path: Path, capsys,
                                                      monkeypatch: pytest.MonkeyPatch, modality: str) -> None:
    """A graph whose features drift from the eager encoder's is refused with one line, and
    nothing is written: neither the export nor the temporary directory it was built in."""
    import tempfile

    import torch

    from mmtag import cli

    from mmtag.encoders import onnx as encoders

    cls = encoders.OnnxImageEncoder if modality == "image" else encoders.OnnxTextEncoder
    original = cls.forward

    def drifting(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        flip = lambda t: torch.cat([-t[:1], t[1:]])  # noqa: E731 - the first probe row turns around
        return tuple(flip(t) for t in out) if isinstance(out, tuple) else flip(out)

    monkeypatch.setattr(cls, "forward", drifting)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "export"
    assert cli.main(["-q", "export", str(fused_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disagrees with the eager encoder" in err[0], err
    assert "int8" not in err[0] and "(fp32)" in err[0]
    assert not out.exists() and list((tmp_path / "tmp").iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]


def test_onnx_encoder_cannot_be_created_for_training() -> None:
    with pytest.raises(MmtagError, match="mmtag export"):
        create_encoder("onnx:minilm-l6", "text")


def test_exported_bundles_load_without_the_export_module(exported: dict[str, Path]) -> None:
    """The onnx: family is registered with the encoders themselves: a fresh process validates
    onnx: names, loads and describes an exported bundle without importing `mmtag.model.export`, and
    `import mmtag` does not import onnxruntime (it would cost every command its start-up)."""
    import subprocess
    import sys

    script = f"""
import sys
import mmtag
from mmtag import api
assert "onnxruntime" not in sys.modules
mmtag.Config().override({{"model.text_encoder": "onnx:minilm-l6",
                          "model.image_encoder": "onnx:efficientnet-lite0"}})
assert api.Tagger.load({str(exported["fp32"])!r}).encoders["text"].name == "onnx:minilm-l6"
assert api.info({str(exported["int8"])!r})["model_size_mb"] > 0
assert "mmtag.model.export" not in sys.modules, "loading a bundle imported the export module"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_export_of_a_cross_fitted_run_scores_its_rows_out_of_fold(tiny: SyntheticPaths, make_config,
                                                                  tmp_path: Path) -> None:
    # A --folds run's validation rows are its training rows, and the bagged head trained on most
    # of each: the export must replay the fold heads, not score them in-sample with the bag.
    run = tmp_path / "run"
    cfg = make_config(**{"model.modalities": ["text"], "train.folds": 3, "train.thresholds": "per-class"})
    api.train(tiny.train_csv, None, run, cfg, progress=False)
    api.export(run, tmp_path / "fp32")
    eager, onnx = api.Tagger.load(run), api.Tagger.load(tmp_path / "fp32")
    assert np.abs(onnx.validation.probs - eager.validation.probs).max() < 1e-3
    assert onnx.val_metrics.samples_f1 == pytest.approx(eager.val_metrics.samples_f1, abs=0.01)
    folds = json.loads((tmp_path / "fp32" / "metrics.json").read_text())["folds"]
    assert folds["samples_f1"] == pytest.approx(eager.fitted.extra["folds"]["samples_f1"], abs=0.01)
    # the bag's in-sample scores of the same rows are not what was recorded
    bag = onnx.predict_proba_dataset(api.read_dataset(tiny.train_csv, None, labelled=True)[0],
                                     progress=False).probs
    assert np.abs(bag - onnx.validation.probs).max() > 0.05
