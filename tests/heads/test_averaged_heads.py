"""Early-fusion heads averaged with per-modality branches (`concat+mean`, `xattn+mean`)."""
import pytest
import torch

from head_helpers import DIMS, batch, one_thread  # noqa: F401  (one_thread: autouse fixture)
from mmtag.heads import create_head, head_needs


@pytest.mark.parametrize(("name", "fused"), [("concat+mean", "concat"), ("xattn+mean", "xattn")])
def test_fused_plus_mean_heads_average_their_three_parts(name, fused):
    torch.manual_seed(0)
    head = create_head(name, DIMS, 3, hidden=16).eval()
    b = batch()
    out = head(b)
    assert {"image", "text", fused} <= set(out.branches)
    parts = out.branches["image"], out.branches["text"], out.branches[fused]
    assert torch.allclose(out.logits, sum(parts) / 3, atol=1e-6)
    # the fused part is the standalone fused head, and the image/text parts are separate MLPs
    assert torch.allclose(out.branches[fused], head.fused(b).logits)
    assert torch.allclose(out.branches["image"], head.image(b["image"]))
    assert not torch.allclose(out.branches["image"], out.branches[fused])
    assert head_needs(name) == head_needs(fused)
