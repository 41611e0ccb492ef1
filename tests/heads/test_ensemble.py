"""The heads a fitted model holds around registered heads: the fold ensemble and the stacked
late fusion, and what their branches answer alone."""
import pytest
import torch

from head_helpers import DIMS, batch, one_thread  # noqa: F401  (one_thread: autouse fixture)
from mmtag.errors import MmtagError
from mmtag.heads import FeatureBatch, FoldEnsemble, StackedHead, create_head


def _ensemble(name: str, k: int = 3) -> FoldEnsemble:
    torch.manual_seed(0)
    return FoldEnsemble([create_head(name, DIMS, 3, hidden=16) for _ in range(k)]).eval()


def test_the_default_model_s_wrappers_answer_from_one_branch_as_their_branches_do():
    """The default model is a StackedHead over a FoldEnsemble of `mean` heads: a branch alone
    gives the same logits as that branch within the whole model's forward (the fold average),
    not the stacked combination, whose weights were fitted on both branches together."""
    folds = _ensemble("mean")
    stacked = StackedHead(folds, 3).eval()
    stacked.weight.data = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-1.0, 3.0]])
    b = batch()
    out = stacked(b)
    for head in (folds, stacked):
        assert head.branches == ("image", "text")
        assert head.can_predict_with(["text"]) and head.can_predict_with(["image"])
        assert head.branch_for(["image"]) == "image" and head.branch_for(["image", "text"]) is None
        for branch in ("image", "text"):
            alone = head.branch_only(FeatureBatch({branch: b[branch]}), branch)
            assert torch.allclose(alone, out.branches[branch], atol=1e-6)
            members = torch.stack([m.branch_only(b, branch) for m in folds.members]).mean(0)
            assert torch.allclose(alone, members, atol=1e-6)
    assert not torch.allclose(out.logits, out.branches["text"], atol=1e-3)


def test_an_ensemble_of_early_fusion_heads_refuses_one_modality():
    folds = _ensemble("concat", k=2)
    assert folds.branches == () and not folds.can_predict_with(["text"])
    assert folds.can_predict_with(["image", "text"])
    with pytest.raises(MmtagError, match="no branch 'text'"):
        folds.branch_only(FeatureBatch({"text": batch()["text"]}), "text")
