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
    ("model:\n  proj_dim: 0\n", "model.proj_dim must be an integer >= 1, got 0"),
    ("model:\n  image_input_dropout: -0.1\n", "model.image_input_dropout must be a number in [0, 1), got -0.1"),
    ("model:\n  gate_hidden: 1.5\n", "model.gate_hidden must be an integer, got 1.5"),
    ("model:\n  attention_heads: 0\n", "model.attention_heads must be an integer >= 1, got 0"),
    ("model:\n  fusion: xattn\n  attention_heads: 3\n",
     "model.attention_heads must divide model.proj_dim (256) for head 'xattn', got 3"),
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
    from mmtag.encoders import registry as encoders
    from mmtag import heads as fusion
    from mmtag.training import losses
    from mmtag.decision import thresholds

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


# ------------------------------------------------------------------ head hyper-parameters
def test_head_hyper_parameters_are_checked_for_the_head_that_reads_them():
    # xattn splits proj_dim among its attention heads; concat has no attention, so any count is fine
    assert Config().override({"model.attention_heads": 3}).model.attention_heads == 3
    with pytest.raises(MmtagError, match=r"^config: model\.attention_heads must divide model\.proj_dim \(30\) "
                                         r"for head 'xattn\+mean', got 4$"):
        Config().override({"model.fusion": "xattn+mean", "model.proj_dim": 30})
    cfg = Config().override({"model.fusion": "xattn", "model.proj_dim": 96, "model.attention_heads": 6})
    assert (cfg.model.proj_dim, cfg.model.attention_heads) == (96, 6)


def test_a_config_written_before_the_head_options_gets_their_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  fusion: gated\n  hidden: 64\n  dropout: 0.3\n")
    model = Config.from_yaml(path).model
    assert (model.proj_dim, model.image_input_dropout, model.gate_hidden, model.attention_heads) == (256, 0.5, 64, 4)


NEW_HEAD_OPTIONS = ("proj_dim", "image_input_dropout", "gate_hidden", "attention_heads")


@pytest.fixture(scope="module")
def concat_bundles(tmp_path_factory):
    """Two concat bundles over EfficientNet-Lite0 (random weights) and a tiny BERT: "custom" with
    non-default head hyper-parameters, and "old" with the defaults whose config.yaml then loses
    the head options, as written before they existed (its manifest kept in step)."""
    import re

    import torch

    from conftest import save_tiny_bert
    from mmtag.model import bundle
    from mmtag.data import LabelSpace
    from mmtag.encoders import create_encoder
    from mmtag.heads import create_head
    from mmtag.decision.thresholds import Thresholds

    root = tmp_path_factory.mktemp("head-options")
    bert = save_tiny_bert(root / "bert", layers=1)
    encoders = {"image": create_encoder("efficientnet-lite0", "image", random_init=True),
                "text": create_encoder(f"hf:{bert}", "text")}
    dims = {"image": encoders["image"].dim, "text": encoders["text"].dim}
    base = Config().override({"model.text_encoder": f"hf:{bert}", "model.hidden": 16,
                              "model.fusion": "concat", "train.folds": 1, "train.stack": False})
    configs = {"custom": base.override({"model.proj_dim": 24, "model.image_input_dropout": 0.25}),
               "old": base}
    runs = {}
    for kind, config in configs.items():
        torch.manual_seed(0)
        head = create_head("concat", dims, 3, config.model)
        runs[kind] = root / kind
        bundle.save(runs[kind], bundle.Bundle(
            config=config, label_space=LabelSpace(ids=(1, 2, 3), names=("a", "b", "c")),
            thresholds=Thresholds.constant(0.4, 3), head_name="concat", dims=dims,
            head_state=head.state_dict(), encoders=encoders))
    text = (runs["old"] / "config.yaml").read_text()
    stripped = re.sub(rf"(?m)^  ({'|'.join(NEW_HEAD_OPTIONS)}):.*\n", "", text)
    assert stripped.count("\n") == text.count("\n") - len(NEW_HEAD_OPTIONS)
    bundle.write_file(runs["old"], runs["old"] / "config.yaml", stripped)
    return runs, dims


def _head_outputs(head, dims):
    import torch

    from mmtag.heads import FeatureBatch

    g = torch.Generator().manual_seed(0)
    batch = FeatureBatch({"image": torch.randn(4, dims["image"], generator=g), "text": torch.randn(4, dims["text"], generator=g)})
    return head.eval()(batch)


