"""Early fusion by cross-attention (`xattn`)."""
import torch

from head_helpers import DIMS, batch, one_thread  # noqa: F401  (one_thread: autouse fixture)
from mmtag.heads import FeatureBatch, create_head, head_needs


def test_xattn_attends_over_the_image_tokens():
    assert "image_tokens" in head_needs("xattn") and "image_tokens" in head_needs("xattn+mean")
    torch.manual_seed(0)
    head = create_head("xattn", DIMS, 3, hidden=16).eval()
    b = batch()
    out = head(b).logits
    # same pooled image and caption, different spatial tokens → different output
    other = FeatureBatch({"image": b["image"], "text": b["text"], "image_tokens": torch.randn_like(b["image_tokens"])})
    assert not torch.allclose(head(other).logits, out, atol=1e-5)
    # ... and tokens differing in one row change only that row
    one = b["image_tokens"].clone()
    one[2] = torch.randn_like(one[2])
    changed = (head(FeatureBatch({"image": b["image"], "text": b["text"], "image_tokens": one})).logits - out).abs().sum(1)
    assert changed[2] > 1e-5 and torch.all(changed[[0, 1, 3, 4]] < 1e-6)
    # the tokens form a set (no position encoding): their order is irrelevant
    perm = FeatureBatch({"image": b["image"], "text": b["text"], "image_tokens": b["image_tokens"][:, [2, 0, 3, 1]]})
    assert torch.allclose(head(perm).logits, out, atol=1e-5)
    # the caption is the query: changing it changes what is attended, not just the concat input
    q2 = head.attend(FeatureBatch({"image": b["image"], "text": torch.randn_like(b["text"]), "image_tokens": b["image_tokens"]}))
    assert not torch.allclose(q2, head.attend(b), atol=1e-5)
    # attention picks tokens: weights over tokens sum to 1, are not uniform, depend on the caption
    w = head.attention_weights(b)
    assert w.shape == (5, 4, 4) and torch.allclose(w.sum(-1), torch.ones(5, 4))
    assert (w - 0.25).abs().max() > 1e-3
    assert not torch.allclose(w, head.attention_weights(FeatureBatch({"text": b["text"].flip(0), "image_tokens": b["image_tokens"]})))
    # ... and so does what is carried back: the same tokens read by two captions give two results
    kv = head.tokens(b["image_tokens"])
    assert not torch.allclose(head.attn(head.query(b["text"]), kv), head.attn(head.query(b["text"].flip(0)), kv), atol=1e-5)
    # the token count is free
    five = FeatureBatch({"image": b["image"], "text": b["text"], "image_tokens": torch.randn(5, 7, 12)})
    assert head(five).logits.shape == (5, 3)
    assert set(head(b).branches) == {"image", "text"}
