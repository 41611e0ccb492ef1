"""The optimiser registry (head training and fine-tuning alike) and fine-tuning's LR schedule."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .. import registries
from ..errors import MmtagError

# The optimisers a config may name, declared in mmtag.registries.
OPTIMIZERS = registries.OPTIMIZERS


def make_optimizer(name: str, params: list[dict] | object, lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """The registered optimiser `name` over `params` (a list of parameters or of groups)."""
    if name not in OPTIMIZERS:
        raise MmtagError(f"unknown optimizer '{name}'; available: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay)  # type: ignore[arg-type]


def warmup_linear_decay(total_steps: int, warmup_frac: float) -> Callable[[int], float]:
    """LR factor at optimiser step s: linear warm-up to 1, then linear decay towards 0."""
    warmup = int(round(warmup_frac * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def warmup_linear_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                            warmup_frac: float) -> torch.optim.lr_scheduler.LambdaLR:
    """`optimizer`'s LR scaled by `warmup_linear_decay`, stepped once per optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(total_steps, warmup_frac))
