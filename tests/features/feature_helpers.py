"""Encoders and an extraction call shared by the tests of mmtag.features. Imported by module
name: pytest puts this directory on sys.path for its tests.

`extract_mod` is the module `mmtag.features.extract`, where extraction looks up `encode_images`,
`encode_captions` and `SHARD_ITEMS` when it runs: monkeypatch those there. It is imported by name
because `mmtag.features.extract` as an attribute is the function `extract`, which the package
re-exports over its submodule of the same name.
"""
from __future__ import annotations

import importlib

import pytest

from mmtag.encoders import create_encoder
from mmtag.features import extract

extract_mod = importlib.import_module("mmtag.features.extract")


@pytest.fixture(scope="module")
def encoders():
    return create_encoder("efficientnet-lite0"), create_encoder("minilm-l6")


def run_extract(data, cache, encoders, kinds=("image", "text"), **kw):
    img, txt = encoders
    return extract(data, kinds, image_encoder=img, text_encoder=txt, cache=cache, workers=0,
                   progress=False, **kw)
