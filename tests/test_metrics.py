"""The competition metric and the per-bin report, on hand-computed cases."""
import numpy as np
import pytest

from core.metrics import price_bin_index, price_bin_report, prices_from_log, smape, smape_per_row


def test_smape_hand_computed():
    # |110-100| / 105 = 0.095238..., |50-100| / 75 = 0.6667, exact = 0
    assert smape([100.0], [110.0]) == pytest.approx(100 * 10 / 105)
    assert smape([100, 100, 5], [110, 50, 5]) == pytest.approx(100 * (10 / 105 + 50 / 75 + 0) / 3)


def test_smape_bounds_and_symmetry():
    assert smape([10.0], [0.0]) == pytest.approx(200.0)  # predicting 0 costs the maximum
    assert smape([3.0], [7.0]) == pytest.approx(smape([7.0], [3.0]))


def test_zero_over_zero_scores_zero():
    assert smape_per_row([0.0, 2.0], [0.0, 2.0]).tolist() == [0.0, 0.0]


def test_shape_mismatch_and_empty_are_errors():
    with pytest.raises(ValueError):
        smape([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        smape([], [])


def test_price_bins_and_report():
    assert price_bin_index([0.5, 5.0, 9.99, 10, 30, 59, 60, 199, 200, 5000]).tolist() == [0, 1, 1, 2, 3, 3, 4, 4, 5, 5]
    y = np.array([2.0, 4.0, 7.0, 250.0])
    p = np.array([2.0, 8.0, 7.0, 125.0])
    report = price_bin_report(y, p).set_index("bin")
    assert report.loc["$0-5", "count"] == 2
    assert report.loc["$0-5", "smape"] == pytest.approx((0 + 100 * 4 / 6) / 2)
    assert report.loc["$0-5", "median_pred_over_true"] == pytest.approx(1.5)
    assert report.loc["$200+", "median_pred_over_true"] == pytest.approx(0.5)
    assert report.loc["$10-30", "count"] == 0
    assert report.loc["all", "smape"] == pytest.approx(smape(y, p))


def test_prices_from_log_floor_instead_of_zero():
    prices = prices_from_log(np.log1p([12.0, 0.0]).tolist() + [-3.0], floor=0.13)
    assert prices[0] == pytest.approx(12.0) and prices[1] == prices[2] == 0.13
