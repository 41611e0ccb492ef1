import numpy as np
import pytest
import torch

from mmtag.config import TrainConfig
from mmtag.errors import MmtagError
from mmtag.features import Features
from mmtag.heads import create_head
from mmtag.training.loop import epoch_order, fit_head, make_optimizer, repeat_factors


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


def test_optimizers():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer("adam", p, 1e-3, 0.0), torch.optim.Adam)
    assert isinstance(make_optimizer("adamw", p, 1e-3, 0.0), torch.optim.AdamW)
    with pytest.raises(MmtagError, match="adamw"):
        make_optimizer("sgd", p, 1e-3, 0.0)


def _toy(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float16)
    y = np.stack([x[:, 0] > 0, x[:, 1] > 0.5], 1).astype(np.float32)
    y[y.sum(1) == 0, 0] = 1
    return Features({"text": x}), y


@pytest.mark.parametrize("optimizer, oversample", [("adamw", False), ("adam", True)])
def test_fit_head_learns_and_keeps_best_epoch(optimizer, oversample):
    tr, ytr = _toy(400, 0)
    va, yva = _toy(100, 1)
    cfg = TrainConfig(epochs=30, patience=30, batch_size=64, lr=3e-3, optimizer=optimizer,
                      oversample=oversample)
    torch.manual_seed(0)
    head = create_head("text", {"text": 8}, 2, hidden=32, dropout=0.0)
    result = fit_head(head, tr, ytr, va, yva, cfg, progress=False)
    f1s = [e.val_samples_f1 for e in result.history]
    assert f1s[result.best_epoch - 1] == pytest.approx(max(f1s)) and max(f1s) > 0.85
    assert result.history[-1].train_loss < result.history[0].train_loss
