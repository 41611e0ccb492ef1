"""Processes and devices: sharding arithmetic, device selection, and real 2-process torchrun runs
(gloo on CPU) compared with the single-process run."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmtag import dist
from mmtag.errors import MmtagError
from mmtag.heads import HEADS, FeatureBatch, create_head, head_needs
from mmtag.data.synthetic import SyntheticPaths, make_dataset
from mmtag.training.loop import _loss


@pytest.mark.parametrize("n", [0, 1, 2, 7, 13, 100])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_cover_every_row_exactly_once(n: int, world: int) -> None:
    shards = [dist.Context(rank=r, world=world).shard(n) for r in range(world)]
    assert np.array_equal(np.concatenate(shards), np.arange(n))  # in order, no padding
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_local_batches_and_loss_scale_reproduce_the_global_mean() -> None:
    batch = np.arange(7)
    parts = []
    for r in range(2):
        dist._context = dist.Context(rank=r, world=2)
        parts.append(dist.local_batch(batch))
    try:
        assert sorted(np.concatenate(parts).tolist()) == batch.tolist()
        # rank means weighted by loss_scale, then averaged as DDP does = the global mean
        x = np.random.default_rng(0).normal(size=7)
        dist._context = dist.Context(rank=0, world=2)
        ddp = np.mean([x[p].mean() * dist.loss_scale(len(p), len(batch)) for p in parts])
        assert ddp == pytest.approx(x.mean())
    finally:
        dist._context = dist.Context()


def test_device_selection() -> None:
    assert dist.resolve_device("cpu") == torch.device("cpu")
    assert dist.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "cuda:-1", "tpu"):
        with pytest.raises(MmtagError, match="--device"):
            dist.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(MmtagError, match="CUDA is not available"):
            dist.resolve_device("cuda")
        with pytest.raises(MmtagError, match="CUDA is not available"):
            dist.resolve_device("cuda:1")
    assert dist.backend_for(torch.device("cpu")) == "gloo"
    assert dist.backend_for(torch.device("cuda", 0)) == "nccl"


def test_amp_is_autocast_on_cuda_only(caplog: pytest.LogCaptureFixture) -> None:
    # The CUDA path is built (not entered) here: the object must be a CUDA fp16 autocast.
    gpu = dist.Context(device=torch.device("cuda", 0), amp=True).autocast()
    assert isinstance(gpu, torch.autocast) and gpu.device == "cuda" and gpu.fast_dtype == torch.float16
    cpu = dist.Context(device=torch.device("cpu"), amp=True).autocast()
    assert not isinstance(cpu, torch.autocast)
    with caplog.at_level("WARNING", logger="mmtag"):
        ctx = dist.setup("cpu", amp=True)
    assert not ctx.amp and "no effect" in caplog.text and not ctx.distributed


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_uses_all_its_parameters(name: str) -> None:
    """DDP runs without find_unused_parameters; a head with an unused parameter would hang it."""
    torch.manual_seed(0)
    dims = {"image": 16, "image_tokens": 16, "text": 8}
    needs = head_needs(name)
    head = create_head(name, {k: dims[k] for k in needs}, 3, hidden=8)
    batch = FeatureBatch({k: torch.randn(4, 49, 16) if k == "image_tokens" else torch.randn(4, dims[k])
                            for k in needs})
    _loss(head, batch, torch.ones(4, 3), torch.nn.BCEWithLogitsLoss()).backward()
    assert [n for n, p in head.named_parameters() if p.requires_grad and p.grad is None] == []


# ---------------------------------------------------------------------------- torchrun
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--standalone"]


def _mmtag(args: list[str], *, nproc: int, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    launcher = [sys.executable] if nproc == 1 else TORCHRUN
    cmd = launcher + ["-m", "mmtag", "-q"] + args
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> SyntheticPaths:
    # 13 test rows: shards of 6 and 7, so uneven shards are covered
    return make_dataset(tmp_path_factory.mktemp("dd"), n_train=300, n_holdout=41, n_test=13,
                        size=96, seed=2)


def test_torchrun_train_and_predict_match_single_process(data: SyntheticPaths, tmp_path: Path) -> None:
    # Dropout off: with it, ranks draw their own masks, so runs differ by more than float order.
    # one concat head on the val_frac split, the setting this comparison was calibrated on; one
    # global threshold, since auto's choice of rule is discrete and float-order differences
    # between the runs may tip it, which says nothing about the training being compared
    (tmp_path / "cfg.yaml").write_text("model:\n  dropout: 0.0\n  hidden: 64\n  fusion: concat\n"
                                       "train:\n  epochs: 30\n  patience: 10\n  batch_size: 64\n"
                                       "  folds: 1\n  thresholds: global\n"
                                       "data:\n  workers: 0\n  val_frac: 0.3\n")
    common = [str(data.train_csv), "--images", str(data.images), "--config", "cfg.yaml"]
    one = _mmtag(["train", *common, "--out", "one", "--cache-dir", "c1"], nproc=1, cwd=tmp_path)
    two = _mmtag(["train", *common, "--out", "two", "--cache-dir", "c2"], nproc=2, cwd=tmp_path)
    assert "(2 processes)" in two.stdout and two.stdout.count("run saved to") == 1  # rank 0 speaks

    f1 = {r: json.loads((tmp_path / r / "metrics.json").read_text())["validation"]["samples_f1"]
          for r in ("one", "two")}
    assert abs(f1["one"] - f1["two"]) <= 0.01, f1
    # each rank extracted its half into the cache: both halves are there, nothing twice
    shards = list((tmp_path / "c2").rglob("*.safetensors"))
    assert shards and not list((tmp_path / "two").glob("checkpoints"))

    # the same bundle predicted by 1 and by 2 processes: identical submissions, every row once
    for nproc, out in ((1, "p1.csv"), (2, "p2.csv")):
        _mmtag(["predict", "one", str(data.test_csv), "--images", str(data.images), "--out", out,
                "--cache-dir", f"pc{nproc}"], nproc=nproc, cwd=tmp_path)
    p1, p2 = ((tmp_path / p).read_text() for p in ("p1.csv", "p2.csv"))
    assert p1 == p2
    with open(data.test_csv, newline="") as fh:
        ids = [row["ImageID"] for row in csv.DictReader(fh)]
    assert [line.split(",")[0] for line in p2.splitlines()[1:]] == ids

    # and evaluation counts each holdout row once (n=41, not padded to 42)
    for nproc in (1, 2):
        _mmtag(["evaluate", "one", str(data.holdout_csv), "--images", str(data.images),
                "--json", f"m{nproc}.json", "--cache-dir", f"pc{nproc}"], nproc=nproc, cwd=tmp_path)
    m1, m2 = (json.loads((tmp_path / f"m{n}.json").read_text()) for n in (1, 2))
    assert m1 == m2 and m2["n"] == 41


def test_torchrun_refuses_commands_that_do_not_shard(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(TORCHRUN + ["-m", "mmtag", "encoders"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "does not run under torchrun" in proc.stderr


def test_a_bad_image_on_one_rank_stops_both_with_its_message(data: SyntheticPaths, tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(data.images, images)
    with open(data.test_csv, newline="") as fh:
        last = list(csv.DictReader(fh))[-1]["ImageID"]  # in rank 1's shard
    (images / last).write_bytes(b"not an image")
    (tmp_path / "cfg.yaml").write_text("train:\n  epochs: 2\n  folds: 1\ndata:\n  workers: 0\n")
    _mmtag(["train", str(data.train_csv), "--images", str(data.images), "--config", "cfg.yaml",
            "--out", "run", "--cache-dir", "c"], nproc=1, cwd=tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(TORCHRUN + ["-m", "mmtag", "-q", "predict", "run", str(data.test_csv),
                                      "--images", str(images), "--out", "p.csv", "--cache-dir", "c"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert last in proc.stderr and "another rank failed" in proc.stderr  # rank 0 names rank 1's row
    assert not (tmp_path / "p.csv").exists()


def test_torchrun_two_stage_finetuning_runs_under_ddp(data: SyntheticPaths, tmp_path: Path) -> None:
    """Stage one (text encoder fine-tuning) under DDP, then the head: a loadable bundle whose
    fine-tuned text encoder is a new one (its own weight hash)."""
    (tmp_path / "cfg.yaml").write_text(
        "model:\n  modalities: [text]\n  hidden: 32\ntrain:\n  epochs: 3\n"
        "finetune:\n  modalities: [text]\n  epochs: 1\n  batch_size: 32\ndata:\n  workers: 0\n")
    proc = _mmtag(["train", str(data.train_csv), "--config", "cfg.yaml", "--out", "ft",
                   "--cache-dir", "c"], nproc=2, cwd=tmp_path)
    assert proc.stdout.count("run saved to") == 1
    manifest = json.loads((tmp_path / "ft" / "manifest.json").read_text())
    assert "finetuned_from" in manifest["encoders"]["text"]["source"]