def test_head_hyper_parameters_are_saved_in_the_bundle_and_rebuild_its_head(concat_bundles):
    import torch

    from mmtag import api

    from mmtag.model import bundle
    from mmtag.heads import create_head

    runs, dims = concat_bundles
    assert "proj_dim: 24" in (runs["custom"] / "config.yaml").read_text()
    assert bundle.load(runs["custom"]).config.model.proj_dim == 24
    head = api.Tagger.load(runs["custom"]).head
    assert head.aux_image.in_features == 24 and head.image[1].p == 0.25  # not the defaults
    torch.manual_seed(0)
    saved = create_head("concat", dims, 3, hidden=16, proj_dim=24, image_input_dropout=0.25)
    assert saved.state_dict().keys() == head.state_dict().keys()
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in saved.state_dict().items())
    assert torch.equal(_head_outputs(saved, dims).logits, _head_outputs(head, dims).logits)


def test_a_bundle_saved_before_the_head_options_loads_with_their_defaults(concat_bundles):
    from mmtag import api

    runs, dims = concat_bundles
    assert "proj_dim" not in (runs["old"] / "config.yaml").read_text()
    tagger = api.Tagger.load(runs["old"])
    assert tagger.config.model.proj_dim == 256 and tagger.head.aux_text.in_features == 256
    assert tagger.head.image[1].p == 0.5


# ------------------------------------------------------------------ configs that cannot exhaust memory (issue 29)
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def _alias_bomb(path: Path) -> Path:
    """Billion laughs, 9 levels: a 1 kB config that stands for 9**9 strings."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    lines += ["train:", "  lr: *a8"]  # quoted by "must be a number, got ..." if it were read
    path.write_text("\n".join(lines) + "\n")
    return path


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def test_an_alias_bomb_or_a_1gb_config_is_refused_by_the_cli_in_a_second(tmp_path):
    bomb, big = _alias_bomb(tmp_path / "bomb.yaml"), _sparse(tmp_path / "big.yaml", 1 << 30)
    csv_path = tmp_path / "x.csv"
    csv_path.write_text("ImageID,Labels,Caption\n1.jpg,1,a cat\n")
    expected = {bomb: f"mmtag: error: {bomb}, line 1: YAML anchors and aliases (&name, *name) are "
                      "not accepted in a config file; write the values out",
                big: f"mmtag: error: {big}: a config file may hold 1 MiB; this one is "
                     "1,073,741,824 bytes"}
    for path, line in expected.items():
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "mmtag", "train", str(csv_path), "--config",
                               str(path), "--out", str(tmp_path / "run")],
                              capture_output=True, text=True, timeout=60)
        seconds = time.perf_counter() - start
        assert done.returncode == 2 and done.stderr.splitlines() == [line], done.stderr
        assert seconds < 5  # the whole process; the refusal itself is timed below
        assert not (tmp_path / "run").exists()
    for path in expected:
        start = time.perf_counter()
        with pytest.raises(MmtagError):
            Config.from_yaml(path)
        assert time.perf_counter() - start < 1.0


def test_a_config_value_quoted_in_an_error_is_shortened(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  optimizer: " + "x" * 100_000 + "\n")
    with pytest.raises(MmtagError) as err:
        Config.from_yaml(path)
    message = str(err.value)
    assert message.startswith(f"{path}: train.optimizer: unknown optimizer 'xxx")
    assert len(message) < 400 and "..." in message
    path.write_text("model:\n  ? " + "k" * 100_000 + "\n  : 1\n")  # a key too long for `k: 1`
    with pytest.raises(MmtagError, match=r"unknown option\(s\) \['kkk") as err:
        Config.from_yaml(path)
    assert len(str(err.value)) < 400


def test_a_value_built_in_python_from_shared_lists_is_quoted_without_expanding_it():
    laughs: list = ["lol"] * 9
    for _ in range(8):
        laughs = [laughs] * 9  # what a YAML alias bomb builds: 9**9 strings, by reference
    start = time.perf_counter()
    with pytest.raises(MmtagError) as err:
        Config.from_dict({"model": {"modalities": laughs}})
    assert time.perf_counter() - start < 1.0
    assert str(err.value).startswith("config: model.modalities must be a string, got [[[")
    assert len(str(err.value)) < 500  # the item and its list, each quoted in at most 200 characters
