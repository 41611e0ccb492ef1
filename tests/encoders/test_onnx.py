"""The onnx: family's own checks, none of which needs onnxruntime: names resolve through their
source encoder, exports cannot be created, and bad bundle metadata is one line naming the file.
(Exported graphs themselves are tested with `mmtag export`, in tests/model/test_export.py.)"""
import subprocess
import sys

import pytest

from mmtag.encoders import encoder_entry, load_onnx_encoder
from mmtag.errors import MmtagError


def test_an_onnx_name_takes_its_source_encoders_modality():
    assert encoder_entry("onnx:efficientnet-lite0").modality == "image"
    assert encoder_entry("onnx:minilm-l6", "text").name == "onnx:minilm-l6"
    with pytest.raises(MmtagError, match="unknown encoder 'nothing'"):
        encoder_entry("onnx:nothing")


def test_an_onnx_encoder_is_only_ever_loaded():
    with pytest.raises(MmtagError, match="train with 'efficientnet-lite0'"):
        encoder_entry("onnx:efficientnet-lite0").create(False)


@pytest.mark.parametrize("meta, problem", [
    ("not json", "cannot read ONNX encoder metadata"),
    ("[1]", "not a JSON object"),
    ('{"modality": "image", "dim": 8}', "positive integer dim and image_size"),
    ('{"modality": "sound", "dim": 8}', "modality image|text"),
    ('{"modality": "text", "dim": true}', "positive integer dim"),
])
def test_bad_metadata_is_one_line_naming_the_file(tmp_path, meta, problem):
    (tmp_path / "encoder.json").write_text(meta, encoding="utf-8")
    with pytest.raises(MmtagError, match=problem) as info:
        load_onnx_encoder("onnx:x", tmp_path)
    assert str(info.value).startswith(str(tmp_path / "encoder.json")) and "\n" not in str(info.value)


def test_a_missing_graph_is_named(tmp_path):
    (tmp_path / "encoder.json").write_text('{"modality": "text", "dim": 8}', encoding="utf-8")
    with pytest.raises(MmtagError, match="ONNX graph missing"):
        load_onnx_encoder("onnx:x", tmp_path)


def test_importing_the_encoders_imports_neither_runtime():
    """onnxruntime and timm load when an encoder of theirs is built, never on import: every
    command would otherwise pay their start-up."""
    script = ("import sys, mmtag.encoders\n"
              "assert 'onnxruntime' not in sys.modules and 'timm' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
