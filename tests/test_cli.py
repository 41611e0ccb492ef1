"""End-to-end through the real `mmtag` entry point (subprocess), on a tiny generated dataset."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def mmtag(*args, cwd=None):
    env = dict(os.environ, MMTAG_CACHE=os.environ.get("MMTAG_TEST_CACHE", ""))
    return subprocess.run([sys.executable, "-m", "mmtag", "-q", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module", autouse=True)
def _cache(cache_dir):
    # the session's feature cache (content-keyed): the tiny dataset's features are computed once
    os.environ["MMTAG_TEST_CACHE"] = cache_dir
    yield
    os.environ.pop("MMTAG_TEST_CACHE", None)


def test_train_evaluate_predict_info(tiny, tmp_path):
    run = tmp_path / "run"
    r = mmtag("train", tiny.train_csv, "--images", tiny.images, "--out", run, "--fusion", "mean",
              "--epochs", "10", "--hidden", "64", "--workers", "0", "--val-frac", "0.2", "--seed", "3",
              "--label-names", "coco")  # the synthetic labels are COCO categories
    assert r.returncode == 0, r.stderr
    assert "validation: samples_f1=" in r.stdout and "model_size_mb" in r.stdout

    r = mmtag("evaluate", run, tiny.holdout_csv, "--images", tiny.images, "--json", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    assert "samples F1 (Mean F1)" in r.stdout and "stop sign" in r.stdout
    m = json.loads((tmp_path / "m.json").read_text())
    assert {"samples_f1", "micro_f1", "macro_f1", "per_class"} <= set(m)

    r = mmtag("predict", run, tiny.test_csv, "--images", tiny.images, "--out", tmp_path / "sub.csv")
    assert r.returncode == 0, r.stderr
    with open(tiny.test_csv, newline="") as fh:
        ids = [row["ImageID"] for row in csv.DictReader(fh)]
    with open(tmp_path / "sub.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["ImageID"] for row in rows] == ids
    assert all(row["Labels"].strip() for row in rows)

    r = mmtag("info", run)
    assert r.returncode == 0 and "model size" in r.stdout and "mean" in r.stdout
    info = json.loads(mmtag("info", run, "--json").stdout)
    assert info["config"]["train"]["seed"] == 3 and info["config"]["data"]["val_frac"] == 0.2


def _write(path, text):
    path.write_bytes(text.encode())
    return path


@pytest.mark.parametrize("content, needle", [
    ('ImageID,Labels,Caption\r\n0.jpg,1,"unterminated\r\n1.jpg,1,ok\r\n', "row 1 (line 2): malformed CSV"),
    ("ImageID,Labels,Caption\r\n0.jpg,1,fine\r\n1.jpg,one,bad\r\n", "row 2 (line 3): label 'one'"),
    ("ImageID,Caption\r\n0.jpg,no labels\r\n", "no column 'Labels' (found: ImageID, Caption); pass --labels-col NAME"),
    ("ImageID,Labels,Caption\r\n0.jpg,1,\r\n", "row 1 (line 2): Caption is empty"),
    ("ImageID,Labels,Caption\r\n../0.jpg,1,x\r\n", "outside the images directory"),
])
def test_bad_csv_is_one_line_error(tiny, tmp_path, content, needle):
    csv_path = _write(tmp_path / "bad.csv", content)
    r = mmtag("train", csv_path, "--images", tiny.images, "--out", tmp_path / "run", "--modalities", "text")
    assert r.returncode == 2
    assert needle in r.stderr and str(csv_path) in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_missing_image_strict_then_skip_bad(tiny, tmp_path):
    lines = tiny.train_csv.read_text().splitlines()
    content = "\r\n".join(lines[:40] + ["nope.jpg,13,a photo of the city"] + lines[40:]) + "\r\n"
    csv_path = _write(tmp_path / "t.csv", content)
    r = mmtag("train", csv_path, "--images", tiny.images, "--out", tmp_path / "run", "--epochs", "2",
              "--hidden", "32", "--workers", "0")
    assert r.returncode == 2 and "row 40" in r.stderr and "nope.jpg" in r.stderr and "not found" in r.stderr
    r = mmtag("train", csv_path, "--images", tiny.images, "--out", tmp_path / "run", "--epochs", "2",
              "--hidden", "32", "--workers", "0", "--skip-bad", "--folds", "2")
    assert r.returncode == 0, r.stderr
    assert "skipped 1 bad row" in r.stderr and "nope.jpg" in r.stderr


def test_unknown_fusion_and_missing_run(tiny, tmp_path):
    r = mmtag("train", tiny.train_csv, "--images", tiny.images, "--out", tmp_path / "r", "--fusion", "nope")
    assert r.returncode == 2 and "unknown fusion head 'nope'" in r.stderr
    r = mmtag("info", tmp_path / "missing")
    assert r.returncode == 2 and "not found" in r.stderr


def test_ablate_cli_and_union_info(tiny, tmp_path):
    r = mmtag("ablate", tiny.train_csv, "--images", tiny.images, "--out", tmp_path / "ab",
              "--variants", "text,union", "--folds", "2")
    assert r.returncode == 0, r.stderr
    assert "| union |" in r.stdout or "| **union** |" in r.stdout
    assert (tmp_path / "ab" / "ablation.csv").is_file()
    r = mmtag("info", tmp_path / "ab" / "runs" / "union")
    assert r.returncode == 0, r.stderr
    assert "union/global image" in r.stdout and "union/global text" in r.stdout


def test_sweep_cli(tiny, tmp_path):
    r = mmtag("sweep", tiny.train_csv, "--out", tmp_path / "sw", "--grid",
              "modalities=text lr=1e-3,3e-3 epochs=3", "--folds", "2")
    assert r.returncode == 0, r.stderr
    assert "Best configuration" in r.stdout and (tmp_path / "sw" / "sweep.png").is_file()
    best = r.stdout.strip().splitlines()[-1].split(": ", 1)[1]
    r = mmtag("predict", best, tiny.test_csv, "--out", tmp_path / "s.csv")
    assert r.returncode == 0, r.stderr
    r = mmtag("sweep", tiny.train_csv, "--out", tmp_path / "sw2")
    assert r.returncode == 2 and "exactly one of --grid" in r.stderr


def test_check_exit_codes(tiny, tmp_path):
    r = mmtag("check", tiny.train_csv, "--images", tiny.images)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout and "rows per label" in r.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text("ImageID,Labels,Caption\n../etc/passwd,1,escape\nmissing.jpg,1,a cat\n")
    r = mmtag("check", bad, "--images", tiny.images)
    assert r.returncode == 1
    assert "bad rows: 1" in r.stdout and "missing images: 1" in r.stdout and "2 problem(s)" in r.stdout


# ------------------------------------------ bad flags and degenerate data: one line, before work
# These drive `mmtag.cli.main` in-process: exit code 2, exactly one stderr line, and no work done
# (no run directory, nothing in the feature cache).
from mmtag import api, cli  # noqa: E402
from mmtag.data import train_val_split  # noqa: E402


def _main(capsys, *args):
    """Exit code and stderr lines of `mmtag -q ARGS` run in this process."""
    try:
        code = cli.main(["-q", *map(str, args)])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def small_csv(tiny, tmp_path):
    """The first 12 rows of the tiny dataset: real work would be quick, but still visible."""
    lines = tiny.train_csv.read_text().splitlines()
    return _write(tmp_path / "small.csv", "\r\n".join(lines[:13]) + "\r\n")


def _train_args(csv_path, tiny, tmp_path, *extra):
    return ["train", csv_path, "--images", tiny.images, "--out", tmp_path / "run", "--epochs", "1",
            "--hidden", "16", "--workers", "0", "--cache-dir", tmp_path / "cache", *extra]


def _no_work(tmp_path):
    cache = tmp_path / "cache"
    return not (tmp_path / "run").exists() and not (cache.exists() and any(cache.rglob("*")))


@pytest.mark.parametrize("flag, value, dotted, valid", [
    ("--val-frac", "0", "data.val_frac", "a number in (0, 1)"),
    ("--val-frac", "1.5", "data.val_frac", "a number in (0, 1)"),
    ("--batch-size", "0", "train.batch_size", "an integer >= 1"),
    ("--lr", "-1", "train.lr", "a finite number > 0"),
    ("--lr", "nan", "train.lr", "a finite number > 0"),
    ("--lr", "inf", "train.lr", "a finite number > 0"),
    ("--workers", "-1", "data.workers", "an integer >= 0"),
    ("--epochs", "0", "train.epochs", "an integer >= 1"),
    ("--patience", "-1", "train.patience", "an integer >= 0"),
    ("--hidden", "0", "model.hidden", "an integer >= 1"),
    ("--seed", "-1", "train.seed", "an integer in [0, 4294967295]"),
    ("--aug-views", "-1", "augment.views", "an integer >= 0"),
    ("--pseudo-rounds", "-1", "pseudo.rounds", "an integer >= 0"),
    ("--pseudo-confidence", "0.3", "pseudo.confidence", "a number in (0.5, 1)"),
    ("--ft-epochs", "0", "finetune.epochs", "an integer >= 1"),
    ("--ft-lr", "0", "finetune.lr", "a finite number > 0"),
    ("--ft-head-lr", "-0.001", "finetune.head_lr", "a finite number > 0"),
    ("--ft-batch-size", "0", "finetune.batch_size", "an integer >= 1"),
    ("--unfreeze-blocks", "-1", "finetune.unfreeze_blocks", "an integer >= 0"),
    ("--ft-top-layers", "-1", "finetune.top_layers", "an integer >= 0"),
])
def test_out_of_range_flag_is_one_line_before_any_work(capsys, tiny, small_csv, tmp_path, flag,
                                                      value, dotted, valid):
    code, err = _main(capsys, *_train_args(small_csv, tiny, tmp_path, flag, value))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"mmtag: error: {flag} ({dotted}) must be {valid}, got ")
    assert _no_work(tmp_path)


def _registry_names(kind):
    from mmtag.encoders import registry as encoders
    from mmtag import heads as fusion
    from mmtag.training import losses
    from mmtag.decision import thresholds

    return {
        "fusion": sorted(fusion.HEADS),
        "loss": list(losses.LOSSES),
        "thresholds": list(thresholds.TUNERS),
        "image": encoders.encoder_names("image"),
        "text": encoders.encoder_names("text"),
        "modalities": ["image", "text"],
        "optimizer": ["adam", "adamw"],
        "image-aug": ["crop", "flip"],
        "text-aug": ["synonyms:N"],
    }[kind]


@pytest.mark.parametrize("flag, value, dotted, kind", [
    ("--modalities", "audio", "model.modalities", "modalities"),
    ("--modalities", "image,audio", "model.modalities", "modalities"),
    ("--modalities", "text,text", "model.modalities", "modalities"),
    ("--fusion", "nope", "model.fusion", "fusion"),
    ("--loss", "hinge", "train.loss", "loss"),
    ("--optimizer", "sgd", "train.optimizer", "optimizer"),
    ("--ft-optimizer", "sgd", "finetune.optimizer", "optimizer"),
    ("--thresholds", "median", "train.thresholds", "thresholds"),  # the older spelling, as given
    ("--decision", "median", "train.thresholds", "thresholds"),
    ("--image-encoder", "resnet-9000", "model.image_encoder", "image"),
    ("--image-encoder", "minilm-l6", "model.image_encoder", "image"),  # a text encoder
    ("--text-encoder", "timm:resnet18", "model.text_encoder", "text"),  # an image family
    ("--image-aug", "rotate", "augment.image", "image-aug"),
    ("--text-aug", "shuffle:2", "augment.text", "text-aug"),
])
def test_unknown_name_lists_the_valid_ones_before_any_work(capsys, tiny, small_csv, tmp_path, flag,
                                                          value, dotted, kind):
    code, err = _main(capsys, *_train_args(small_csv, tiny, tmp_path, flag, value))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"mmtag: error: {flag} ({dotted})")
    for name in _registry_names(kind):
        assert name in err[0], (name, err[0])
    assert _no_work(tmp_path)


@pytest.mark.parametrize("yaml_text, needle", [
    ("train:\n  lr: -1\n", "train.lr must be a finite number > 0, got -1.0"),
    ("model:\n  modalities: [audio]\n", "model.modalities: unknown modality 'audio'; available: image, text"),
    ("data:\n  val_frac: 1\n", "data.val_frac must be a number in (0, 1), got 1.0"),
    ("data:\n  skip_bad: maybe\n", "data.skip_bad must be true or false, got 'maybe'"),
    ("train:\n  epochs: 2.5\n", "train.epochs must be an integer, got 2.5"),
    ("device: gpu\n", "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
])
def test_bad_config_file_value_is_one_line_naming_file_and_option(capsys, tiny, small_csv, tmp_path,
                                                                   yaml_text, needle):
    cfg = _write(tmp_path / "c.yaml", yaml_text)
    code, err = _main(capsys, *_train_args(small_csv, tiny, tmp_path, "--config", cfg))
    assert code == 2 and len(err) == 1, err
    assert err[0] == f"mmtag: error: {cfg}: {needle}"
    assert _no_work(tmp_path)


@pytest.mark.parametrize("flag, value, problem", [
    ("--max-upload-mb", "0", "must be a finite number > 0, got 0.0"),
    ("--max-side", "0", "must be an integer >= 1, got 0"),
    ("--max-batch", "-5", "must be an integer >= 1, got -5"),
    ("--timeout", "nan", "must be a finite number > 0, got nan"),
    ("--port", "70000", "must be an integer in [0, 65535], got 70000"),
])
def test_bad_serve_flag_is_one_line_before_loading(capsys, tmp_path, flag, value, problem):
    # the run does not exist: the flag is refused before anything is loaded
    code, err = _main(capsys, "serve", tmp_path / "no-run", flag, value)
    assert code == 2 and err == [f"mmtag serve: error: argument {flag}: {problem} "
                                 "(see 'mmtag serve --help')"]


def test_argparse_errors_are_one_line(capsys):
    code, err = _main(capsys, "train", "--epochs", "many")
    assert code == 2 and err == ["mmtag train: error: argument --epochs: invalid int value: 'many' "
                                 "(see 'mmtag train --help')"]
    code, err = _main(capsys, "nope")
    assert code == 2 and len(err) == 1 and "invalid choice: 'nope'" in err[0]


def _rows(*labels):
    return "ImageID,Labels,Caption\r\n" + "".join(
        f"{i}.jpg,{lab},a photo number {i} of something\r\n" for i, lab in enumerate(labels))


@pytest.mark.parametrize("labels, needle", [
    (["1"] * 6, "a multi-label tagger needs at least 2 distinct labels; every row has label 1"),
    (["1"], "1 labelled row; training needs at least 2 (1 to train on, 1 to validate on)"),
])
def test_degenerate_dataset_is_refused_before_features(capsys, tiny, tmp_path, labels, needle):
    csv_path = _write(tmp_path / "d.csv", _rows(*labels))
    code, err = _main(capsys, *_train_args(csv_path, tiny, tmp_path, "--modalities", "text"))
    assert code == 2 and err == [f"mmtag: error: {csv_path}: {needle}"]
    cache = tmp_path / "cache"
    assert not (cache.exists() and any(cache.rglob("*"))) and not (tmp_path / "run" / "manifest.json").exists()


def test_too_few_rows_left_after_skip_bad_is_one_line(capsys, tiny, tmp_path):
    csv_path = _write(tmp_path / "d.csv", "ImageID,Labels,Caption\r\n0.jpg,1,a man\r\nmissing.jpg,3,a car\r\n")
    code, err = _main(capsys, *_train_args(csv_path, tiny, tmp_path, "--skip-bad"))
    assert code == 2 and len(err) == 1, err
    assert "1 labelled row left after --skip-bad dropped 1; training needs at least 2" in err[0]


def test_one_label_in_the_training_split_trains_and_evaluates(capsys, tiny, tmp_path):
    # Two labels in the file, but the only row with label 3 is the validation row: the model's
    # label space has one class. Metrics must be correct (not sklearn's binary reading) and not crash.
    n = 8
    labels = ["1"] * n
    labels[int(train_val_split(n, 0.1, 0)[1][0])] = "1 3"
    csv_path = _write(tmp_path / "d.csv", _rows(*labels))
    code, err = _main(capsys, *_train_args(csv_path, tiny, tmp_path, "--modalities", "text",
                                           "--epochs", "3"))
    assert code == 0, err
    eval_csv = _write(tmp_path / "e.csv", _rows(*["1"] * 4))
    code, err = _main(capsys, "evaluate", tmp_path / "run", eval_csv, "--json", tmp_path / "m.json",
                      "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    m = json.loads((tmp_path / "m.json").read_text())
    assert [c["label"] for c in m["per_class"]] == [1] and m["per_class"][0]["support"] == 4


def test_single_class_metrics_are_multilabel_scores():
    import numpy as np

    from mmtag.decision.metrics import compute

    y_true = np.array([[1], [1], [0], [1]])
    y_pred = np.array([[1], [0], [0], [1]])
    m = compute(y_true, y_pred, (1,), ("person",))
    # samples F1 averages rows: 1, 0, 0 (nothing true, nothing predicted), 1
    assert m.samples_f1 == pytest.approx(0.5)
    # micro/macro over the one label: precision 2/2, recall 2/3 -> F1 0.8 (not accuracy-like 0.857)
    assert m.micro_f1 == pytest.approx(0.8) and m.macro_f1 == pytest.approx(0.8)
    assert (m.per_class[0].precision, m.per_class[0].recall, m.per_class[0].support) == (1.0, pytest.approx(2 / 3), 3)


def test_ablate_checks_every_variant_before_training_the_first(capsys, tiny, tmp_path):
    code, err = _main(capsys, "ablate", tiny.train_csv, "--images", tiny.images, "--out", tmp_path / "ab",
                      "--variants", "text,nope", "--cache-dir", tmp_path / "cache")
    assert code == 2 and len(err) == 1, err
    assert "argument --variants: unknown fusion head 'nope'; available: concat," in err[0]
    assert not (tmp_path / "ab").exists() and not (tmp_path / "cache").exists()


def test_folds_and_stack_flags_take_auto_and_a_negation(capsys):
    from mmtag.cli import build_parser

    args = build_parser().parse_args(["train", "t.csv", "--folds", "auto", "--no-stack"])
    assert args.folds == "auto" and args.stack is False
    args = build_parser().parse_args(["train", "t.csv", "--folds", "3", "--stack"])
    assert args.folds == 3 and args.stack is True
    args = build_parser().parse_args(["train", "t.csv"])
    assert args.folds is None and args.stack is None  # the config's auto decides
    code, err = _main(capsys, "train", "t.csv", "--folds", "many")
    assert code == 2 and "argument --folds: must be auto or an integer, got 'many'" in err[-1]


# --------------------------------------------------- start-up, help, and one meaning per word
def _python(code, **kwargs):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          **kwargs)


def test_help_and_version_do_not_import_the_library():
    # what makes `mmtag --help` fast: nothing heavy is imported to parse a command line or to
    # print the top-level help, a command's help without registry names, or the version
    code = """
