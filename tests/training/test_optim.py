"""The optimiser registry and fine-tuning's warm-up + linear-decay LR schedule."""
import pytest
import torch

from mmtag.errors import MmtagError
from mmtag.training.optim import (OPTIMIZERS, make_optimizer, warmup_linear_decay,
                                  warmup_linear_scheduler)


def test_optimizers():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer("adam", p, 1e-3, 0.0), torch.optim.Adam)
    assert isinstance(make_optimizer("adamw", p, 1e-3, 0.0), torch.optim.AdamW)
    assert set(OPTIMIZERS) == {"adam", "adamw"}
    with pytest.raises(MmtagError, match="adamw"):
        make_optimizer("sgd", p, 1e-3, 0.0)


def test_warmup_then_linear_decay():
    f = warmup_linear_decay(10, 0.2)  # 2 warm-up steps
    assert [f(s) for s in range(11)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0])
    assert warmup_linear_decay(4, 0.0)(0) == 1.0  # no warm-up: full LR from the first step
    assert warmup_linear_decay(4, 0.0)(7) == 0.0  # never negative past the end


def test_scheduler_scales_every_group_per_step():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer("adamw", [{"params": [p], "lr": 1.0}, {"params": [q], "lr": 10.0}],
                         1.0, 0.0)
    sched = warmup_linear_scheduler(opt, 4, 0.5)
    lrs = []
    for _ in range(4):
        lrs += [g["lr"] for g in opt.param_groups]
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 5.0, 1.0, 10.0, 1.0, 10.0, 0.5, 5.0])
