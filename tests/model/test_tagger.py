import numpy as np
import pytest

from mmtag import Tagger, api
from mmtag.errors import MmtagError


def test_fused_beats_single_modalities_on_synthetic(tiny, make_config, fused_run, tmp_path):
    scores = {}
    for name, mods in (("image", ["image"]), ("text", ["text"])):
        api.train(tiny.train_csv, tiny.images, tmp_path / name,
                  make_config(**{"model.modalities": mods}), progress=False)
        scores[name] = api.evaluate(tmp_path / name, tiny.holdout_csv, tiny.images, progress=False).samples_f1
    fused = api.evaluate(fused_run, tiny.holdout_csv, tiny.images, progress=False).samples_f1
    assert fused > max(scores.values()), (fused, scores)


def test_bundle_round_trip_identical_predictions(tiny, fused_run, make_config, tmp_path):
    tagger = Tagger.load(fused_run)
    data, _ = api.read_dataset(tiny.holdout_csv, tiny.images, labelled=True)
    p1 = tagger.predict_proba_dataset(data, progress=False).probs
    tagger.save(tmp_path / "copy")
    again = Tagger.load(tmp_path / "copy")
    p2 = again.predict_proba_dataset(data, progress=False).probs
    assert np.array_equal(p1, p2)  # same features in → bit-identical scores out
    assert np.array_equal(tagger.thresholds.values, again.thresholds.values)
    # Recomputed features (fresh cache) differ only by batch-composition float noise.
    fresh = Tagger.load(tmp_path / "copy", cache_dir=str(tmp_path / "fresh-cache"))
    p3 = fresh.predict_proba_dataset(data, progress=False)
    assert np.allclose(p1, p3.probs, atol=1e-3)


def test_in_memory_predict_matches_file_predictions(tiny, fused_run):
    tagger = Tagger.load(fused_run)
    data, _ = api.read_dataset(tiny.test_csv, tiny.images, labelled=False)
    preds = tagger.predict([data.image_path(i) for i in range(4)], data.captions[:4])
    from_files = tagger.predict_proba_dataset(data.subset(range(4)), progress=False)
    assert [p.labels for p in preds] == from_files.labels
    assert all(p.labels and set(p.scores) == set(tagger.label_space.ids) for p in preds)
    # cached features are fp16, in-memory ones fp32: scores agree closely, not bit-exactly
    got = np.array([[p.scores[i] for i in tagger.label_space.ids] for p in preds])
    assert np.allclose(got, from_files.probs, atol=2e-2)


def test_predict_needs_both_inputs_for_fused(fused_run):
    tagger = Tagger.load(fused_run)
    with pytest.raises(MmtagError, match="needs captions"):
        tagger.predict(images=[], captions=None)
    with pytest.raises(MmtagError, match="2 images but 1 captions"):
        tagger.predict(images=["a.jpg", "b.jpg"], captions=["x"])
    with pytest.raises(MmtagError, match="nothing to predict"):
        tagger.predict(images=[], captions=[])


def test_untrained_tagger_says_so(tmp_path):
    # A Tagger's learned state is whole or absent: every use of it says so in one line.
    tagger = Tagger()
    assert tagger.fitted is None
    for use in (lambda: tagger.predict(captions=["x"]), lambda: tagger.predict_proba(captions=["x"]),
                lambda: tagger.label_space, lambda: tagger.thresholds, lambda: tagger.head,
                lambda: tagger.thresholds_by_label(), lambda: tagger.save(tmp_path / "run"),
                lambda: tagger.recalibrate()):
        with pytest.raises(MmtagError, match="not trained: call fit\\(\\) or Tagger.load"):
            use()
    assert not (tmp_path / "run").exists()


def test_a_loaded_tagger_is_whole(fused_run):
    tagger = Tagger.load(fused_run)
    state = tagger.state()
    assert state.head is tagger.head and state.label_space is tagger.label_space
    assert set(state.dims) == set(tagger.needs) and state.validation is not None


def test_text_only_needs_no_images(tiny, make_config, tmp_path):
    _, report, _ = api.train(tiny.train_csv, None, tmp_path / "t",
                             make_config(**{"model.modalities": ["text"]}), progress=False)
    assert report.val_metrics is not None
    preds = api.predict(tmp_path / "t", tiny.test_csv, None, tmp_path / "s.csv", progress=False)
    assert len(preds.labels) == 12


