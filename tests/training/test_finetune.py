"""Stage-one fine-tuning on the real encoders with tiny generated data (kept to a few steps)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_tiny_bert
from mmtag.data.augment import parse_image_aug
from mmtag.config import FinetuneConfig
from mmtag.encoders import Encoder, TextEncoder, create_encoder
from mmtag.errors import DataError, MmtagError
from mmtag.data import read_csv
from mmtag.features import FeatureCache, encode_captions, extract
from mmtag.training.checkpoint import RunLog
from mmtag.training.finetune import FinetuneResult, finetune_image, finetune_text
from training_helpers import CountingBCE, DiesAfter, Killed

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
    caps, y = toy_captions(12, seed=3)
    cfg = FinetuneConfig(epochs=1, batch_size=8, lr=1e-4, head_lr=1e-2, optimizer="adam")
    counting = CountingBCE()
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


# ------------------------------------------------------------------ checkpoint and resume
class DropOrRepeat:
    """Drops or repeats one word, drawing from the augmentation stream it is given."""

    def __call__(self, caption: str, rng: np.random.Generator) -> str:
        words = caption.split()
        i = int(rng.integers(0, len(words)))
        if rng.random() < 0.5 and len(words) > 1:
            del words[i]
        else:
            words.insert(i, words[i])
        return " ".join(words)


def tiny_captions(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Captions in save_tiny_bert's vocabulary: label 0 = a dog, label 1 = a cat or a horse."""
    rng = np.random.default_rng(seed)
    caps, ys = [], []
    for _ in range(n):
        words = [str(w) for w in rng.choice(["a", "dog", "cat", "horse", "photo", "of", "the"],
                                            size=int(rng.integers(2, 7)))]
        caps.append(" ".join(words))
        ys.append([("dog" in words), ("cat" in words or "horse" in words)])
    return caps, np.array(ys, dtype=np.float32)


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    return create_encoder(f"hf:{save_tiny_bert(tmp_path_factory.mktemp('tiny-bert'))}", "text")


