"""Early fusion by concatenation (`concat`)."""
import torch

from head_helpers import DIMS, batch, one_thread  # noqa: F401  (one_thread: autouse fixture)
from mmtag.heads import FeatureBatch, create_head


def test_concat_uses_both_modalities():
    head = create_head("concat", DIMS, 3, hidden=16).eval()
    b = batch()
    assert not torch.equal(head(b).logits, head(FeatureBatch({"image": b["image"], "text": torch.zeros_like(b["text"])})).logits)
    assert not torch.equal(head(b).logits, head(FeatureBatch({"image": torch.zeros_like(b["image"]), "text": b["text"]})).logits)
