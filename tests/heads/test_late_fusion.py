"""Late-fusion heads (`mean`, `union`, `gated`), and what each branch answers alone."""
import pytest
import torch

from head_helpers import DIMS, batch, one_thread  # noqa: F401  (one_thread: autouse fixture)
from mmtag.errors import MmtagError
from mmtag.heads import HEADS, FeatureBatch, create_head, heads_with_branches


def test_mean_head_is_the_mean_of_its_branches():
    head = create_head("mean", DIMS, 3, hidden=16).eval()
    out = head(batch())
    assert set(out.branches) == {"image", "text"}
    assert torch.allclose(out.logits, (out.branches["image"] + out.branches["text"]) / 2)


def test_union_logits_are_the_max_of_separately_trained_branches():
    head = create_head("union", DIMS, 3, hidden=16).eval()
    assert HEADS["union"].decision == "union" and HEADS["mean"].decision == "threshold"
    b = batch()
    out = head(b)
    assert set(out.branches) == {"image", "text"}
    assert torch.equal(out.logits, torch.maximum(out.branches["image"], out.branches["text"]))
    # each branch is its own net reading only its own modality
    assert head.image is not head.text
    assert not set(map(id, head.image.parameters())) & set(map(id, head.text.parameters()))
    no_text = head(FeatureBatch({"image": b["image"], "text": torch.zeros_like(b["text"])}))
    assert torch.equal(no_text.branches["image"], out.branches["image"])
    assert not torch.equal(no_text.branches["text"], out.branches["text"])
    no_image = head(FeatureBatch({"image": torch.zeros_like(b["image"]), "text": b["text"]}))
    assert torch.equal(no_image.branches["text"], out.branches["text"])
    assert not torch.equal(no_image.branches["image"], out.branches["image"])


def test_gated_weights_sum_to_one_and_weigh_the_branches():
    torch.manual_seed(0)
    head = create_head("gated", DIMS, 3, hidden=16).eval()
    b = batch()
    w0 = head.gate_weights(b)
    assert torch.allclose(w0, torch.full((5, 2), 0.5))  # starts as `mean`
    torch.nn.init.normal_(head.gate[-1].weight, std=2.0)  # a gate with per-sample opinions
    w = head.gate_weights(b)
    out = head(b)
    assert w.shape == (5, 2) and torch.all(w > 0)
    assert torch.allclose(w.sum(1), torch.ones(5))
    assert (w[:, 0].max() - w[:, 0].min()) > 0.05  # per sample, not one global weight
    assert set(out.branches) == {"image", "text"}
    expected = w[:, :1] * out.branches["image"] + w[:, 1:] * out.branches["text"]
    assert torch.allclose(out.logits, expected, atol=1e-6)
    assert not torch.allclose(out.logits, (out.branches["image"] + out.branches["text"]) / 2, atol=1e-4)


def _only(b: FeatureBatch, kind: str) -> FeatureBatch:
    return FeatureBatch({kind: b[kind]})


@pytest.mark.parametrize("name", ["mean", "union", "gated", "concat+mean", "xattn+mean"])
def test_a_late_fusion_branch_answers_alone_as_it_does_inside_the_head(name):
    """A branch run on its own modality alone gives the logits it gives within the whole head:
    an item that lacks the other modality gets that branch's own answer."""
    torch.manual_seed(0)
    head = create_head(name, DIMS, 3, hidden=16).eval()
    b = batch()
    out = head(b)
    assert head.branches == ("image", "text")
    for branch in ("image", "text"):
        assert torch.equal(head.branch_only(_only(b, branch), branch), out.branches[branch])
    assert head.can_predict_with(["text"]) and head.can_predict_with(["image"])
    assert head.branch_for(["text"]) == "text" and head.branch_for(["image", "text"]) is None
    assert not head.can_predict_with([])
    assert name in heads_with_branches()


@pytest.mark.parametrize("name", ["concat", "xattn"])
def test_early_fusion_heads_have_no_branch_that_answers_alone(name):
    head = create_head(name, DIMS, 3, hidden=16).eval()
    assert head.branches == () and name not in heads_with_branches()
    assert head.can_predict_with(["image", "text"])
    assert not head.can_predict_with(["text"]) and not head.can_predict_with(["image"])
    assert head.branch_for(["text"]) is None
    with pytest.raises(MmtagError, match="no branch 'text' that predicts alone"):
        head.branch_only(_only(batch(), "text"), "text")