def test_training_is_deterministic(tiny, make_config, tmp_path):
    cfg = make_config(**{"model.modalities": ["text"]})
    a = api.train(tiny.train_csv, None, tmp_path / "a", cfg, progress=False)[0]
    b = api.train(tiny.train_csv, None, tmp_path / "b", cfg, progress=False)[0]
    for k, v in a.head.state_dict().items():
        assert np.array_equal(v.numpy(), b.head.state_dict()[k].numpy()), k


def test_check_finds_every_kind_of_problem(tiny, tmp_path):
    import shutil

    from mmtag import api

    images = tmp_path / "images"
    shutil.copytree(tiny.images, images)
    rows = tiny.train_csv.read_text().splitlines()
    header, body = rows[0], rows[1:6]
    first_id = body[0].split(",")[0]
    (images / body[1].split(",")[0]).unlink()  # missing
    (images / body[2].split(",")[0]).write_bytes(b"not a jpeg")  # corrupt
    bad = [f"{first_id},1,a duplicate id", "x.jpg,one,label is not a number", "y.jpg,1,"]
    csv = tmp_path / "t.csv"
    csv.write_text("\n".join([header, *body, *bad]) + "\n")
    r = api.check(csv, images, progress=False)
    assert r.rows == 8 and r.labelled
    assert len(r.bad_rows) == 2 and "row 7" in str(r.bad_rows[0]) and "row 8" in str(r.bad_rows[1])
    assert len(r.missing_images) == 1 and "row 2" in str(r.missing_images[0])
    assert len(r.corrupt_images) == 1 and "row 3" in str(r.corrupt_images[0])
    assert r.duplicate_ids == {first_id: 2}
    # another caption of the first image: a caption group, which is not a problem
    assert r.repeated.caption_groups == {first_id: [1, 6]} and not r.repeated.conflicts
    assert r.problems == 4 and sum(r.label_counts.values()) >= 6

    clean = api.check(tiny.train_csv, tiny.images, progress=False)
    assert clean.problems == 0 and clean.rows == len(tiny.train_csv.read_text().splitlines()) - 1


def test_evaluate_counts_true_labels_the_model_does_not_know(tiny, fused_run, tmp_path, caplog):
    """Labels absent from the model's label space are not dropped from the truth: a warning
    names them (count and ids) and they score as missed labels, each with its own row."""
    import csv
    import logging

    with open(tiny.holdout_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    rows[1][1] += " 99"
    rows[2][1] += " 42 99"
    path = tmp_path / "holdout_unknown.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    known = api.evaluate(fused_run, tiny.holdout_csv, tiny.images, progress=False)
    with caplog.at_level(logging.WARNING, logger="mmtag"):
        m = api.evaluate(fused_run, path, tiny.images, progress=False)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "2 true label id(s) in 2 row(s)" in warning and "42 (1 row), 99 (2 rows)" in warning
    extra = {c.label: c for c in m.per_class[len(known.per_class):]}
    assert sorted(extra) == [42, 99] and extra[99].support == 2 and extra[99].recall == 0.0
    assert extra[99].name == "99 (unknown)"
    assert m.per_class[:len(known.per_class)] == known.per_class  # known labels score as before
    assert m.n == known.n and m.micro_f1 < known.micro_f1 and m.samples_f1 < known.samples_f1


def test_in_memory_predict_names_the_undecodable_image(fused_run, tmp_path, monkeypatch):
    """A file whose decoder raises something other than OSError/ValueError (here a DDS texture
    named .jpg: NotImplementedError inside Pillow) is one DataError naming the file; so is an
    image opened from upload bytes whose pixel data fails to decode (HTTP 4xx in the server)."""
    import struct

    from PIL import Image, ImageFile

    from mmtag.data import open_image_bytes
    from mmtag.errors import DataError

    tagger = Tagger.load(fused_run)
    dds = tmp_path / "photo.jpg"
    dds.write_bytes(b"DDS " + struct.pack("<I", 124) + struct.pack("<3I", 0, 4, 4) + bytes(108))
    with pytest.raises(DataError, match="photo.jpg: cannot decode image"):
        tagger.predict([dds], ["a cat"])
    with pytest.raises(MmtagError, match="image 0: expected a file path or a PIL image"):
        tagger.predict([b"bytes"], ["a cat"])
    png = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(png)
    upload = open_image_bytes(png.read_bytes())

    def broken_load(self):
        raise IndexError("decoder bug")

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken_load)
    with pytest.raises(MmtagError, match="image 0: cannot decode image \\(IndexError"):
        tagger.predict([upload], ["a cat"])


