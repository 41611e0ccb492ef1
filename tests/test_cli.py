"""End-to-end through the real `mmtag` entry point (subprocess), on a tiny generated dataset."""
import csv
import json
import os
import subprocess
import sys

import pytest


def mmtag(*args, cwd=None):
    env = dict(os.environ, MMTAG_CACHE=os.environ.get("MMTAG_TEST_CACHE", ""))
    return subprocess.run([sys.executable, "-m", "mmtag", "-q", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    os.environ["MMTAG_TEST_CACHE"] = str(tmp_path_factory.mktemp("clicache"))
    yield
    os.environ.pop("MMTAG_TEST_CACHE", None)


def test_train_evaluate_predict_info(tiny, tmp_path):
    run = tmp_path / "run"
    r = mmtag("train", tiny.train_csv, "--images", tiny.images, "--out", run, "--fusion", "mean",
              "--epochs", "10", "--hidden", "64", "--workers", "0", "--val-frac", "0.2", "--seed", "3")
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
    assert r.returncode == 0 and "model_size_mb" in r.stdout and "mean" in r.stdout
    info = json.loads(mmtag("info", run, "--json").stdout)
    assert info["config"]["train"]["seed"] == 3 and info["config"]["data"]["val_frac"] == 0.2


def _write(path, text):
    path.write_bytes(text.encode())
    return path


@pytest.mark.parametrize("content, needle", [
    ('ImageID,Labels,Caption\r\n0.jpg,1,"unterminated\r\n1.jpg,1,ok\r\n', "row 1 (line 2): malformed CSV"),
    ("ImageID,Labels,Caption\r\n0.jpg,1,fine\r\n1.jpg,one,bad\r\n", "row 2 (line 3): label 'one'"),
    ("ImageID,Caption\r\n0.jpg,no labels\r\n", "missing column(s) Labels"),
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
              "--hidden", "32", "--workers", "0", "--skip-bad")
    assert r.returncode == 0, r.stderr
    assert "skipped 1 bad row" in r.stderr and "nope.jpg" in r.stderr


def test_unknown_fusion_and_missing_run(tiny, tmp_path):
    r = mmtag("train", tiny.train_csv, "--images", tiny.images, "--out", tmp_path / "r", "--fusion", "nope")
    assert r.returncode == 2 and "unknown fusion head 'nope'" in r.stderr
    r = mmtag("info", tmp_path / "missing")
    assert r.returncode == 2 and "not found" in r.stderr


def test_ablate_cli_and_union_info(tiny, tmp_path):
    r = mmtag("ablate", tiny.train_csv, "--images", tiny.images, "--out", tmp_path / "ab",
              "--variants", "text,union")
    assert r.returncode == 0, r.stderr
    assert "| union |" in r.stdout or "| **union** |" in r.stdout
    assert (tmp_path / "ab" / "ablation.csv").is_file()
    r = mmtag("info", tmp_path / "ab" / "runs" / "union")
    assert r.returncode == 0, r.stderr
    assert "union/global image" in r.stdout and "union/global text" in r.stdout


def test_sweep_cli(tiny, tmp_path):
    r = mmtag("sweep", tiny.train_csv, "--out", tmp_path / "sw", "--grid",
              "modalities=text lr=1e-3,3e-3 epochs=3")
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
