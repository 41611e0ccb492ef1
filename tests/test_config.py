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
