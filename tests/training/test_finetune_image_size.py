"""Fine-tuning an image encoder that reads another size than its own (`model.image_size`): the
images are decoded at that size, and the fine-tuned copy reads it too, under an id that says so."""
from __future__ import annotations

import numpy as np
from PIL import Image

import mmtag.training.finetune as finetune
from mmtag.config import FinetuneConfig
from mmtag.encoders import create_encoder


def test_fine_tuning_reads_and_keeps_the_image_size(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    y = np.array([[1, 0], [0, 1]] * 3, dtype=np.float32)
    sizes = []
    real = finetune._image_items
    monkeypatch.setattr(finetune, "_image_items",
                        lambda images, size, *a: sizes.append(size) or real(images, size, *a))
    enc = create_encoder("efficientnet-lite0", "image", random_init=True, image_size=64)
    cfg = FinetuneConfig(epochs=1, batch_size=4, unfreeze_blocks=1)
    tuned = finetune.finetune_image(enc, paths[:4], y[:4], paths[4:], y[4:], cfg, workers=0,
                                    progress=False).encoder
    assert sizes == [64, 64]  # training and validation images
    assert tuned.image_size == 64 and tuned.native_image_size == 224
    assert tuned.weights_sha256 != enc.weights_sha256 and tuned.encoder_id.endswith("-64px")