def assert_same_run(a: FinetuneResult, b: FinetuneResult) -> None:
    """Bit-identical encoders and histories (but for the wall-clock seconds)."""
    assert a.encoder.encoder_id == b.encoder.encoder_id and a.best_epoch == b.best_epoch
    sa, sb = a.encoder.state_dict(), b.encoder.state_dict()
    assert set(sa) == set(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    def timeless(history: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert timeless(a.history) == timeless(b.history)
    assert [set(h) for h in a.history] == [set(h) for h in b.history]


def test_text_resume_equals_uninterrupted(tiny_text: Encoder, tmp_path: Path) -> None:
    caps, y = tiny_captions(40, 0)
    vcaps, yv = tiny_captions(12, 1)
    cfg = FinetuneConfig(epochs=3, batch_size=8, lr=1e-3, head_lr=1e-2, warmup_frac=0.2)

    def run(run_log: RunLog | None) -> FinetuneResult:
        return finetune_text(tiny_text, caps, y, vcaps, yv, cfg, seed=4, augment=DropOrRepeat(),
                             progress=False, run_log=run_log)  # type: ignore[arg-type]

    straight = run(None)
    run_log = DiesAfter(tmp_path, 1)
    with pytest.raises(Killed):
        run(run_log)
    saved = RunLog(tmp_path).load("finetune-text")
    assert saved is not None and saved.epoch == 1 and not saved.done
    assert saved.scheduler is not None and saved.scheduler["last_epoch"] == 5  # 5 steps an epoch
    assert {"torch", "generator", "augment"} <= set(saved.rng)
    assert any(k.startswith("head.") for k in saved.model)  # the temporary task head too
    resumed = run(run_log)
    assert_same_run(resumed, straight)
    assert len(resumed.history) == 3 and resumed.history[0]["seconds"] == saved.seconds[0]
    rows = (tmp_path / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[:2] for r in rows] == [["finetune-text", str(e)] for e in (1, 2, 3)]


def test_image_resume_equals_uninterrupted(image_data: tuple[list[Path], np.ndarray],
                                           tmp_path: Path) -> None:
    paths, y = image_data
    enc = create_encoder("efficientnet-lite0", "image", random_init=True)
    cfg = FinetuneConfig(epochs=2, batch_size=4, lr=1e-3, head_lr=1e-2, unfreeze_blocks=1)

    def run(run_log: RunLog | None) -> FinetuneResult:
        return finetune_image(enc, paths[:8], y[:8], paths[12:], y[12:], cfg, seed=2, workers=0,
                              augment=parse_image_aug("crop,flip"), progress=False,
                              run_log=run_log, stage="ft-image")

    straight = run(None)
    run_log = DiesAfter(tmp_path, 1)
    with pytest.raises(Killed):
        run(run_log)
    saved = RunLog(tmp_path).load("ft-image")
    assert saved is not None and saved.epoch == 1 and "augment" in saved.rng
    # only the trainable part of the encoder is checkpointed: the frozen rest never changes
    blocks = len(enc.net._blocks)
    assert not any(k.startswith("encoder.net._blocks.0.") for k in saved.model)
    assert any(k.startswith(f"encoder.net._blocks.{blocks - 1}.") for k in saved.model)
    assert_same_run(run(run_log), straight)


def test_finished_finetuning_is_not_retrained(tiny_text: Encoder, tmp_path: Path) -> None:
    caps, y = tiny_captions(16, 2)
    vcaps, yv = tiny_captions(6, 3)
    cfg = FinetuneConfig(epochs=2, batch_size=8, lr=1e-3, head_lr=1e-2)
    first = finetune_text(tiny_text, caps, y, vcaps, yv, cfg, progress=False,
                          run_log=RunLog(tmp_path))
    counting = CountingBCE()
    again = finetune_text(tiny_text, caps, y, vcaps, yv, cfg, progress=False, loss=counting,
                          run_log=RunLog(tmp_path))
    assert counting.calls == 0  # no training step, no validation: the checkpoint's result
    assert_same_run(again, first)
    assert again.history == first.history  # the seconds too: they come from the checkpoint


# ------------------------------------------------------- top-layer fine-tuning (top_layers)
@pytest.fixture(scope="module")
def top_run(text_run: Run) -> Run:
    """MiniLM with only its top 2 of 6 layers trained on the toy task."""
    enc = text_run.original
    caps, y = toy_captions(80)
    cfg = FinetuneConfig(epochs=2, batch_size=32, lr=1e-3, head_lr=1e-2, top_layers=2)
    result = finetune_text(enc, caps[:64], y[:64], caps[64:], y[64:], cfg, progress=False)
    return Run(enc, text_run.before_id, text_run.before_state, result, cfg.epochs,
               {"sep_before": text_run.extra["sep_before"],
                "sep_after": separation(result.encoder, caps[:64], y[:64])})


def test_top_layers_change_only_the_top_layers(top_run: Run) -> None:
    new = top_run.result.encoder
    before, after = top_run.before_state, new.state_dict()
    assert set(after) == set(before)
    top = ("model.encoder.layer.4.", "model.encoder.layer.5.")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(top) for k in changed), sorted(changed)
    for prefix in top:  # each trained layer learned, attention and feed-forward alike
        for part in ("attention.self.query.weight", "intermediate.dense.weight"):
            assert prefix + part in changed
    frozen = [k for k in before if not k.startswith(top)]
    assert any(k.startswith("model.embeddings.") for k in frozen)
    assert any(k.startswith("model.encoder.layer.0.") for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen)


def test_top_layers_learn_the_toy_task_and_finalize_a_new_encoder(top_run: Run) -> None:
    extra, result = top_run.extra, top_run.result
    assert extra["sep_after"] > extra["sep_before"] + 0.1, extra
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert max(h["val_samples_f1"] for h in result.history) >= 0.9
    new = result.encoder
    assert new.encoder_id != top_run.before_id and new.encoder_id.startswith("minilm-l6-")
    assert new.source.get("finetuned_from") == top_run.original.weights_sha256
    assert_frozen_fp16(new)
    assert top_run.original.encoder_id == top_run.before_id  # the caller's encoder untouched
    assert not any(p.requires_grad for p in top_run.original.parameters())


def test_lower_states_batches_give_the_encoders_output(text_run: Run) -> None:
    # Trimmed fp16 states re-padded with zeros in another batch composition: the pooled output
    # is the encoder's own, but for the fp16 rounding of the cached states.
    from mmtag.training.finetune import LowerStates

    enc = text_run.original
    caps = ["a dog", "a photo of a cat on the sofa next to a very large bus", "my car"]
    states = LowerStates.compute(enc, caps, 2, torch.device("cpu"))  # type: ignore[arg-type]
    assert states.states.dtype == torch.float16
    assert states.lengths.tolist() == enc.tokenize(caps)["attention_mask"].sum(1).tolist()
    idx = np.array([2, 0, 1])
    with torch.no_grad():
        pooled = enc.upper_pooled(*states.batch(idx, torch.device("cpu")), 2)  # type: ignore[attr-defined]
        direct = enc(**enc.tokenize([caps[i] for i in idx]))
    assert torch.allclose(pooled, direct, atol=2e-3), (pooled - direct).abs().max()


def test_bucketed_batches_cover_every_row_once_with_little_padding() -> None:
    from mmtag.training.finetune import BUCKET_BATCHES, bucketed_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=1003)
    size = 8
    a = bucketed_batches(lengths, size, torch.Generator().manual_seed(1))
    assert len(a) == -(-len(lengths) // size)  # the plain path's batch count: same LR schedule
    assert sorted(np.concatenate(a).tolist()) == list(range(len(lengths)))
    assert sum(len(b) < size for b in a) == 1
    padded = sum(len(b) * lengths[b].max() for b in a)
    plain = [np.arange(k, min(k + size, 1003)) for k in range(0, 1003, size)]
    assert padded < 0.8 * sum(len(b) * lengths[b].max() for b in plain)
    b = bucketed_batches(lengths, size, torch.Generator().manual_seed(1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # seeded
    c = bucketed_batches(lengths, size, torch.Generator().manual_seed(2))
    assert [x.tolist() for x in a] != [x.tolist() for x in c]
    # the batches of one chunk are not handed out in length order
    firsts = [lengths[x].min() for x in a[:BUCKET_BATCHES]]
    assert firsts != sorted(firsts)


def test_top_layers_resume_equals_uninterrupted(tiny_text: Encoder, tmp_path: Path) -> None:
    caps, y = tiny_captions(40, 0)
    vcaps, yv = tiny_captions(12, 1)
    cfg = FinetuneConfig(epochs=3, batch_size=8, lr=1e-3, head_lr=1e-2, warmup_frac=0.2,
                         top_layers=1)

    def run(run_log: RunLog | None) -> FinetuneResult:
        return finetune_text(tiny_text, caps, y, vcaps, yv, cfg, seed=4, progress=False,
                             run_log=run_log)

    straight = run(None)
    run_log = DiesAfter(tmp_path, 1)
    with pytest.raises(Killed):
        run(run_log)
    saved = RunLog(tmp_path).load("finetune-text")
    assert saved is not None and saved.epoch == 1 and not saved.done
    assert saved.scheduler is not None and saved.scheduler["last_epoch"] == 5  # 5 steps an epoch
    # only the trained top layer and the head: the frozen rest never changes
    encoder_keys = {k for k in saved.model if k.startswith("encoder.")}
    assert encoder_keys and all(k.startswith("encoder.model.encoder.layer.1.") for k in encoder_keys)
    assert any(k.startswith("head.") for k in saved.model)
    resumed = run(run_log)
    assert_same_run(resumed, straight)
    # and it is not the whole-encoder run: the embeddings and layer 0 did not move
    before, after = tiny_text.state_dict(), straight.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before
               if not k.startswith("model.encoder.layer.1."))
    assert not all(torch.equal(before[k], after[k]) for k in before)


def test_bad_top_layers_are_one_line_errors(tiny_text: Encoder) -> None:
    caps, y = tiny_captions(6, 5)
    with pytest.raises(MmtagError, match=r"^--ft-top-layers 3: .* has 2 transformer layers") as e:
        finetune_text(tiny_text, caps[:4], y[:4], caps[4:], y[4:],
                      FinetuneConfig(epochs=1, top_layers=3), progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(MmtagError, match="--text-aug"):
        finetune_text(tiny_text, caps[:4], y[:4], caps[4:], y[4:],
                      FinetuneConfig(epochs=1, top_layers=1), augment=DropOrRepeat(),  # type: ignore[arg-type]
                      progress=False)

    class Hashing(TextEncoder):
        """A text encoder without transformer layers to split."""

        name, dim = "hashing", 4

    with pytest.raises(MmtagError, match=r"^--ft-top-layers 1: text encoder 'hashing' cannot"):
        finetune_text(Hashing(), caps[:4], y[:4], caps[4:], y[4:],
                      FinetuneConfig(epochs=1, top_layers=1), progress=False)


def test_top_layers_option_and_flag(tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmtag import cli
    from mmtag.config import Config
    from mmtag import Tagger

    assert Config().finetune.top_layers == 0  # today's whole-encoder fine-tuning by default
    assert Config().override({"finetune.top_layers": 2}).finetune.top_layers == 2
    with pytest.raises(MmtagError, match=r"^--ft-top-layers \(finetune.top_layers\) must be an "
                                         r"integer >= 0, got -1"):
        Config().override({"finetune.top_layers": -1})
    caps, _ = tiny_captions(60, 7)
    labels = [" ".join(str(i + 1) for i, w in enumerate((("dog",), ("cat", "horse")))
                       if any(x in c.split() for x in w)) for c in caps]
    rows = [(f"{i}.jpg", lab, c) for i, (lab, c) in enumerate(zip(labels, caps)) if lab]
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("ImageID,Labels,Caption\n" + "".join(f"{r[0]},{r[1]},{r[2]}\n" for r in rows))
    common = ["-q", "train", str(csv_path), "--modalities", "text", "--text-encoder",
              f"hf:{tiny_bert_dir}", "--finetune", "text", "--ft-epochs", "1", "--epochs", "2",
              "--hidden", "8", "--val-frac", "0.25", "--cache-dir", str(tmp_path / "cache")]
    capsys.readouterr()
    assert cli.main([*common, "--out", str(tmp_path / "bad"), "--ft-top-layers", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mmtag: error: --ft-top-layers (finetune.top_layers) must be an integer >= 0, "
                   "got -1"], err
    assert cli.main([*common, "--out", str(tmp_path / "bad"), "--ft-top-layers", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ft-top-layers 5:" in err[0] and "has 2 transformer layers" in err[0]
    image_only = [a if a != "text" or common[i - 1] != "--finetune" else "image"
                  for i, a in enumerate(common)]
    assert cli.main([*image_only, "--out", str(tmp_path / "img"), "--ft-top-layers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ft-top-layers 1" in err[0] and "--finetune image" in err[0], err
    run = tmp_path / "run"
    assert cli.main([*common, "--out", str(run), "--ft-top-layers", "1"]) == 0
    assert "top_layers: 1" in (run / "config.yaml").read_text()
    tuned = Tagger.load(run).encoders["text"]
    before = create_encoder(f"hf:{tiny_bert_dir}", "text").state_dict()
    after = tuned.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.encoder.layer.1.") for k in changed)
