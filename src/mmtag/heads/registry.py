"""The registry of heads by name (`--fusion`), and building a registered head from the config.

The built-in heads are declared in `mmtag.registries.HEADS` as "module:Class" (names known
without importing torch), and imported when first looked up; their modules do not import this
one. A plugin adds a head with `register_head`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

from .. import registries
from ..config import ModelConfig
from ..errors import MmtagError
from .base import Head

HEADS = registries.HEADS


def register_head(name: str) -> Callable[[type[Head]], type[Head]]:
    return HEADS.register(name)


def head_class(name: str) -> type[Head]:
    """The registered head class `name`."""
    cls = HEADS.get(name)
    if cls is None:
        raise MmtagError(f"unknown fusion head '{name}'; available: {', '.join(sorted(HEADS))}")
    return cls


def create_head(name: str, dims: dict[str, int], num_classes: int,
                model: ModelConfig | None = None, **overrides: Any) -> Head:
    """Instantiate the registered head `name`. Its hyper-parameters (`Head.params`) come from
    `model` (the run's `config.model`; ModelConfig's defaults when None), then from `overrides`
    (e.g. `hidden=16` in a test)."""
    cls = head_class(name)
    options = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - options)
    if unknown:
        raise MmtagError(f"unknown head hyper-parameter(s) {unknown}; model options: "
                         f"{', '.join(sorted(options))}")
    source = model if model is not None else ModelConfig()
    kwargs: dict[str, Any] = {}
    for p in cls.params:
        if p not in options:
            raise MmtagError(f"head '{name}' reads hyper-parameter '{p}', which is no model option "
                             "(declare it in config.ModelConfig)")
        kwargs[p] = overrides[p] if p in overrides else getattr(source, p)
    return cls(dims, num_classes, **kwargs)


def takes_unpaired(name: str) -> bool:
    """Whether the registered head `name` learns from unpaired captions (see `Head`)."""
    cls = HEADS.get(name)
    return cls is not None and cls.takes_unpaired


def head_needs(name: str) -> tuple[str, ...]:
    return head_class(name).needs


def heads_with_branches() -> list[str]:
    """The registered heads that answer from one modality alone (see `Branches`)."""
    return [name for name, cls in HEADS.items() if cls.branches]