def test_predict_and_export_refuse_an_impossible_out_before_the_work(fused_run, tiny, tmp_path,
                                                                     monkeypatch):
    from mmtag.model import export as runtime

    def never(*args, **kwargs):
        raise AssertionError("the work started")

    monkeypatch.setattr(Tagger, "load", classmethod(never))
    monkeypatch.setattr(runtime, "export_encoders", never)
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(MmtagError, match="is a directory"):
        api.predict(fused_run, tiny.test_csv, tiny.images, tmp_path / "a-dir", progress=False)
    with pytest.raises(MmtagError, match="not a directory"):
        api.predict(fused_run, tiny.test_csv, tiny.images, tmp_path / "a-file" / "s.csv",
                    progress=False)
    (tmp_path / "user-data").mkdir()
    (tmp_path / "user-data" / "notes.txt").write_text("mine")
    with pytest.raises(MmtagError, match="not an mmtag run directory"):
        api.export(fused_run, tmp_path / "user-data")
    with pytest.raises(MmtagError, match="not a directory"):
        api.export(fused_run, tmp_path / "a-file" / "export")
    assert (tmp_path / "user-data" / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ one input for late fusion
@pytest.fixture(scope="module")
def late_run(tiny, cache_dir, tmp_path_factory):
    """The default model (mean late fusion, five folds, stacked), trained briefly."""
    from mmtag import Config

    cfg = Config().override({"cache_dir": cache_dir, "train.epochs": 3, "model.hidden": 16,
                             "data.workers": 0})
    out = tmp_path_factory.mktemp("runs") / "late"
    api.train(tiny.train_csv, tiny.images, out, cfg, progress=False)
    return out


def _items(tiny, n=6):
    data, _ = api.read_dataset(tiny.holdout_csv, tiny.images, labelled=True)
    return [data.image_path(i) for i in range(n)], data.captions[:n]


@pytest.mark.parametrize("branch", ["text", "image"])
def test_late_fusion_answers_from_the_one_input_it_has_with_that_branch(tiny, late_run, branch):
    """Only captions (or only images): the answer is that branch's own scores, decided by that
    branch's thresholds tuned on its out-of-fold validation scores, and says which branch."""
    from mmtag.decision import Scores, decide, tune_decisions
    from mmtag.heads import FoldEnsemble, StackedHead

    tagger = Tagger.load(late_run)
    assert isinstance(tagger.head, StackedHead) and isinstance(tagger.head.inner, FoldEnsemble)
    assert tagger.branches == ("image", "text") and tagger.can_predict_with([branch])
    images, captions = _items(tiny)
    both = tagger.score_inputs(images, captions)
    assert both.modalities_used == ["image", "text"] and both.note is None
    preds = tagger.predict(images=images if branch == "image" else None,
                           captions=captions if branch == "text" else None)
    got = np.array([[p.scores[i] for i in tagger.label_space.ids] for p in preds])
    assert np.allclose(got, both.scores.branches[branch], atol=1e-5)  # the branch, not the fusion
    assert not np.allclose(got, both.scores.probs, atol=1e-3)
    rec = tagger.validation
    decision = tagger.branch_decision(branch)
    assert decision.source == "validation" and decision.val_metrics is not None
    own = tune_decisions(tagger.config.train.thresholds, Scores(rec.branches[branch]),
                         rec.y_true.astype(np.float32))
    assert np.array_equal(decision.thresholds.values, own.values)
    mask = decide(Scores(got.astype(np.float32)), own)
    assert [p.labels for p in preds] == tagger.label_space.decode(mask)
    missing = "image" if branch == "text" else "caption"
    assert all(p.modalities_used == [branch] for p in preds)
    assert all(p.note == f"{missing} missing: {branch} branch only" for p in preds)
    assert np.allclose(tagger.predict_proba(images=images if branch == "image" else None,
                                            captions=captions if branch == "text" else None), got)
    assert tagger.thresholds_by_label(branch)[branch] == dict(
        zip(tagger.label_space.ids, map(float, own.values)))


def test_a_branch_decides_by_what_the_run_kept(late_run):
    """No branch scores recorded: a union run's own branch thresholds, else the fused ones."""
    from mmtag.decision import Thresholds

    tagger = Tagger.load(late_run)
    state = tagger.state()
    assert tagger.branch_decision("text").source == "validation"
    state.validation = None
    fused = tagger.branch_decision("text")
    assert fused.source == "fused" and fused.thresholds is state.thresholds
    c = len(tagger.label_space)
    state.thresholds = Thresholds("union/global", np.full(c, 0.3, np.float32),
                                  {"image": np.full(c, 0.8, np.float32),
                                   "text": np.full(c, 0.3, np.float32)})
    union = tagger.branch_decision("image")
    assert union.source == "union" and np.allclose(union.thresholds.values, 0.8)


def test_early_fusion_refuses_one_input(tiny, fused_run):
    tagger = Tagger.load(fused_run)
    images, captions = _items(tiny, 2)
    assert tagger.branches == () and not tagger.can_predict_with(["text"])
    with pytest.raises(MmtagError, match="needs images .*head 'concat' fuses image and caption.*"
                                         "captions alone .*heads that can: mean"):
        tagger.predict(captions=captions)
    with pytest.raises(MmtagError, match="needs captions .*images alone"):
        tagger.predict_proba(images=images)
    with pytest.raises(MmtagError, match="no branch 'text' that answers alone"):
        tagger.branch_decision("text")


def test_loading_and_predicting_never_import_training(tiny, late_run):
    """Prediction runs through the heads and the decision, never `mmtag.training`: a fresh
    process imports the server, loads a run and predicts (both inputs, one input through a
    branch's own tuned decision, a dataset through the cache) without loading any of it."""
    import subprocess
    import sys

    images, captions = _items(tiny, 3)
    script = f"""
import sys

def training():
    return sorted(m for m in sys.modules if m == "mmtag.training" or m.startswith("mmtag.training."))

import mmtag.serve.app
assert not training(), ("import mmtag.serve.app", training())
from mmtag.data import read_dataset
from mmtag.model.tagger import Tagger
tagger = Tagger.load({str(late_run)!r})
assert not training(), ("Tagger.load", training())
both = tagger.predict({[str(p) for p in images]!r}, {list(captions)!r})
alone = tagger.predict(captions={list(captions)!r})
assert len(both) == len(alone) == 3 and alone[0].modalities_used == ["text"]
data, _ = read_dataset({str(tiny.holdout_csv)!r}, {str(tiny.images)!r}, labelled=True)
tagger.predict_proba_dataset(data.subset(range(4)), progress=False)
assert not training(), ("predict", training())
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1:] == ["ok"]


@pytest.mark.parametrize("run", ["fused_run", "late_run"])
def test_recalibrating_with_the_run_s_own_encoders_changes_nothing(run, request, tmp_path):
    """Re-scoring the validation rows (one split; or cross-fitted, stacked, out of fold) with
    the encoders that trained gives the run's thresholds, figures and decisions again; the images
    are read from the run's images folder (`data.images`), wherever it is now."""
    import shutil

    tagger = Tagger.load(request.getfixturevalue(run))
    state = tagger.state()
    thresholds, metrics, rec = state.thresholds.to_dict(), state.val_metrics, state.validation
    folds = state.extra.get("folds")
    moved = tmp_path / "images"
    shutil.copytree(tagger.config.data.images, moved)
    tagger.config.data.images = str(moved)
    assert tagger.recalibrate() == metrics
    assert tagger.thresholds.to_dict() == thresholds
    again = tagger.validation
    assert np.allclose(again.probs, rec.probs, atol=1e-6) and again.image_ids == rec.image_ids
    if folds:  # the out-of-fold decisions and each fold's figure
        assert np.array_equal(again.decided, rec.decided)
        assert tagger.state().extra["folds"]["samples_f1"] == pytest.approx(folds["samples_f1"])
    else:
        assert again.decided is None
    tagger.config.data.images = str(tmp_path / "gone")  # the folder the images were moved from
    assert tagger.recalibrate() is None and tagger.validation is again
