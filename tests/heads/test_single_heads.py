"""Single-modality heads (`image`, `text`)."""
import torch

from head_helpers import DIMS, batch, one_thread  # noqa: F401  (one_thread: autouse fixture)
from mmtag.heads import FeatureBatch, create_head, head_needs


def test_single_modality_heads_ignore_the_other_modality():
    b = batch()
    img = create_head("image", DIMS, 3, hidden=16).eval()
    txt = create_head("text", DIMS, 3, hidden=16).eval()
    assert head_needs("image") == ("image",) and head_needs("text") == ("text",)
    b2 = FeatureBatch({"image": b["image"], "text": torch.zeros_like(b["text"])})
    assert torch.equal(img(b).logits, img(b2).logits)
    b3 = FeatureBatch({"image": torch.zeros_like(b["image"]), "text": b["text"]})
    assert torch.equal(txt(b).logits, txt(b3).logits)
