import pytest

from mmtag.config import Config
from mmtag.errors import MmtagError


def test_yaml_round_trip_and_overrides(tmp_path):
    cfg = Config().override({"train.lr": 3e-4, "model.modalities": "text", "data.skip_bad": True})
    assert cfg.train.lr == 3e-4 and cfg.model.modalities == ["text"] and cfg.data.skip_bad
    path = tmp_path / "c.yaml"
    cfg.save_yaml(path)
    assert Config.from_yaml(path) == cfg


def test_none_overrides_are_ignored():
    assert Config().override({"train.lr": None}).train.lr == Config().train.lr


def test_yaml_strings_are_coerced(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  epochs: '5'\n")
    cfg = Config.from_yaml(path)
    assert cfg.train.lr == 1e-3 and cfg.train.epochs == 5


@pytest.mark.parametrize("text, needle", [
    ("train:\n  lrr: 1\n", "lrr"),
    ("train: 5\n", "mapping"),
    ("train:\n  epochs: many\n", "epochs"),
    ("- a\n", "mapping"),
])
def test_bad_config_names_the_problem(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(MmtagError, match=needle):
        Config.from_yaml(path)


def test_unknown_override_key():
    with pytest.raises(MmtagError, match="train.nope"):
        Config().override({"train.nope": 1})


def test_head_name_from_modalities():
    assert Config().override({"model.modalities": "image"}).model.head_name() == "image"
    assert Config().override({"model.modalities": "text"}).model.head_name() == "text"
    assert Config().override({"model.fusion": "mean"}).model.head_name() == "mean"


# ------------------------------------- constraints: declared on the fields, checked in one place
import math  # noqa: E402

from mmtag.config import (AugmentConfig, Interval, TrainConfig)  # noqa: E402


@pytest.mark.parametrize("yaml_text, message", [
    ("data:\n  val_frac: 0\n", "data.val_frac must be a number in (0, 1), got 0.0"),
    ("data:\n  workers: -1\n", "data.workers must be an integer >= 0, got -1"),
    ("model:\n  hidden: 0\n", "model.hidden must be an integer >= 1, got 0"),
    ("model:\n  dropout: 1\n", "model.dropout must be a number in [0, 1), got 1.0"),
    ("train:\n  lr: .nan\n", "train.lr must be a finite number > 0, got nan"),
    ("train:\n  weight_decay: -0.1\n", "train.weight_decay must be a finite number >= 0, got -0.1"),
    ("train:\n  union_text_range: [0.6, 0.3]\n",
     "train.union_text_range must be empty or [lo, hi] with 0 <= lo <= hi <= 1, got [0.6, 0.3]"),
    ("finetune:\n  warmup_frac: 1.5\n", "finetune.warmup_frac must be a number in [0, 1), got 1.5"),
    ("finetune:\n  modalities: [audio]\n", "finetune.modalities: unknown modality 'audio'; available: image, text"),
    ("pseudo:\n  confidence: 1\n", "pseudo.confidence must be a number in (0.5, 1), got 1.0"),
    ("model:\n  fusion: nope\n", "model.fusion: unknown fusion head 'nope'; available: concat,"),
    ("train:\n  optimizer: sgd\n", "train.optimizer: unknown optimizer 'sgd'; available: adam, adamw"),
    ("augment:\n  text: synonyms:0\n", "augment.text: unknown caption augmentation 'synonyms:0'"),
    ("device: cuda:x\n", "device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    ("train:\n  epochs: true\n", "train.epochs must be an integer, got True"),
    ("train:\n  epochs: 2.5\n", "train.epochs must be an integer, got 2.5"),
    ("amp: maybe\n", "amp must be true or false, got 'maybe'"),
    ("model:\n  modalities: 5\n", "model.modalities must be a list, got 5"),
])
def test_bad_config_value_names_file_option_and_range(tmp_path, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(MmtagError) as info:
        Config.from_yaml(path)
    assert str(info.value).startswith(f"{path}: {message}")
    assert "\n" not in str(info.value)


def test_override_names_the_flag_and_the_option():
    with pytest.raises(MmtagError, match=r"^--lr \(train\.lr\) must be a finite number > 0, got -1\.0$"):
        Config().override({"train.lr": -1})
    with pytest.raises(MmtagError, match=r"^--finetune \(finetune\.modalities\): unknown modality"):
        Config().override({"finetune.modalities": ["audio"]})
    with pytest.raises(MmtagError, match=r"^train\.weight_decay must be"):  # no flag: the option
        Config().override({"train.weight_decay": "-1"})


def test_values_that_were_accepted_stay_accepted(tmp_path):
    cfg = Config().override({"data.skip_bad": "yes", "train.epochs": "5", "train.lr": "1e-3",
                             "train.seed": 4294967295, "train.union_image_range": "0.8,0.8",
                             "device": "cuda:1", "augment.image": "flip,crop", "augment.text": "synonyms:2",
                             "model.image_encoder": "timm:efficientnet_b3",
                             "model.text_encoder": "hf:prajjwal1/bert-tiny", "pseudo.confidence": 0.99,
                             "train.patience": 0, "finetune.modalities": [], "model.dropout": 0})
    assert cfg.data.skip_bad is True and cfg.train.epochs == 5 and cfg.train.union_image_range == [0.8, 0.8]
    path = tmp_path / "c.yaml"
    cfg.save_yaml(path)
    assert Config.from_yaml(path) == cfg
    # an exported bundle's encoders are onnx:<source>
    Config().override({"model.image_encoder": "onnx:efficientnet-lite0", "model.text_encoder": "onnx:minilm-l6"})


def test_valid_names_come_from_the_registries(monkeypatch):
    from mmtag import encoders, fusion, losses, thresholds

    with pytest.raises(MmtagError, match="mine"):
        Config().override({"model.fusion": "mine", "train.loss": "mine"})
    monkeypatch.setitem(fusion.HEADS, "mine", fusion.HEADS["concat"])
    monkeypatch.setitem(losses.LOSSES, "mine", losses.LOSSES["bce"])
    monkeypatch.setitem(thresholds.TUNERS, "mine", thresholds.TUNERS["global"])
    monkeypatch.setitem(encoders.ENCODERS, "mine", encoders.ENCODERS["minilm-l6"])
    cfg = Config().override({"model.fusion": "mine", "train.loss": "mine", "train.thresholds": "mine",
                             "model.text_encoder": "mine"})
    assert (cfg.model.fusion, cfg.train.loss, cfg.train.thresholds) == ("mine", "mine", "mine")
    with pytest.raises(MmtagError, match="available: .*mine"):
        Config().override({"model.fusion": "nope"})


def test_augmented_views_need_an_augmentation_the_model_uses():
    assert Config().override({"augment.views": 2}).augment.image_spec(False) == "crop,flip"
    with pytest.raises(MmtagError, match=r"--aug-views \(augment\.views\) needs --image-aug or --text-aug"):
        Config().override({"augment.views": 2, "model.modalities": "text"})
    Config().override({"augment.views": 2, "model.modalities": "text", "augment.text": "synonyms:1"})


def test_validate_checks_configs_built_in_python():
    cfg = Config(train=TrainConfig(batch_size=0))
    with pytest.raises(MmtagError, match=r"^config: train\.batch_size must be an integer >= 1, got 0$"):
        cfg.validate()
    with pytest.raises(MmtagError, match="augment.views"):
        Config(augment=AugmentConfig(views=-1)).validate()


def test_unknown_section_in_override_is_one_line():
    with pytest.raises(MmtagError, match="unknown config option 'nope.lr'"):
        Config().override({"nope.lr": 1})
    with pytest.raises(MmtagError, match="unknown config option 'train'"):
        Config().override({"train": 1})


def test_interval_describes_its_range():
    assert Interval(0, 1, closed="neither").describe() == "a number in (0, 1)"
    assert Interval(1, None, integer=True).describe() == "an integer >= 1"
    assert Interval(0, None, closed="neither").problem(math.inf) == "must be a finite number > 0, got inf"
    assert Interval(1, None, integer=True).problem(True) is not None  # a bool is no integer
