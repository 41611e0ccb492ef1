"""Feature extraction in eager PyTorch against ONNX Runtime twins (`--feature-runtime`), one run.

    .venv/bin/python bench/feature_runtime.py [--shared ../shared/data] [--images N] [--captions N]

Both runtimes compute the default encoders' features of the same coco-real images (decoding
workers overlapping, as `mmtag train` does) and comp5329 captions on a cold feature cache, one
after the other in this process, so the ratio is what to read (the 2 cores are shared and noisy).
The twin's one-off tracing is timed apart: it is paid once per encoder and cache. Then the two
sets of features are compared (cosine, largest difference after the cache's fp16 rounding).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from mmtag import Config, Tagger
from mmtag.data import read_dataset
from mmtag.encoders import runtime_twin

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--images", type=int, default=600, help="coco-real images to encode")
    ap.add_argument("--captions", type=int, default=4000, help="comp5329 captions to encode")
    args = ap.parse_args()
    coco_csv, comp_csv = args.shared / "coco-real" / "train.csv", args.shared / "comp5329" / "train.csv"
    if not (coco_csv.is_file() and comp_csv.is_file()):
        print(f"skipped: {args.shared} has no coco-real / comp5329 data")
        return
    coco, _ = read_dataset(coco_csv, args.shared / "coco-real" / "images", labelled=True)
    comp, _ = read_dataset(comp_csv, None, labelled=True)
    images = coco.subset(list(range(min(args.images, len(coco)))))
    captions = comp.subset(list(range(min(args.captions, len(comp)))))
    rates: dict[tuple[str, str], float] = {}
    feats: dict[tuple[str, str], np.ndarray] = {}
    with tempfile.TemporaryDirectory() as cache:
        for runtime in ("torch", "onnx"):
            for modality, data in (("image", images), ("text", captions)):
                cfg = Config().override({"cache_dir": f"{cache}/{runtime}", "feature_runtime": runtime,
                                         "model.modalities": [modality]})
                fz = Tagger(cfg).featurizer
                if runtime == "onnx":  # trace first: its cost is reported apart
                    t0 = time.perf_counter()
                    runtime_twin(fz.encoder(modality), fz.cache.root)
                    print(f"tracing the {modality} twin ({fz.encoder(modality).name}): "
                          f"{time.perf_counter() - t0:.1f} s, once per encoder and cache", flush=True)
                t0 = time.perf_counter()
                out = fz.features(data, progress=False).features[modality]
                rates[runtime, modality] = len(data) / (time.perf_counter() - t0)
                feats[runtime, modality] = out.astype(np.float32)
                print(f"{runtime:5s} {modality}: {rates[runtime, modality]:6.1f} items/s "
                      f"({len(data)} items, cold cache)", flush=True)
    for modality in ("image", "text"):
        a, b = feats["torch", modality], feats["onnx", modality]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        print(f"{modality}: onnx / torch speed {rates['onnx', modality] / rates['torch', modality]:.2f}x; "
              f"features agree to cosine >= {cos.min():.6f}, max |diff| {np.abs(a - b).max():.4g}")


if __name__ == "__main__":
    main()
