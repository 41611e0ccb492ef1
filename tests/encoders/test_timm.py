"""The optional timm: family: without the extra, a clear message naming it."""
import pytest

from mmtag.encoders import create_encoder
from mmtag.errors import MmtagError


def test_timm_is_optional():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(MmtagError, match=r"mmtag\[timm\]"):
            create_encoder("timm:resnet18", "image")
    else:
        pytest.skip("timm is installed; the missing-extra message cannot be shown")
