import pytest
import torch

from mmtag.errors import MmtagError
from mmtag.fusion import HEADS, FeatureBatch, create_head, head_needs

DIMS = {"image": 12, "image_tokens": 12, "text": 8}


def batch(n=5):
    g = torch.Generator().manual_seed(0)
    return FeatureBatch(image=torch.randn(n, 12, generator=g), image_tokens=torch.randn(n, 4, 12, generator=g),
                        text=torch.randn(n, 8, generator=g))


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_gives_logits_per_class(name):
    head = create_head(name, DIMS, 3, hidden=16)
    assert head(batch()).logits.shape == (5, 3)


def test_mean_head_is_the_mean_of_its_branches():
    head = create_head("mean", DIMS, 3, hidden=16).eval()
    out = head(batch())
    assert set(out.branches) == {"image", "text"}
    assert torch.allclose(out.logits, (out.branches["image"] + out.branches["text"]) / 2)


def test_single_modality_heads_ignore_the_other_modality():
    b = batch()
    img = create_head("image", DIMS, 3, hidden=16).eval()
    txt = create_head("text", DIMS, 3, hidden=16).eval()
    assert head_needs("image") == ("image",) and head_needs("text") == ("text",)
    b2 = FeatureBatch(image=b.image, text=torch.zeros_like(b.text))
    assert torch.equal(img(b).logits, img(b2).logits)
    b3 = FeatureBatch(image=torch.zeros_like(b.image), text=b.text)
    assert torch.equal(txt(b).logits, txt(b3).logits)


def test_concat_uses_both_modalities():
    head = create_head("concat", DIMS, 3, hidden=16).eval()
    b = batch()
    assert not torch.equal(head(b).logits, head(FeatureBatch(image=b.image, text=torch.zeros_like(b.text))).logits)
    assert not torch.equal(head(b).logits, head(FeatureBatch(image=torch.zeros_like(b.image), text=b.text)).logits)


def test_unknown_head_lists_the_registry():
    with pytest.raises(MmtagError, match="concat"):
        create_head("nope", DIMS, 3)
