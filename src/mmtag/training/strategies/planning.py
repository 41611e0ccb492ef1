"""Which strategies a run uses: the registry's entries active for its config and data.

Apart from `base` because it looks the strategies up (importing each one's module), while each
strategy's module imports `base` for `Strategy`.
"""
from __future__ import annotations

from ...config import Config
from ...errors import MmtagError
from .base import PHASES, STRATEGIES, Strategy, TrainInputs


def plan(config: Config, inputs: TrainInputs) -> list[type[Strategy]]:
    """The strategies of a run, in phase order (registration order within a phase).

    Exactly one strategy trains the head: `standard` unless another head strategy is active.
    """
    for name in config.train.strategies:
        if name not in STRATEGIES:
            raise MmtagError(f"unknown training strategy {name!r}; available: {', '.join(STRATEGIES)}")
    active = [s for s in STRATEGIES.values() if s.active(config, inputs)]
    heads = [s for s in active if s.phase == "head"]
    if len(heads) > 1:
        heads = [s for s in heads if s.name != "standard"]
    if len(heads) != 1:
        names = ", ".join(s.name for s in heads) or "none"
        raise MmtagError(f"exactly one training strategy must train the head; active: {names}")
    active = [s for s in active if s.phase != "head"] + heads
    return sorted(active, key=lambda s: PHASES.index(s.phase))