import contextlib, io, sys
from mmtag import cli
for argv in (["--help"], ["--version"], ["evaluate", "--help"], ["info", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            cli.main(argv)
        except SystemExit as exc:
            assert exc.code == 0, (argv, exc.code)
    assert out.getvalue().strip(), argv
cli.build_parser().parse_args(["train", "t.csv", "--fusion", "mean", "-q"])
print(sorted(m for m in ("torch", "transformers", "sklearn", "mmtag.api") if m in sys.modules))
"""
    r = _python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_public_names_still_import_from_the_package():
    r = _python("import sys, mmtag\nassert 'torch' not in sys.modules\n"
                "from mmtag import Tagger, Config, MmtagError, DataError, Prediction, __version__\n"
                "print(Tagger.__name__, Config.__name__, issubclass(DataError, MmtagError))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["Tagger", "Config", "True"]


def test_version():
    import mmtag

    r = _python("from mmtag import cli; cli.main(['--version'])")
    assert r.returncode == 0 and r.stdout == f"mmtag {mmtag.__version__}\n"


@pytest.mark.parametrize("argv, quiet, verbose", [
    (["-q", "train", "t.csv"], True, False),
    (["train", "-q", "t.csv"], True, False),
    (["train", "t.csv", "--quiet"], True, False),
    (["-v", "demo"], False, True),
    (["demo", "-v"], False, True),
    (["-q", "demo", "-v"], True, True),  # given before the command, not reset after it
    (["demo"], False, False),
])
def test_quiet_and_verbose_before_or_after_the_command(argv, quiet, verbose):
    args = cli.build_parser().parse_args(argv)
    assert (args.quiet, args.verbose) == (quiet, verbose)


def test_out_defaults():
    import re
    from pathlib import Path

    parse = cli.build_parser().parse_args
    assert parse(["predict", "run", "t.csv"]).out == Path("submission.csv")
    # ablate and sweep, like train, write to a new dated directory under runs/
    assert parse(["ablate", "t.csv", "--images", "i"]).out is None
    assert parse(["sweep", "t.csv", "--grid", "lr=1e-3"]).out is None
    assert re.fullmatch(r"runs/sweep-\d{8}-\d{6}", cli._dated_dir("sweep").as_posix())


def _subcommands():
    import argparse

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_says_what_it_does_and_commands_show_examples():
    for name, p in _subcommands().items():
        assert p.epilog and "examples:" in p.epilog and f"mmtag {name}" in p.epilog, name
        for action in p._actions:
            assert action.help and action.help.strip(), (name, action.dest)


def test_help_lists_the_registered_names(capsys):
    from mmtag import registries
    from mmtag.encoders import registry as encoders

    for argv, names in ((["ablate", "--help"], registries.names("fusion head")),
                        (["train", "--help"], registries.names("loss") + registries.names("optimizer")
                         + registries.names("threshold mode") + list(encoders.ENCODERS))):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 0
        out = " ".join(capsys.readouterr().out.split())  # unwrapped
        for n in names:
            assert n in out, (argv, n)


def test_unknown_modality_is_named_not_asked_for_images(capsys, tmp_path):
    csv_path = _write(tmp_path / "t.csv", _rows("1", "2", "1 2"))
    code, err = _main(capsys, "train", csv_path, "--modalities", "txt", "--out", tmp_path / "run")
    assert code == 2 and err == ["mmtag: error: --modalities (model.modalities): unknown modality "
                                 "'txt'; available: image, text"]
    assert not (tmp_path / "run").exists()


def test_info_is_a_readable_table(capsys, fused_run):
    assert cli.main(["info", str(fused_run)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if not line.startswith(" ")]  # wrapped lines aside
    assert [r.split("  ")[0].strip() for r in rows] == [
        "run", "head", "image encoder", "text encoder", f"labels ({len(api.info(fused_run)['labels']['ids'])})",
        "thresholds", "validation", "optimised for", "settings", "model size"]
    # plain words and numbers: no Python dict or list printed as it is
    assert not any(c in out for c in "{}[]'"), out
    assert "concat (hidden 128; inputs: image 1280, text 384)" in out
    assert "model.fusion=concat" in out and "train.epochs=40" in out
    assert "sample-F1 (--metric samples)" in out  # the default metric, said


def test_info_json_to_a_closed_pipe_exits_quietly(fused_run):
    # `mmtag info RUN --json | head -1`: the reader is gone before mmtag writes. The pipe's read
    # end is closed here first, so the write fails every time, not only when the reader is quick.
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run([sys.executable, "-m", "mmtag", "info", str(fused_run), "--json"],
                           stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert r.returncode == 141 and r.stderr == ""


def test_info_json_to_stdout_or_to_a_file(capsys, fused_run, tmp_path):
    expected = json.loads(json.dumps(api.info(fused_run)))
    assert cli.main(["info", str(fused_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == expected  # stdout is the JSON alone
    assert cli.main(["info", "--json", str(fused_run)]) == 0  # the older order
    assert json.loads(capsys.readouterr().out) == expected
    assert cli.main(["info", str(fused_run), "--json", str(tmp_path / "i.json")]) == 0
    assert capsys.readouterr().out == f"run information written to {tmp_path / 'i.json'}\n"
    assert json.loads((tmp_path / "i.json").read_text()) == expected


def test_evaluate_json_to_a_file_or_to_stdout(capsys, fused_run, tiny, cache_dir, tmp_path):
    common = ["evaluate", str(fused_run), str(tiny.holdout_csv), "--images", str(tiny.images),
              "--cache-dir", cache_dir]
    assert cli.main([*common, "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "samples F1 (Mean F1)" in out and f"metrics written to {tmp_path / 'm.json'}" in out
    written = json.loads((tmp_path / "m.json").read_text())
    for tail in (["--json"], ["--json", "-"]):
        assert cli.main([*common, *tail]) == 0
        assert json.loads(capsys.readouterr().out) == written  # the JSON alone, no table


# ------------------------------------------------------- one source per option (config fields)
def test_every_declared_flag_is_a_train_option_that_maps_back_to_its_key():
    from mmtag.config import flags

    parser = cli.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    by_flag = {name: action for action in train._actions for name in action.option_strings}
    for key, flag in flags().items():
        assert by_flag[flag.name].dest == flag.dest, key
        assert "{default}" not in flag.help and "default:" in flag.help, key
        given = ([] if flag.kind in ("switch", "toggle")
                 else [flag.choices[-1] if flag.choices else "3"])
        args = parser.parse_args(["train", "t.csv", flag.name, *given])
        values = cli._config_values(args)
        assert values[key] is not None and values[key] == flag.value(getattr(args, flag.dest)), key
        assert [k for k, v in values.items() if v is not None] == [key]


def test_adding_a_train_option_is_one_config_field(monkeypatch, capsys, tmp_path):
    import dataclasses

    from mmtag import config

    @dataclasses.dataclass
    class Toy:
        width: int = config.option(3, config.AT_LEAST_1, "--toy-width", metavar="N",
                                   help="how wide the toy is")

    @dataclasses.dataclass
    class WithToy(config.Config):
        toy: Toy = dataclasses.field(default_factory=Toy)

    # the tree is the only thing replaced: the flag, its help, its default and its mapping back
    # come from the field
    monkeypatch.setattr(config, "Config", WithToy)
    monkeypatch.setattr(cli, "Config", WithToy)
    trained = {}

    def fake_train(csv, images, out, cfg, **kwargs):
        trained["config"] = cfg
        return None, None, {}

    monkeypatch.setattr(api, "train", fake_train)
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "--toy-width N" in capsys.readouterr().out.replace("\n", " ")
    help_text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["train"]
                         .format_help().split())
    assert "--toy-width N how wide the toy is (default: 3)" in help_text
    code, err = _main(capsys, "train", tmp_path / "t.csv", "--modalities", "text", "--toy-width", "7",
                      "--out", tmp_path / "run")
    assert code == 0, err
    assert trained["config"].toy.width == 7 and trained["config"].to_dict()["toy"] == {"width": 7}
    code, err = _main(capsys, "train", tmp_path / "t.csv", "--toy-width", "0")
    assert code == 2 and err == ["mmtag: error: --toy-width (toy.width) must be an integer >= 1, got 0"]


# ------------------------------------------------------------ what the README promises, pinned
def test_train_without_out_writes_runs_mmtag_date_time(monkeypatch, capsys, tmp_path):
    trained = {}
    monkeypatch.setattr(api, "train", lambda csv, images, out, cfg, **kw: (
        trained.setdefault("out", out), None, None, {})[1:])
    monkeypatch.chdir(tmp_path)
    code, err = _main(capsys, "train", "t.csv", "--modalities", "text")
    assert code == 0, err
    out = trained["out"]
    assert out.parent == Path("runs") and re.fullmatch(r"mmtag-\d{8}-\d{6}", out.name), out


def test_preset_prints_its_substitutions(monkeypatch, capsys, caplog):
    trained = {}
    monkeypatch.setattr(api, "train", lambda csv, images, out, cfg, **kw: (
        trained.setdefault("config", cfg), None, None, {})[1:])
    # neither timm nor the BERT-tiny checkpoint is installed by `make setup`: both substitute
    with caplog.at_level("WARNING", logger="mmtag"):
        code, err = _main(capsys, "train", "--preset", "effnet-berttiny-fm3", "t.csv", "--out", "r")
    assert code == 0, err
    said = caplog.text + "\n".join(err)
    assert "timm:efficientnet_b4 is not available here; using efficientnet-lite2 instead" in said
    assert "timm:efficientnet_b4 -> efficientnet-lite2" in trained["config"].substitutions


def test_evaluate_report_writes_the_html_report(capsys, fused_run, tiny, tmp_path):
    report = tmp_path / "holdout.html"
    code, err = _main(capsys, "evaluate", fused_run, tiny.holdout_csv, "--images", tiny.images,
                      "--report", report)
    assert code == 0, err
    html = report.read_text(encoding="utf-8")
    assert html.startswith("<!doctype html>") and f"on {tiny.holdout_csv.name}</title>" in html
