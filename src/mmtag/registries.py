"""Where each registry lives, by the name of what it holds.

The config (the bottom of the package: every other part reads it) declares an option's allowed
values as "a name from the head registry", not as a list: the registry's module is imported by
name when a value is checked. So config never imports the heads, losses or strategies it names
(they import config for their typed sections), and a head, loss or strategy that a plugin or a
test registers is accepted at once, with no list to edit.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

# what → (module, attribute): the registry dicts themselves, in their own modules
HOMES: dict[str, tuple[str, str]] = {
    "fusion head": ("mmtag.heads", "HEADS"),
    "loss": ("mmtag.training.losses", "LOSSES"),
    "optimizer": ("mmtag.training.optim", "OPTIMIZERS"),
    "training strategy": ("mmtag.training.strategies", "STRATEGIES"),
    "threshold mode": ("mmtag.decision.thresholds", "TUNERS"),
}


def registry(what: str) -> Mapping[str, Any]:
    """The registry of `what` (a key of HOMES), its built-ins registered."""
    module, attribute = HOMES[what]
    return getattr(importlib.import_module(module), attribute)


def names(what: str) -> list[str]:
    """The registered names of `what`, in registration order."""
    return list(registry(what))


def lister(what: str) -> Callable[[], list[str]]:
    """`names(what)` as a function, read when called (a value checked, a help printed), so a
    name registered later is listed and the registry's module is imported only then."""
    return lambda: names(what)
