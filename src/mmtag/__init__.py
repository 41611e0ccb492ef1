"""mmtag: multi-label tagging of image–caption pairs on offline pretrained encoders.

The public names are imported on first use (PEP 562 `__getattr__`), not here: `mmtag.api`
pulls in torch, transformers and scikit-learn (seconds), and `mmtag --help`, `mmtag --version`
or `import mmtag.cli` should not pay for them. `from mmtag import Tagger` works as before.
The version lives in `mmtag.version`, which every layer may import.
"""
from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

# public name → the module (relative to this package) that defines it
_LAZY = {
    "Tagger": ".api",
    "Prediction": ".api",
    "Config": ".config",
    "MmtagError": ".errors",
    "DataError": ".errors",
}

__all__ = ["Tagger", "Prediction", "Config", "MmtagError", "DataError", "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
