"""Training strategies: the plan a run's config and data give, each built-in strategy's
behaviour, and a strategy registered from outside the package."""
import numpy as np
import pytest

from mmtag import Config, Tagger, api
from mmtag.data import Dataset
from mmtag.errors import MmtagError
from mmtag.features.pipeline import Featurizer
from mmtag.training.strategies import STRATEGIES, Strategy, TrainInputs, TrainState, plan
from mmtag.training.strategies.unpaired_text import without_captions_of


def _data(n: int = 4) -> Dataset:
    from pathlib import Path

    return Dataset(path=Path("x.csv"), image_ids=[f"{i}.jpg" for i in range(n)],
                   captions=["a cat"] * n, labels=[[1], [2]] * (n // 2), images_dir=None)


def _plan(config: Config, **inputs: object) -> list[str]:
    return [s.name for s in plan(config, TrainInputs(train=_data(), **inputs))]  # type: ignore[arg-type]


def test_the_plan_follows_the_inputs():
    cfg = Config()
    assert _plan(cfg) == ["standard"]
    assert _plan(cfg, extra_text=_data()) == ["unpaired-text"]
    assert _plan(cfg.override({"pseudo.rounds": 2}), unlabeled=_data()) == ["standard", "self-training"]
    assert _plan(cfg.override({"pseudo.rounds": 2})) == ["standard"]  # no unlabelled rows: a warning
    ft = cfg.override({"finetune.modalities": ["text"], "pseudo.rounds": 1})
    assert _plan(ft, unlabeled=_data(), extra_text=_data()) == ["finetune", "unpaired-text", "self-training"]


class _Toy(Strategy):
    """A refine strategy asked for by name: it records that it ran and keeps the result."""

    phase = "refine"
    ran: list[int] = []

    def run(self, state: TrainState) -> None:
        assert state.result is not None and state.val is not None
        self.ran.append(len(state.val))
        state.log["toy"] = True


class _ToyHead(Strategy):
    phase = "head"


def test_a_strategy_registered_outside_the_package_is_planned_validated_and_run(
        tiny, make_config, monkeypatch):
    monkeypatch.setitem(STRATEGIES, "toy", _Toy)
    monkeypatch.setattr(_Toy, "name", "toy")
    with pytest.raises(MmtagError, match="unknown training strategy 'nope'.*toy"):
        Config().override({"train.strategies": ["nope"]})
    cfg = make_config(**{"model.modalities": ["text"], "train.epochs": 2, "train.strategies": ["toy"]})
    assert _plan(cfg) == ["standard", "toy"]
    train, _ = api.read_dataset(tiny.train_csv, None, labelled=True)
    _Toy.ran.clear()
    report = Tagger(cfg).fit(train, progress=False)
    assert _Toy.ran == [report.n_val]
    # a second head strategy asked for by name replaces `standard`; two of them are refused
    monkeypatch.setitem(STRATEGIES, "toy-head", _ToyHead)
    monkeypatch.setattr(_ToyHead, "name", "toy-head")
    assert _plan(Config().override({"train.strategies": ["toy-head"]})) == ["toy-head"]
    with pytest.raises(MmtagError, match="exactly one training strategy must train the head"):
        _plan(Config().override({"train.strategies": ["toy-head"]}), extra_text=_data())


def test_extra_text_trains_text_branch_on_more_rows(tiny, make_config, monkeypatch):
    from mmtag.training.strategies import base as strategy_base

    sizes = []
    original = strategy_base.fit_head

    def spy(head, tr, y_tr, *args, **kwargs):
        sizes.append((type(head).__name__, len(y_tr)))
        return original(head, tr, y_tr, *args, **kwargs)

    monkeypatch.setattr(strategy_base, "fit_head", spy)
    train, _ = api.read_dataset(tiny.train_csv, tiny.images, labelled=True)
    extra, _ = api.read_dataset(tiny.holdout_csv, None, labelled=True)
    tagger = Tagger(make_config(**{"model.fusion": "gated"}))
    report = tagger.fit(train, extra_text=extra, progress=False)
    n_tr = report.n_train
    n_extra = len(without_captions_of(extra, report.val_dataset))
    assert 0 < n_extra <= len(extra)
    assert ("TextHead", n_tr + n_extra) in sizes and ("ImageHead", n_tr) in sizes
    assert ("GatedHead", n_tr) in sizes  # the gate is trained on paired rows only
    assert report.val_metrics.samples_f1 > 0.5
    with pytest.raises(MmtagError, match="late-fusion"):
        Tagger(make_config(**{"model.fusion": "concat"})).fit(train, extra_text=extra, progress=False)


def test_two_stage_finetune_is_saved_and_reloaded(tiny, make_config, tmp_path):
    cfg = make_config(**{"model.modalities": ["text"], "finetune.modalities": ["text"],
                         "finetune.epochs": 1, "finetune.batch_size": 32, "train.epochs": 5})
    tagger, report, manifest = api.train(tiny.train_csv, None, tmp_path / "ft", cfg, progress=False)
    from mmtag.encoders import create_encoder

    stock = create_encoder("minilm-l6")
    assert tagger.encoders["text"].encoder_id != stock.encoder_id  # stage one changed the encoder
    assert manifest["encoders"]["text"]["weights_sha256"] == tagger.encoders["text"].weights_sha256
    assert len(tagger.finetune_history["text"]) == 1
    back = Tagger.load(tmp_path / "ft")
    assert back.encoders["text"].encoder_id == tagger.encoders["text"].encoder_id
    data, _ = api.read_dataset(tiny.holdout_csv, None, labelled=True)
    assert back.predict_proba_dataset(data, progress=False).labels == \
        tagger.predict_proba_dataset(data, progress=False).labels


def test_extra_text_never_contains_validation_captions(tiny, make_config, monkeypatch):
    seen = {}
    original = Featurizer.text_features

    def spy(self, extra, *, progress):
        seen["captions"] = list(extra.captions)
        return original(self, extra, progress=progress)

    monkeypatch.setattr(Featurizer, "text_features", spy)
    train, _ = api.read_dataset(tiny.train_csv, None, labelled=True)
    tagger = Tagger(make_config(**{"model.modalities": ["text"], "train.epochs": 3}))
    report = tagger.fit(train, extra_text=train, progress=False)  # extra = the training CSV itself
    val_caps = {c.lower() for c in report.val_dataset.captions}
    assert seen["captions"] and not val_caps & {c.lower() for c in seen["captions"]}


@pytest.mark.parametrize("mods, aug", [
    (["image"], {"augment.image": "crop,flip"}),
    pytest.param(["text"], {"augment.text": "synonyms:2"}, marks=pytest.mark.wordnet)])
def test_augmented_views_reach_the_head(tiny, make_config, monkeypatch, mods, aug):
    from mmtag.training.strategies import base as strategy_base

    got = {}
    original = strategy_base.fit_head

    def spy(head, tr, y_tr, va, y_va, cfg, **kwargs):
        got["plain"], got["views"] = tr, kwargs.get("views")
        return original(head, tr, y_tr, va, y_va, cfg, **kwargs)

    monkeypatch.setattr(strategy_base, "fit_head", spy)
    train, _ = api.read_dataset(tiny.train_csv, tiny.images, labelled=True)
    cfg = make_config(**{"model.modalities": mods, "augment.views": 2, "train.epochs": 3, **aug})
    Tagger(cfg).fit(train, progress=False)
    kind = mods[0]
    plain = got["plain"].get(kind)
    views = [v.get(kind) for v in got["views"]]
    assert len(views) == 2 and all(v.shape == plain.shape for v in views)
    assert not np.array_equal(views[0], plain) and not np.array_equal(views[0], views[1])
    # the plain features are the unaugmented ones (what validation and prediction use)
    from mmtag.data import train_val_split
    from mmtag.training.trainer import groups_of

    # the split keeps rows sharing a caption together (the synthetic captions repeat)
    tr_idx, _ = train_val_split(len(train), cfg.data.val_frac, cfg.train.seed, groups_of(cfg, train))
    unaugmented = Tagger(make_config(**{"model.modalities": mods})).features(train, progress=False)
    assert np.array_equal(unaugmented.features.get(kind)[tr_idx], plain)


def test_image_finetuning_finds_undecodable_images_before_the_first_epoch(tiny, make_config,
                                                                          tmp_path, monkeypatch):
    """Fine-tuning reads images outside the feature cache: a file that does not decode stops the
    run before any epoch (one DataError naming it), or, under --skip-bad, is dropped and counted."""
    import shutil

    from mmtag.training.strategies import finetune
    from mmtag.api import read_dataset
    from mmtag.errors import DataError

    images = tmp_path / "images"
    shutil.copytree(tiny.images, images)
    train, _ = read_dataset(tiny.train_csv, images, labelled=True)
    bad = train.image_ids[3]
    (images / bad).write_bytes(b"\xff\xd8\xff not really a jpeg")
    seen: list[int] = []

    def fake_finetune(encoder, paths, *args, **kwargs):
        seen.append(len(paths))
        raise RuntimeError("stop after the check")

    monkeypatch.setattr(finetune, "finetune_image", fake_finetune)
    cfg = make_config(**{"model.modalities": ["image"], "finetune.modalities": ["image"]})
    with pytest.raises(DataError, match=f"{bad}.*cannot decode") as err:
        Tagger(cfg).fit(train, progress=False)
    assert "row 4" in str(err.value) and seen == []
    cfg = cfg.override({"data.skip_bad": True})
    with pytest.raises(RuntimeError, match="stop after the check"):
        Tagger(cfg).fit(train, progress=False)
    assert seen and seen[0] < len(train)  # the training split, the bad row dropped
