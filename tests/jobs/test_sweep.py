import csv
import shutil
import time

import pytest
import torch

from mmtag import Tagger
from mmtag.config import Config
from mmtag.errors import MmtagError
from mmtag.jobs.sweep import (GRID_ALIASES, best_row, combination_config, combinations,
                              load_grid_file, parse_grid, resolve_axis, run_slug, run_sweep)

COLUMNS = ["samples_f1", "micro_f1", "macro_f1", "val_loss", "train_loss", "train_s",
           "model_size_mb", "run"]


# ------------------------------------------------------------------------------ grid parsing
def test_parse_grid_keeps_axis_and_value_order():
    grid = parse_grid("lr=1e-4,5e-4 batch=32,64  optimizer=adam,adamw")
    assert grid == {"lr": ["1e-4", "5e-4"], "batch": ["32", "64"], "optimizer": ["adam", "adamw"]}
    assert list(grid) == ["lr", "batch", "optimizer"]
    assert len(combinations(grid)) == 8
    assert combinations(grid)[1] == {"lr": "1e-4", "batch": "32", "optimizer": "adamw"}


def test_parse_grid_aliases_and_dotted_keys():
    assert all(resolve_axis(a) == k for a, k in GRID_ALIASES.items())
    grid = parse_grid("train.weight_decay=0.01,0.1 fusion=concat,concat+mean modalities=text,image+text")
    assert grid == {"train.weight_decay": ["0.01", "0.1"], "fusion": ["concat", "concat+mean"],
                    "modalities": ["text", "image+text"]}
    assert resolve_axis("train.weight_decay") == "train.weight_decay"


def test_grid_axes_take_the_train_flag_names():
    # as `mmtag train` spells them, with or without dashes, or with underscores
    grid = parse_grid("batch-size=32,64 --ft-lr=1e-5 val_frac=0.2 decision=global,gfm")
    assert [resolve_axis(a) for a in grid] == ["train.batch_size", "finetune.lr", "data.val_frac",
                                               "train.thresholds"]
    assert resolve_axis("image-encoder") == GRID_ALIASES["image_encoder"]
    cfg = combination_config(Config(), combinations(grid)[-1])
    assert (cfg.train.batch_size, cfg.finetune.lr, cfg.data.val_frac, cfg.train.thresholds) == (
        64, 1e-5, 0.2, "gfm")
    # an alias and the flag of one option are one axis given twice
    with pytest.raises(MmtagError, match="axes 'batch' and 'batch-size' both set train.batch_size"):
        parse_grid("batch=32 batch-size=64")
    with pytest.raises(MmtagError, match="unknown grid axis 'learning-rate'; use a flag name of "
                                         r"mmtag train \(.*batch-size.*\)"):
        parse_grid("learning-rate=1e-3")


@pytest.mark.parametrize("spec, needle", [
    ("", "no axes"),
    ("lr", "AXIS=V1"),
    ("=1e-3", "AXIS=V1"),
    ("lr=", "empty value"),
    ("lr=1e-3,,1e-2", "empty value"),
    ("lr=1e-3 lr=1e-2", "twice"),
    ("lr=1e-3 train.lr=1e-2", "both set train.lr"),
    ("lr=1e-3,1e-3", "repeats"),
    ("learning_rate=1e-3", "learning_rate"),
    ("train.nope=1", "train.nope"),
    ("train=1", "'train'"),
    ("lr='1e-3", "cannot parse"),
])
def test_parse_grid_rejects(spec, needle):
    with pytest.raises(MmtagError, match=needle):
        parse_grid(spec)


