"""A small deterministic image+caption multi-label dataset in the competition layout.

Three labels are visible only in the image (drawn pictograms of a stop sign, a traffic light and a
bench) and three only in the caption (cat, dog, horse are named but not drawn), so an image-only
model cannot know the caption labels and a text-only model cannot know the image labels: a fused
model must beat both. Used by `mmtag demo` and by the tests.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_LABELS = (13, 10, 15)  # stop sign, traffic light, bench: drawn, never named
TEXT_LABELS = (17, 18, 19)  # cat, dog, horse: named, never drawn
_WORDS = {17: ["cat", "kitten"], 18: ["dog", "puppy"], 19: ["horse", "pony"]}
_OPENERS = ["a photo of", "a picture showing", "an image with", "a snapshot of", "a scene with"]
_FILLERS = ["a sunny street", "a quiet park", "the city", "a cloudy afternoon", "some houses"]


@dataclass
class SyntheticPaths:
    images: Path
    train_csv: Path
    holdout_csv: Path  # labelled, for evaluation
    test_csv: Path  # unlabelled, for prediction


def _draw(draw: ImageDraw.ImageDraw, label: int, rng: np.random.Generator, size: int) -> None:
    s = int(rng.integers(size // 5, size // 3))
    x = int(rng.integers(0, size - s))
    y = int(rng.integers(0, size - s))
    if label == 13:  # red octagon
        c = (x + s / 2, y + s / 2)
        pts = [(c[0] + s / 2 * np.cos(a), c[1] + s / 2 * np.sin(a))
               for a in np.pi / 8 + np.arange(8) * np.pi / 4]
        draw.polygon(pts, fill=(200, 20, 30), outline=(255, 255, 255))
    elif label == 10:  # traffic light: dark box with three lamps
        w = max(8, s // 3)
        draw.rectangle([x, y, x + w, y + s], fill=(25, 25, 25))
        for k, col in enumerate([(230, 30, 30), (240, 200, 20), (30, 200, 60)]):
            cy = y + (k + 0.5) * s / 3
            draw.ellipse([x + 2, cy - w / 2 + 2, x + w - 2, cy + w / 2 - 2], fill=col)
    elif label == 15:  # bench: brown planks on legs
        for k in range(3):
            draw.rectangle([x, y + k * s // 6, x + s, y + k * s // 6 + s // 10], fill=(120, 75, 30))
        leg = max(3, s // 10)
        draw.rectangle([x, y, x + leg, y + s], fill=(60, 40, 20))
        draw.rectangle([x + s - leg, y, x + s, y + s], fill=(60, 40, 20))


def _item(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[int], str]:
    while True:
        labels = [lab for lab in IMAGE_LABELS + TEXT_LABELS if rng.random() < 0.35]
        if labels:
            break
    base = rng.integers(90, 200, size=3)
    noise = rng.integers(-25, 25, size=(size, size, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for lab in labels:
        if lab in IMAGE_LABELS:
            _draw(draw, lab, rng, size)
    named = [str(rng.choice(_WORDS[lab])) for lab in labels if lab in TEXT_LABELS]
    opener = str(rng.choice(_OPENERS))
    place = str(rng.choice(_FILLERS))
    if named:
        caption = f"{opener} a {' and a '.join(named)} in {place}"
    else:
        caption = f"{opener} {place}"
    return img, sorted(labels), caption


def make_dataset(out_dir: str | Path, n_train: int = 400, n_holdout: int = 120, n_test: int = 60,
                 size: int = 160, seed: int = 0) -> SyntheticPaths:
    """Write images and three CSVs (train, labelled holdout, unlabelled test) under `out_dir`."""
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = SyntheticPaths(images, out / "train.csv", out / "holdout.csv", out / "test.csv")
    counter = 0
    for path, n, labelled in ((paths.train_csv, n_train, True), (paths.holdout_csv, n_holdout, True),
                              (paths.test_csv, n_test, False)):
        rows = []
        for _ in range(n):
            img, labels, caption = _item(rng, size)
            image_id = f"{counter}.jpg"
            counter += 1
            img.save(images / image_id, quality=90)
            rows.append([image_id, " ".join(map(str, labels)), caption] if labelled
                        else [image_id, caption])
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\r\n")
            writer.writerow(["ImageID", "Labels", "Caption"] if labelled else ["ImageID", "Caption"])
            writer.writerows(rows)
    return paths
