"""The mlp heads' pieces: mlp's loss is SMAPE of the price, mlp_dist's bins, labels and median are
what they say, the input transform learns only from the fitting rows and prices each row on its own,
and a fold model of either kind learns a planted signal and survives a save and load unchanged."""
import joblib
import numpy as np
import pandas as pd
import pytest
import torch

from core.metrics import smape
from heads.config import profile
from heads.mlp import InputTransform, distribution_median, fit_fold, price_bins, smape_loss, soft_labels


def test_the_loss_is_smape_of_the_floored_price():
    price = torch.tensor([10.0, 10.0, 4.0])
    log_pred = torch.log1p(torch.tensor([10.0, 30.0, 1.0]))
    # row SMAPEs 0, 2*20/40 = 1 and 2*3/5 = 1.2, as fractions; mean 2.2 / 3
    assert smape_loss(log_pred, price, floor=0.5).item() == pytest.approx(2.2 / 3, rel=1e-5)
    assert smape_loss(log_pred, price, floor=0.5).item() * 100 == pytest.approx(
        smape(price.numpy(), np.array([10.0, 30.0, 1.0])), rel=1e-5)
    # a prediction far below the floor counts as the floor: 2 * (4 - 2) / 6
    low = smape_loss(torch.tensor([-50.0]), torch.tensor([4.0]), floor=2.0)
    assert low.item() == pytest.approx(2 / 3, rel=1e-5)


def frame(n, seed=0):
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=n)
    return pd.DataFrame({"signal": signal, "noise": rng.normal(size=n),
                         "sometimes": np.where(rng.random(n) < 0.3, np.nan, rng.normal(size=n)),
                         "unit": rng.choice(["ounce", "count"], n)}), signal


def test_the_input_transform_learns_from_the_fitting_rows_and_prices_each_row_alone():
    fit_rows, _ = frame(300)
    transform = InputTransform.fit(fit_rows, seed=0)
    assert transform.categories == {"unit": ["count", "ounce"]}
    assert list(transform.indicated) == [transform.numeric.index("sometimes")]
    x = transform(fit_rows)
    assert x.shape == (300, 3 + 1 + 2) and np.isfinite(x).all()

    new = pd.DataFrame({"signal": [0.0, 50.0], "noise": [np.nan, 0.0], "sometimes": [np.nan, 1.0],
                        "unit": ["ounce", "gallon"]})
    together = transform(new)
    alone = np.vstack([transform(new.iloc[[i]]) for i in range(len(new))])
    np.testing.assert_array_equal(together, alone)
    assert together[1, 0] == x[:, 0].max()  # past the fitting rows' range: their top quantile, not beyond
    assert together[0, 3] == 1 and together[1, 3] == 0  # the indicator of the column that had missing values
    np.testing.assert_array_equal(together[:, 4:], [[0, 1], [0, 0]])  # an unknown unit is all zeros
    # a missing value in a column the fitting rows never missed is filled with their median, no indicator
    median_row = transform(new.iloc[[0]].assign(noise=np.nanmedian(fit_rows.noise)))
    np.testing.assert_array_equal(together[:1], median_row)


def test_price_bins_hold_equal_shares_and_labels_spread_over_neighbouring_bins():
    log_price = np.log1p(np.arange(1.0, 101.0))
    edges, centres = price_bins(log_price, 4)
    assert len(edges) == 5 and edges[0] == log_price.min() and edges[-1] == log_price.max()
    counts = np.histogram(log_price, edges)[0]
    assert counts.tolist() == [25, 25, 25, 25]
    np.testing.assert_allclose(centres, (edges[:-1] + edges[1:]) / 2)
    # many rows at one price: the repeated edges merge, fewer bins
    assert len(price_bins(np.log1p(np.r_[np.full(90, 5.0), np.arange(10.0)]), 10)[1]) < 10
    with pytest.raises(ValueError, match="distinct price bin"):
        price_bins(np.full(50, 2.0), 10)

    labels = soft_labels(np.array([log_price[0], log_price[-1], 99.0]), edges, sigma=1.0)
    np.testing.assert_allclose(labels.sum(axis=1), 1.0)
    assert labels[0].argmax() == 0 and labels[1].argmax() == 3 and labels[2].argmax() == 3  # beyond the edges: the end bin
    assert labels[0, 1] == pytest.approx(labels[0, 0] * np.exp(-0.5))  # one bin away: a gaussian of width 1 bin
    np.testing.assert_array_equal(soft_labels(log_price[:1], edges, sigma=0.01)[0], [1, 0, 0, 0])