def test_load_grid_file(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("lr: [1.0e-4, 5e-4]\nfusion: [concat, concat+mean, gated]\n"
                    "modalities: [[text], [image, text]]\ntrain.epochs: 3\n")
    grid = load_grid_file(path)
    assert list(grid) == ["lr", "fusion", "modalities", "train.epochs"]
    assert grid["lr"] == [1e-4, "5e-4"] and grid["train.epochs"] == [3]
    assert grid["modalities"] == [["text"], ["image", "text"]]
    assert run_slug(combinations(grid)[-1]) == "lr=5e-4_fusion=gated_modalities=image+text_train.epochs=3"
    for text, needle in [("- lr\n", "mapping"), ("bogus: [1]\n", "bogus"), ("lr: []\n", "no values"),
                         ("lr: [[1, 2]]\n", "single values"), ("lr: [1\n", "not valid YAML")]:
        path.write_text(text)
        with pytest.raises(MmtagError, match=needle):
            load_grid_file(path)
    with pytest.raises(MmtagError, match="not found"):
        load_grid_file(tmp_path / "missing.yaml")


def test_a_grid_file_with_aliases_or_over_1mib_is_refused_at_once(tmp_path):
    bomb = tmp_path / "bomb.yaml"  # billion laughs: 9 levels of 9 references
    lines = ["lr: &l0 [1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3]"]
    lines += [f"x{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\n")
    big = tmp_path / "big.yaml"
    with open(big, "wb") as fh:
        fh.truncate(1 << 30)  # 1 GiB, sparse
    start = time.perf_counter()
    with pytest.raises(MmtagError) as err:
        load_grid_file(bomb)
    assert str(err.value) == (f"{bomb}, line 1: YAML anchors and aliases (&name, *name) are not "
                              "accepted in a grid file; write the values out")
    with pytest.raises(MmtagError) as err:
        load_grid_file(big)
    assert str(err.value) == f"{big}: a grid file may hold 1 MiB; this one is 1,073,741,824 bytes"
    assert time.perf_counter() - start < 1.0


def test_grid_values_quoted_in_errors_are_shortened(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("lr: [[" + ", ".join(["1"] * 100_000) + "]]\n")
    with pytest.raises(MmtagError, match="takes single values, not a list") as err:
        load_grid_file(path)
    assert len(str(err.value)) < len(str(path)) + 300
    path.write_text("? " + "a" * 100_000 + "\n: [1]\n")
    with pytest.raises(MmtagError, match="unknown grid axis 'aaa") as err:
        load_grid_file(path)
    assert len(str(err.value)) < 1000


def test_slugs_are_safe_and_unique():
    a = run_slug({"text_encoder": "hf:some/model dir", "lr": "1e-4"})
    b = run_slug({"text_encoder": "hf:some_model-dir", "lr": "1e-4"})
    assert a != b and "/" not in a and " " not in a and ":" not in a
    assert a.startswith("text_encoder=hf-some-model-dir-") and a.endswith("_lr=1e-4")
    assert run_slug({"fusion": "concat+mean"}) == "fusion=concat+mean"
    long = run_slug({"model.hidden": "9" * 300})
    assert len(long) <= 120 and long != run_slug({"model.hidden": "9" * 299})


# ------------------------------------------------------------------------------ real sweeps
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny heads train faster on one thread than on cores shared with other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def text_base(make_config):
    return make_config(**{"train.epochs": 5, "model.modalities": ["text"], "model.hidden": 32})


@pytest.fixture
def count_fits(monkeypatch):
    calls = []
    original = Tagger.fit

    def spy(self, *args, **kwargs):
        calls.append(self.config)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Tagger, "fit", spy)
    return calls


def read_table(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_sweep_2x2_text_writes_tables_and_a_usable_best_run(tiny, text_base, tmp_path, count_fits):
    grid = parse_grid("lr=1e-3,3e-3 optimizer=adam,adamw")
    rows = run_sweep(tiny.train_csv, None, tmp_path, text_base, grid, progress=False)
    assert len(count_fits) == 4
    assert [r.config for r in rows] == [{"lr": lr, "optimizer": o} for lr in ("1e-3", "3e-3")
                                        for o in ("adam", "adamw")]
    assert [c.train.lr for c in count_fits] == [1e-3, 1e-3, 3e-3, 3e-3]
    assert [c.train.optimizer for c in count_fits] == ["adam", "adamw", "adam", "adamw"]

    table = read_table(tmp_path / "sweep.csv")
    assert list(table[0]) == ["lr", "optimizer"] + COLUMNS
    assert len(table) == 4 and [t["run"] for t in table] == [r.run for r in rows]
    for t, r in zip(table, rows):
        assert 0 < float(t["samples_f1"]) <= 1 and float(t["model_size_mb"]) > 0
        assert float(t["val_loss"]) > 0 and float(t["train_loss"]) > 0
        assert float(t["samples_f1"]) == pytest.approx(r.samples_f1, abs=1e-4)
    assert {p.name for p in (tmp_path / "runs").iterdir()} == {
        "lr=1e-3_optimizer=adam", "lr=1e-3_optimizer=adamw", "lr=3e-3_optimizer=adam",
        "lr=3e-3_optimizer=adamw"}

    best = best_row(rows)
    md = (tmp_path / "sweep.md").read_text()
    assert md.count("**") == 2 * (2 + len(COLUMNS))  # every cell of one row, the best one
    bold = [line for line in md.splitlines() if "**" in line]
    assert len(bold) == 1 and f"**{best.run}**" in bold[0]
    assert md.rstrip().splitlines()[-1].startswith(
        f"Best configuration: lr={best.config['lr']}, optimizer={best.config['optimizer']} ")
    assert md.rstrip().endswith(f"→ {best.run}")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # val/train loss come from the best epoch of the run's history
    tagger = Tagger.load(best.run)
    epoch, best_f1 = None, -1.0
    for h in tagger.history:  # the rule of train.fit_head: the first clear improvement wins
        if h["val_samples_f1"] > best_f1 + 1e-6:
            epoch, best_f1 = h, h["val_samples_f1"]
    assert best.val_loss == pytest.approx(epoch["val_loss"])
    assert best.train_loss == pytest.approx(epoch["train_loss"])
    preds = tagger.predict(captions=["a photo of a kitten in a quiet park", "a pony on the street"])
    assert len(preds) == 2 and all(len(p.scores) == len(tagger.label_space) for p in preds)


def test_sweep_resumes_only_missing_combinations(tiny, text_base, tmp_path, count_fits):
    first = run_sweep(tiny.train_csv, None, tmp_path, text_base, parse_grid("lr=1e-3 hidden=16,32"),
                      progress=False)
    assert len(count_fits) == 2

    # an interrupted sweep, now with one more value: only the two new combinations train
    grid = parse_grid("lr=1e-3,3e-3 hidden=16,32")
    rows = run_sweep(tiny.train_csv, None, tmp_path, text_base, grid, progress=False)
    assert len(count_fits) == 4
    assert [(c.train.lr, c.model.hidden) for c in count_fits[2:]] == [(3e-3, 16), (3e-3, 32)]
    assert [r.samples_f1 for r in rows[:2]] == pytest.approx([r.samples_f1 for r in first], abs=1e-4)
    assert len(read_table(tmp_path / "sweep.csv")) == 4

    # a deleted run dir, a half-written one (no manifest) and a lost csv row: those three retrain
    shutil.rmtree(rows[0].run)
    (tmp_path / "runs" / "lr=1e-3_hidden=32" / "manifest.json").unlink()
    table = read_table(tmp_path / "sweep.csv")
    with open(tmp_path / "sweep.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(t for t in table if not t["run"].endswith("lr=3e-3_hidden=16"))
    again = run_sweep(tiny.train_csv, None, tmp_path, text_base, grid, progress=False)
    assert len(count_fits) == 7
    assert [(c.train.lr, c.model.hidden) for c in count_fits[4:]] == [(1e-3, 16), (1e-3, 32),
                                                                       (3e-3, 16)]
    assert again[3].samples_f1 == pytest.approx(rows[3].samples_f1, abs=1e-4)
    assert [t["run"] for t in read_table(tmp_path / "sweep.csv")] == [r.run for r in again]

    # everything finished: nothing trains; a changed base configuration retrains
    run_sweep(tiny.train_csv, None, tmp_path, text_base, grid, progress=False)
    assert len(count_fits) == 7
    run_sweep(tiny.train_csv, None, tmp_path, text_base.override({"train.epochs": 4}),
              parse_grid("lr=1e-3 hidden=16"), progress=False)
    assert len(count_fits) == 8
    assert len(read_table(tmp_path / "sweep.csv")) == 1


def test_sweep_rejects_bad_combinations_before_training(tiny, text_base, tmp_path, count_fits):
    for grid, images, needle in [({"modalities": ["text", "image+text"]}, None, "--images"),
                                 ({"lr": ["1e-3", "fast"]}, None, "fast"),
                                 ({"modalities": ["image+text"], "fusion": ["concat", "nope"]},
                                  tiny.images, "fusion=nope: .*unknown fusion head 'nope'"),
                                 ({"text_encoder": ["no-such-encoder"]}, None, "no-such-encoder"),
                                 ({"optimizer": ["sgd"]}, None, "sgd")]:
        with pytest.raises(MmtagError, match=needle):
            run_sweep(tiny.train_csv, images, tmp_path, text_base, grid, progress=False)
    assert count_fits == [] and not (tmp_path / "runs").exists()


def test_the_sweep_ranks_by_the_metric_asked_for_and_says_which(tmp_path):
    from mmtag.jobs.sweep import SweepRow, _write_tables

    def row(lr, samples, micro, macro):
        return SweepRow(config={"lr": lr}, samples_f1=samples, micro_f1=micro, macro_f1=macro,
                        val_loss=0.3, train_loss=0.2, train_s=1.0, model_size_mb=1.0,
                        run=f"runs/lr={lr}")

    rows = [row("1e-4", 0.80, 0.70, 0.40), row("1e-3", 0.75, 0.72, 0.60), row("1e-2", 0.78, 0.74, 0.50)]
    assert best_row(rows) is rows[0] and best_row(rows, "samples") is rows[0]
    assert best_row(rows, "micro") is rows[2] and best_row(rows, "macro") is rows[1]
    grid = {"lr": ["1e-4", "1e-3", "1e-2"]}
    _write_tables(tmp_path, grid, rows, "macro")
    md = (tmp_path / "sweep.md").read_text()
    assert "Best configuration: lr=1e-3 (validation macro F1 0.6000) → runs/lr=1e-3" in md
    assert "Ranked by validation macro F1 (--metric macro)." in md
    assert "| **1e-3** |" in md and (tmp_path / "sweep.png").stat().st_size > 0
    _write_tables(tmp_path, grid, rows)  # the default: sample-F1, said as before
    md = (tmp_path / "sweep.md").read_text()
    assert "(validation samples F1 0.8000) → runs/lr=1e-4" in md and "Ranked by" not in md
