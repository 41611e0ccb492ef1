import numpy as np
import pytest

from mmtag import Tagger, api
from mmtag.errors import MmtagError
from mmtag.presets import list_presets, load_preset, preset_dir


def test_both_reference_presets_ship_and_substitute_missing_backbones():
    assert {p.name for p in list_presets()} == {"accurate", "fast", "effnet-albert-union",
                                                  "effnet-berttiny-fm3"}
    a = load_preset("effnet-albert-union")
    assert a.model.fusion == "union" and a.finetune.modalities == ["image", "text"]
    assert a.train.union_image_range == [0.8, 0.8] and a.train.union_text_range == [0.3, 0.6]
    b = load_preset("effnet-berttiny-fm3")
    assert (b.model.fusion, b.train.loss, b.train.thresholds, b.pseudo.rounds) == \
        ("xattn+mean", "weighted-bce", "per-class", 2)
    # timm and the HF checkpoints are not installed here: the offline encoders stand in, recorded
    assert b.model.image_encoder == "efficientnet-lite2" and b.model.text_encoder == "minilm-l6"
    assert "timm:efficientnet_b4 -> efficientnet-lite2" in b.substitutions and b.preset == "effnet-berttiny-fm3"


def test_the_accurate_preset_is_cross_fitted_stacked_late_fusion():
    cfg = load_preset("accurate")
    assert (cfg.model.fusion, cfg.train.folds, cfg.train.stack) == ("mean", 5, True)
    assert cfg.model.modalities == ["image", "text"] and cfg.preset == "accurate"


def test_the_fast_preset_is_one_concat_head_on_a_split():
    cfg = load_preset("fast")
    assert (cfg.model.fusion, cfg.train.folds, cfg.train.stack) == ("concat", 1, False)
    # and the defaults are what `accurate` spells out, before `auto` is settled by the data
    from mmtag import Config
    assert (Config().model.fusion, Config().train.folds, Config().train.stack) == ("mean", "auto", "auto")


def test_a_copied_preset_file_loads(tmp_path):
    text = (preset_dir() / "effnet-albert-union.yaml").read_text().replace("epochs: 3", "epochs: 1")
    (tmp_path / "mine.yaml").write_text(text)
    cfg = load_preset(str(tmp_path / "mine.yaml"))
    assert cfg.finetune.epochs == 1 and cfg.preset == "mine"
    with pytest.raises(MmtagError, match="available"):
        load_preset("nope")


def test_union_preset_fixes_the_image_threshold(tiny, cache_dir, tmp_path):
    cfg = load_preset("effnet-albert-union").override({
        "finetune.modalities": [], "model.image_encoder": "efficientnet-lite0", "cache_dir": cache_dir,
        "train.epochs": 5, "model.hidden": 64, "data.workers": 0})
    tagger, report, _ = api.train(tiny.train_csv, tiny.images, tmp_path / "run", cfg, progress=False)
    thr = tagger.thresholds
    assert thr.mode == "union/global"
    assert np.allclose(thr.branches["image"], 0.8) and 0.3 <= thr.branches["text"][0] <= 0.6
    back = Tagger.load(tmp_path / "run")
    assert back.config.preset == "effnet-albert-union" and back.config.substitutions
