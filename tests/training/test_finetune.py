"""Stage-one fine-tuning on the real encoders with tiny generated data (kept to a few steps)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mmtag.data.augment import parse_image_aug
from mmtag.config import FinetuneConfig
from mmtag.encoders import Encoder, create_encoder
from mmtag.errors import DataError, MmtagError
from mmtag.data import read_csv
from mmtag.features import FeatureCache, encode_captions, extract
from mmtag.training.finetune import (FinetuneResult, finetune_image, finetune_text)

ANIMALS = ["dog", "cat", "horse", "bird"]
VEHICLES = ["car", "bus", "truck", "train"]
TEMPLATES = ["a photo of a {}", "there is a {} here", "a {} in the street", "my {} yesterday"]


def toy_captions(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Captions naming an animal (label 0), a vehicle (label 1) or both."""
    rng = np.random.default_rng(seed)
    caps, ys = [], []
    for i in range(n):
        template, kind = TEMPLATES[i % len(TEMPLATES)], i % 3
        if kind == 0:
            caps.append(template.format(rng.choice(ANIMALS)))
            ys.append([1, 0])
        elif kind == 1:
            caps.append(template.format(rng.choice(VEHICLES)))
            ys.append([0, 1])
        else:
            caps.append(template.format(f"{rng.choice(ANIMALS)} and a {rng.choice(VEHICLES)}"))
            ys.append([1, 1])
    return caps, np.array(ys, dtype=np.float32)


def separation(encoder: Encoder, captions: list[str], y: np.ndarray) -> float:
    """Mean cosine similarity within the animal-only / vehicle-only groups minus between them."""
    v = encode_captions(encoder, captions)  # type: ignore[arg-type]
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    a = v[(y[:, 0] == 1) & (y[:, 1] == 0)]
    b = v[(y[:, 0] == 0) & (y[:, 1] == 1)]
    return float(((a @ a.T).mean() + (b @ b.T).mean()) / 2 - (a @ b.T).mean())