def test_the_distribution_median_is_where_the_cumulative_probability_reaches_one_half():
    centres = np.array([1.0, 2.0, 3.0, 4.0])
    # the cumulative at each centre counts half of its own bin's mass
    probs = np.array([[0.0, 0.0, 1.0, 0.0],  # all mass on one bin: its centre
                      [0.25, 0.25, 0.25, 0.25],  # symmetric: half way
                      [0.4, 0.3, 0.2, 0.1]])  # 0.2 at 1, 0.55 at 2: 1 + (0.5 - 0.2) / 0.35
    np.testing.assert_allclose(distribution_median(probs, centres), [3.0, 2.5, 1 + 0.3 / 0.35])


@pytest.mark.parametrize("distribution", [False, True], ids=["mlp", "mlp_dist"])
def test_a_fold_model_learns_a_planted_price_and_survives_save_and_load(tmp_path, distribution):
    cfg = profile("tiny", mlp_hidden=32, mlp_epochs=30, mlp_seeds=2, mlp_bins=20)
    rows, signal = frame(600, seed=1)
    noise = np.random.default_rng(2).normal(0, 0.05, 600)
    price = np.exp(2.0 + 0.8 * signal + 0.3 * (rows.unit == "count").to_numpy() + noise)
    fit, scored = np.arange(600) < 480, np.arange(600) >= 480
    model = fit_fold(rows[fit], price[fit], cfg, distribution=distribution)
    assert len(model.states) == 2
    assert (model.centres is None) != distribution and (not distribution or len(model.centres) == 20)
    pred = np.expm1(model.predict(rows[scored]))
    constant = smape(price[scored], np.full(scored.sum(), np.median(price[fit])))
    assert smape(price[scored], pred) < 0.35 * constant, (smape(price[scored], pred), constant)

    joblib.dump(model, tmp_path / "fold.joblib")
    loaded = joblib.load(tmp_path / "fold.joblib")
    np.testing.assert_array_equal(loaded.predict(rows[scored]), model.predict(rows[scored]))
    again = fit_fold(rows[fit], price[fit], cfg, distribution=distribution)  # the same seeds give the same networks
    np.testing.assert_array_equal(again.predict(rows[scored]), model.predict(rows[scored]))
    # each row is priced on its own: alone or among others, the same value (to float64 rounding)
    alone = np.concatenate([model.predict(rows[scored].iloc[[i]]) for i in range(5)])
    np.testing.assert_allclose(alone, model.predict(rows[scored])[:5], rtol=0, atol=1e-9)


@pytest.mark.parametrize("change", [{"mlp_seeds": 0}, {"mlp_epochs": 0}, {"mlp_dropout": 1.0},
                                    {"mlp_learning_rate": 0.0}, {"mlp_weight_decay": -1e-3},
                                    {"mlp_bins": 1}, {"mlp_bin_sigma": 0.0}])
def test_bad_network_settings_are_refused_by_name(change):
    from core.config import ConfigError
    from heads.train import check_config

    with pytest.raises(ConfigError, match=next(iter(change))):
        check_config(profile("tiny", **change))


def test_a_fold_model_saved_before_the_distribution_head_still_loads_and_prices(tmp_path):
    cfg = profile("tiny", mlp_hidden=16, mlp_epochs=2, mlp_seeds=1)
    rows, signal = frame(200, seed=3)
    model = fit_fold(rows, np.exp(2.0 + signal), cfg)
    expected = model.predict(rows)
    del model.__dict__["centres"]  # what a fold model pickled before `centres` existed holds
    joblib.dump(model, tmp_path / "old.joblib")
    loaded = joblib.load(tmp_path / "old.joblib")
    assert loaded.centres is None
    np.testing.assert_array_equal(loaded.predict(rows), expected)
