"""mmtag: multi-label tagging of image–caption pairs on offline pretrained encoders."""
from __future__ import annotations

__version__ = "0.1.0"

from .api import Prediction, Tagger  # noqa: E402
from .config import Config  # noqa: E402
from .errors import DataError, MmtagError  # noqa: E402

__all__ = ["Tagger", "Prediction", "Config", "MmtagError", "DataError", "__version__"]
