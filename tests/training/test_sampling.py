"""Which rows a head-training epoch visits: repeat factors for rare labels, shuffled epochs."""
import numpy as np
import pytest
import torch

from mmtag.training.sampling import epoch_order, repeat_factors


def test_repeat_factors_favour_rare_labels():
    y = np.zeros((100, 3))
    y[:, 0] = 1  # on every row
    y[:10, 1] = 1  # 10%: above the 5% threshold → factor 1
    y[:1, 2] = 1  # 1% → sqrt(0.05 / 0.01)
    f = repeat_factors(y)
    assert f[0] == pytest.approx(np.sqrt(5)) and f[5] == 1.0 and f[50] == 1.0


def test_epoch_order_repeats_rows_by_their_factor():
    g = torch.Generator().manual_seed(0)
    factors = np.array([1.0, 3.0, 1.0, 2.5])
    counts = np.zeros(4)
    for _ in range(200):
        counts += np.bincount(epoch_order(4, factors, g), minlength=4)
    assert counts[1] == 600 and counts[0] == 200
    assert 480 < counts[3] < 520  # 2.5 on average by stochastic rounding
    plain = epoch_order(4, None, g)
    assert sorted(plain.tolist()) == [0, 1, 2, 3]
