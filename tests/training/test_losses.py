import math

import numpy as np
import pytest
import torch
from torch import nn

from mmtag.errors import MmtagError
from mmtag.training.losses import LOSSES, AsymmetricLoss, create_loss, pos_weights


def _batch(seed: int = 0, shape: tuple[int, int] = (16, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(shape, generator=g)
    targets = (torch.rand(shape, generator=g) < 0.3).float()
    return logits, targets


def _balanced_labels(n: int = 20, c: int = 5) -> np.ndarray:
    y = np.zeros((n, c))
    y[: n // 2] = 1
    return y


def test_registry_names():
    assert set(LOSSES) == {"bce", "weighted-bce", "asl", "focal"}


def test_bce_equals_torch():
    logits, targets = _batch()
    loss = create_loss("bce", _balanced_labels())
    assert torch.allclose(loss(logits, targets), nn.BCEWithLogitsLoss()(logits, targets))


def test_pos_weights_from_frequencies_clipped_and_zero_positive():
    n = 200
    y = np.zeros((n, 5))
    y[:100, 0] = 1   # balanced: 100/100 -> 1
    y[:40, 1] = 1    # 160/40 -> 4
    #                  class 2: no positives -> 1
    y[:1, 3] = 1     # 199/1 -> clipped to 50
    y[:190, 4] = 1   # 10/190 < 1 -> clipped up to 1
    assert pos_weights(y).tolist() == [1.0, 4.0, 1.0, 50.0, 1.0]
    loss = create_loss("weighted-bce", y)
    assert loss.pos_weight.tolist() == [1.0, 4.0, 1.0, 50.0, 1.0]


def test_weighted_bce_equals_bce_when_balanced():
    logits, targets = _batch()
    loss = create_loss("weighted-bce", _balanced_labels())
    assert torch.allclose(loss(logits, targets), nn.BCEWithLogitsLoss()(logits, targets))


def test_weighted_bce_upweights_rare_positives():
    y = np.zeros((10, 1))
    y[:2] = 1  # pos_weight 4
    logits, targets = torch.tensor([[-1.0]]), torch.tensor([[1.0]])
    expected = 4 * nn.BCEWithLogitsLoss()(logits, targets)
    assert torch.allclose(create_loss("weighted-bce", y)(logits, targets), expected)


def test_asl_without_focusing_or_clip_equals_bce():
    logits, targets = _batch()
    asl = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)
    assert torch.allclose(asl(logits, targets), nn.BCEWithLogitsLoss()(logits, targets))


def test_asl_defaults_downweight_easy_negatives_only():
    asl, bce = create_loss("asl", _balanced_labels()), nn.BCEWithLogitsLoss()
    easy_neg, zero = torch.tensor([[-2.0]]), torch.tensor([[0.0]])  # p = 0.12, correctly low
    assert asl(easy_neg, zero) < 0.01 * bce(easy_neg, zero)
    very_easy = torch.tensor([[-4.0]])  # p = 0.018 < clip: shifted to zero, no loss at all
    assert asl(very_easy, zero) == 0
    # gamma_pos = 0: positives keep plain BCE
    pos_logits, one = torch.tensor([[0.5, -1.0]]), torch.ones(1, 2)
    assert torch.allclose(asl(pos_logits, one), bce(pos_logits, one))


def test_focal_matches_hand_computed_value():
    logits, targets = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]])

    def sig(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    p0, p1 = sig(2.0), sig(-1.0)
    # positive: alpha * (1 - p)^2 * -log p ; negative: (1 - alpha) * p^2 * -log(1 - p)
    term0 = 0.25 * (1 - p0) ** 2 * -math.log(p0)
    term1 = 0.75 * p1 ** 2 * -math.log(1 - p1)
    got = create_loss("focal", _balanced_labels())(logits, targets)
    assert got.item() == pytest.approx((term0 + term1) / 2, rel=1e-5)


def test_focal_smaller_than_bce_on_easy_examples():
    logits, targets = torch.tensor([[4.0, -4.0, 3.0]]), torch.tensor([[1.0, 0.0, 1.0]])
    focal = create_loss("focal", _balanced_labels())(logits, targets)
    assert focal < 0.01 * nn.BCEWithLogitsLoss()(logits, targets)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_finite_loss_and_gradients_for_extreme_logits(name):
    y_train = np.zeros((50, 4))
    y_train[:1] = 1  # pos_weight hits the clip for weighted-bce
    logits = torch.tensor([[50.0, -50.0, 50.0, -50.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    loss = create_loss(name, y_train)(logits, targets)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_are_element_means(name):
    logits, targets = _batch()
    loss = create_loss(name, _balanced_labels())
    doubled = loss(torch.cat([logits, logits]), torch.cat([targets, targets]))
    assert torch.allclose(doubled, loss(logits, targets))


def test_unknown_loss_lists_names():
    with pytest.raises(MmtagError, match="bce, weighted-bce, asl, focal"):
        create_loss("hinge", _balanced_labels())