def snapshot(encoder: Encoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


def assert_frozen_fp16(encoder: Encoder) -> None:
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.training
    for key, t in encoder.state_dict().items():
        if t.is_floating_point():
            assert torch.equal(t, t.half().float()), f"{key} is not fp16-exact"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared CPU two spinning OpenMP threads per process slow these
    few small steps down several-fold, while one thread loses little on an idle machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Run:
    original: Encoder
    before_id: str
    before_state: dict[str, torch.Tensor]
    result: FinetuneResult
    epochs: int
    extra: dict[str, float]


# --------------------------------------------------------------------------------- text
@pytest.fixture(scope="module")
def text_run() -> Run:
    enc = create_encoder("minilm-l6")
    caps, y = toy_captions(80)
    before_id, before_state = enc.encoder_id, snapshot(enc)
    sep_before = separation(enc, caps[:64], y[:64])
    cfg = FinetuneConfig(epochs=2, batch_size=32, lr=2e-4, head_lr=1e-2)
    result = finetune_text(enc, caps[:64], y[:64], caps[64:], y[64:], cfg, progress=False)
    sep_after = separation(result.encoder, caps[:64], y[:64])
    return Run(enc, before_id, before_state, result, cfg.epochs,
               {"sep_before": sep_before, "sep_after": sep_after})


def test_text_returns_new_encoder_and_leaves_input_alone(text_run: Run) -> None:
    new = text_run.result.encoder
    assert new is not text_run.original
    assert new.weights_sha256 and new.weights_sha256 != text_run.original.weights_sha256
    assert new.encoder_id != text_run.before_id and new.encoder_id.startswith("minilm-l6-")
    assert new.source.get("finetuned_from") == text_run.original.weights_sha256
    # The caller's encoder: same hash, same weights, still frozen.
    assert text_run.original.encoder_id == text_run.before_id
    after = text_run.original.state_dict()
    assert all(torch.equal(text_run.before_state[k], after[k]) for k in text_run.before_state)
    assert not any(p.requires_grad for p in text_run.original.parameters())


def test_text_encoder_is_frozen_and_fp16(text_run: Run) -> None:
    assert_frozen_fp16(text_run.result.encoder)


def test_text_finetuning_moves_the_encoder_towards_the_task(text_run: Run) -> None:
    # Class separation of the *encoder's* pooled vectors can only grow if the gradients reached
    # the transformer: training the temporary head alone would leave it exactly where it was.
    extra = text_run.extra
    assert extra["sep_after"] > extra["sep_before"] + 0.1, extra
    history = text_run.result.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_samples_f1"] >= 0.9


def test_text_history_and_best_epoch(text_run: Run) -> None:
    result = text_run.result
    assert len(result.history) == text_run.epochs
    assert 1 <= result.best_epoch <= text_run.epochs
    for entry in result.history:
        assert {"train_loss", "val_samples_f1", "val_loss"} <= set(entry)
        assert all(np.isfinite(v) for v in entry.values())
    best = result.history[result.best_epoch - 1]["val_samples_f1"]
    assert best == max(e["val_samples_f1"] for e in result.history)


def test_text_seeded_and_uses_the_given_loss(text_run: Run) -> None:
    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0
            self.bce = nn.BCEWithLogitsLoss()

        def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.bce(logits, y)

    caps, y = toy_captions(12, seed=3)
    cfg = FinetuneConfig(epochs=1, batch_size=8, lr=1e-4, head_lr=1e-2, optimizer="adam")
    counting = Counting()
    a = finetune_text(text_run.original, caps[:8], y[:8], caps[8:], y[8:], cfg, loss=counting,
                      seed=5, progress=False)
    b = finetune_text(text_run.original, caps[:8], y[:8], caps[8:], y[8:], cfg, seed=5,
                      progress=False)
    assert counting.calls == 2  # one training batch + the validation loss
    assert a.encoder.encoder_id == b.encoder.encoder_id != text_run.before_id


def test_text_mismatched_lengths_raise(text_run: Run) -> None:
    caps, y = toy_captions(6)
    cfg = FinetuneConfig(epochs=1)
    with pytest.raises(MmtagError, match="label rows"):
        finetune_text(text_run.original, caps[:4], y[:3], caps[4:], y[4:], cfg, progress=False)
    with pytest.raises(MmtagError, match="label rows"):
        finetune_text(text_run.original, caps[:4], y[:4], caps[4:], y[3:], cfg, progress=False)
    with pytest.raises(MmtagError, match="classes"):
        finetune_text(text_run.original, caps[:4], y[:4], caps[4:], y[4:, :1], cfg, progress=False)


# -------------------------------------------------------------------------------- image
def make_images(directory: Path, n: int) -> tuple[list[Path], np.ndarray]:
    """Two visually distinct classes: reddish with horizontal stripes, bluish with vertical."""
    rng = np.random.default_rng(0)
    paths, ys = [], []
    for i in range(n):
        c = i % 2
        arr = np.zeros((48, 48, 3), dtype=np.int64)
        if c == 0:
            arr[..., 0] = 200
            arr[::8] = 255
        else:
            arr[..., 2] = 200
            arr[:, ::8] = 255
        arr = np.clip(arr + rng.integers(-20, 21, arr.shape), 0, 255).astype(np.uint8)
        path = directory / f"img{i}.{'jpg' if i % 3 == 0 else 'png'}"
        Image.fromarray(arr).save(path)
        paths.append(path)
        ys.append([1 - c, c])
    return paths, np.array(ys, dtype=np.float32)


@pytest.fixture(scope="module")
def image_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], np.ndarray]:
    return make_images(tmp_path_factory.mktemp("ft-images"), 16)


@pytest.fixture(scope="module")
def image_run(image_data: tuple[list[Path], np.ndarray]) -> Run:
    enc = create_encoder("efficientnet-lite0")
    paths, y = image_data
    before_id, before_state = enc.encoder_id, snapshot(enc)
    cfg = FinetuneConfig(epochs=1, batch_size=6, lr=1e-3, head_lr=1e-2, unfreeze_blocks=2)
    result = finetune_image(enc, paths[:12], y[:12], paths[12:], y[12:], cfg, workers=2,
                            augment=parse_image_aug("crop,flip"), progress=False)
    return Run(enc, before_id, before_state, result, cfg.epochs,
               {"blocks": float(len(enc.net._blocks)), "k": float(cfg.unfreeze_blocks)})


