"""Fusion losses against hand-computed values; inputs are log1p prices."""
import math

import pytest
import torch

from fusion.loss_functions import (focal_smape_loss, get_loss, huber_smape_loss, l1_log_loss, mse_log_loss,
                                   smape_loss, smape_rows, tier_weights, weighted_smape_loss)


def lp(*prices):
    return torch.log1p(torch.tensor(prices, dtype=torch.float64))


def test_exact_metric_matches_hand_values_and_tanh_form():
    s = smape_rows(lp(110.0, 50.0, 5.0), lp(100.0, 100.0, 5.0))
    assert s[0].item() == pytest.approx(2 * 10 / 210, rel=1e-5)
    assert s[1].item() == pytest.approx(2 * 50 / 150, rel=1e-5)
    assert s[2].item() == pytest.approx(0.0, abs=1e-6)
    delta = math.log(110 / 100)
    assert s[0].item() == pytest.approx(2 * abs(math.tanh(delta / 2)), rel=1e-5)
    assert smape_loss(lp(110.0, 50.0), lp(100.0, 100.0)).item() == pytest.approx((20 / 210 + 100 / 150) / 2, rel=1e-5)


@pytest.mark.parametrize("price,weight", [(0.5, 10), (4.99, 10), (5.0, 8), (9.0, 8), (10.0, 6), (29.0, 6),
                                          (30.0, 4), (59.0, 4), (60.0, 2), (199.0, 2), (200.0, 1), (2500.0, 1)])
def test_each_tier_gets_its_weight(price, weight):
    assert tier_weights(lp(price)).item() == weight


def test_weighted_smape_is_the_weighted_mean():
    pred, true = lp(2.0, 300.0), lp(1.0, 200.0)  # tier weights 10 and 1
    s1, s2 = 2 * 1 / 3, 2 * 100 / 500
    assert weighted_smape_loss(pred, true).item() == pytest.approx((10 * s1 + 1 * s2) / 11, rel=1e-5)
    with pytest.raises(ValueError):
        tier_weights(lp(1.0), thresholds=[5.0], weights=[1.0])


def test_focal_huber_l1_mse_hand_values():
    pred, true = lp(110.0, 50.0), lp(100.0, 100.0)
    s = torch.tensor([20 / 210, 100 / 150], dtype=torch.float64)
    assert focal_smape_loss(pred, true, gamma=2).item() == pytest.approx((s * (s / 2) ** 2).mean().item(), rel=1e-5)
    d = (pred - true).abs()
    assert l1_log_loss(pred, true).item() == pytest.approx(d.mean().item(), rel=1e-6)
    assert mse_log_loss(pred, true).item() == pytest.approx((d ** 2).mean().item(), rel=1e-6)
    huber = torch.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()
    assert huber_smape_loss(pred, true, delta=1.0, smape_weight=0.5).item() == pytest.approx(
        huber.item() + 0.5 * s.mean().item(), rel=1e-5)


def test_gradient_survives_predictions_below_zero_price():
    # clamp(expm1(pred), min=0) would give zero gradient here; the smooth floor does not
    pred = torch.tensor([-0.5, -0.1], requires_grad=True)
    smape_loss(pred, lp(3.0, 3.0).float()).backward()
    assert (pred.grad.abs() > 0).all() and (pred.grad < 0).all()  # pushes predictions up


def test_get_loss_names():
    for name in ("weighted_smape", "smape", "focal_smape", "huber_smape", "l1", "mse"):
        assert get_loss(name)(lp(3.0), lp(4.0)).item() > 0
    with pytest.raises(ValueError, match="weighted_smape"):
        get_loss("nope")
