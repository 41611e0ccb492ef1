"""Inputs shared by the tests of mmtag.heads: feature widths, a seeded batch, and a fixture that
keeps torch on one thread. Imported by module name: pytest puts this directory on sys.path for
its tests."""
from __future__ import annotations

import pytest
import torch

from mmtag.heads import FeatureBatch

DIMS = {"image": 12, "image_tokens": 12, "text": 8}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: intra-op threads only add overhead, and on a busy machine the
    threads' contention made the training test many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def batch(n=5):
    g = torch.Generator().manual_seed(0)
    return FeatureBatch({"image": torch.randn(n, 12, generator=g), "image_tokens": torch.randn(n, 4, 12, generator=g),
                        "text": torch.randn(n, 8, generator=g)})