def test_image_only_last_blocks_and_head_change(image_run: Run) -> None:
    n, k = int(image_run.extra["blocks"]), int(image_run.extra["k"])
    after = image_run.result.encoder.state_dict()
    before = image_run.before_state
    assert set(after) == set(before)
    trainable = tuple(f"net._blocks.{i}." for i in range(n - k, n)) + ("net._conv_head.", "net._bn1.")
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed, "nothing was trained"
    assert all(key.startswith(trainable) for key in changed), sorted(changed - set(
        key for key in changed if key.startswith(trainable)))
    # Each trainable part did learn (weights, not only BatchNorm statistics).
    for prefix in trainable:
        assert any(key.startswith(prefix) and key.endswith("weight") for key in changed), prefix
    # Earlier blocks, stem and their BatchNorm running statistics are bit-identical.
    frozen = [key for key in before if not key.startswith(trainable)]
    assert any(key.endswith("running_mean") for key in frozen)
    assert all(torch.equal(before[key], after[key]) for key in frozen)


def test_image_returns_new_frozen_encoder_and_leaves_input_alone(image_run: Run) -> None:
    new = image_run.result.encoder
    assert new.encoder_id != image_run.before_id and new.encoder_id.startswith("efficientnet-lite0-")
    assert image_run.original.encoder_id == image_run.before_id
    after = image_run.original.state_dict()
    assert all(torch.equal(image_run.before_state[k], after[k]) for k in image_run.before_state)
    assert_frozen_fp16(new)
    result = image_run.result
    assert len(result.history) == image_run.epochs
    assert 1 <= result.best_epoch <= image_run.epochs
    assert {"train_loss", "val_samples_f1", "val_loss"} <= set(result.history[0])


def test_image_errors(image_run: Run, image_data: tuple[list[Path], np.ndarray],
                      tmp_path: Path) -> None:
    paths, y = image_data
    enc = image_run.original
    with pytest.raises(MmtagError, match="label rows"):
        finetune_image(enc, paths[:4], y[:5], paths[4:6], y[4:6], FinetuneConfig(), progress=False)
    with pytest.raises(MmtagError, match="unfreeze_blocks"):
        finetune_image(enc, paths[:4], y[:4], paths[4:6], y[4:6],
                       FinetuneConfig(unfreeze_blocks=999), progress=False)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.jpg"):
        finetune_image(enc, [bad] + paths[:3], y[:4], paths[4:6], y[4:6],
                       FinetuneConfig(epochs=1, batch_size=4), workers=0, progress=False)


def test_image_bad_file_is_reported_as_extraction_reports_it(
        image_run: Run, image_data: tuple[list[Path], np.ndarray], tmp_path: Path) -> None:
    # One image loader: fine-tuning on a Dataset names the CSV row of a broken image exactly as
    # feature extraction does.
    paths, y = image_data
    images = tmp_path / "images"
    images.mkdir()
    names = [p.name for p in paths[:6]]
    for p in paths[:6]:
        (images / p.name).write_bytes(p.read_bytes())
    (images / names[2]).write_bytes(b"not an image")
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("ImageID,Labels,Caption\n" + "".join(f"{n},1,x\n" for n in names))
    data = read_csv(csv_path, images_dir=images).dataset
    with pytest.raises(DataError) as tuned:
        finetune_image(image_run.original, data, y[:6], paths[12:], y[12:],
                       FinetuneConfig(epochs=1, batch_size=6), workers=0, progress=False)
    with pytest.raises(DataError) as extracted:
        extract(data, ("image",), image_encoder=image_run.original, text_encoder=None,
                cache=FeatureCache(None), workers=0, progress=False)
    assert str(tuned.value) == str(extracted.value)
    assert (tuned.value.path, tuned.value.row, tuned.value.line) == (str(csv_path), 3, 4)
    assert names[2] in str(tuned.value) and "cannot decode" in str(tuned.value)




def test_text_augmentation_reaches_training_but_not_validation(text_run: Run) -> None:
    caps, y = toy_captions(24)
    seen: list[str] = []

    class Spy:
        def __call__(self, caption: str, rng: object) -> str:
            seen.append(caption)
            return caption + " indeed"

    cfg = FinetuneConfig(epochs=1, batch_size=8)
    finetune_text(text_run.original, caps[:16], y[:16], caps[16:24], y[16:24], cfg,
                  augment=Spy(), progress=False)  # type: ignore[arg-type]
    assert sorted(seen) == sorted(caps[:16])  # every training caption once, no validation caption
