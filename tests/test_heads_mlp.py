"""The mlp head's pieces: its loss is SMAPE of the price, its input transform learns only from the
fitting rows and prices each row on its own, and a fold model learns a planted signal and survives a
save and load unchanged."""
import joblib
import numpy as np
import pandas as pd
import pytest
import torch

from core.metrics import smape
from heads.config import profile
from heads.mlp import InputTransform, fit_fold, smape_loss


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


def test_a_fold_model_learns_a_planted_price_and_survives_save_and_load(tmp_path):
    cfg = profile("tiny", mlp_hidden=32, mlp_epochs=30, mlp_seeds=2)
    rows, signal = frame(600, seed=1)
    noise = np.random.default_rng(2).normal(0, 0.05, 600)
    price = np.exp(2.0 + 0.8 * signal + 0.3 * (rows.unit == "count").to_numpy() + noise)
    fit, scored = np.arange(600) < 480, np.arange(600) >= 480
    model = fit_fold(rows[fit], price[fit], cfg)
    assert len(model.states) == 2
    pred = np.expm1(model.predict(rows[scored]))
    constant = smape(price[scored], np.full(scored.sum(), np.median(price[fit])))
    assert smape(price[scored], pred) < 0.35 * constant, (smape(price[scored], pred), constant)

    joblib.dump(model, tmp_path / "fold.joblib")
    loaded = joblib.load(tmp_path / "fold.joblib")
    np.testing.assert_array_equal(loaded.predict(rows[scored]), model.predict(rows[scored]))
    again = fit_fold(rows[fit], price[fit], cfg)  # the same seeds give the same networks
    np.testing.assert_array_equal(again.predict(rows[scored]), model.predict(rows[scored]))


@pytest.mark.parametrize("change", [{"mlp_seeds": 0}, {"mlp_epochs": 0}, {"mlp_dropout": 1.0},
                                    {"mlp_learning_rate": 0.0}, {"mlp_weight_decay": -1e-3}])
def test_bad_network_settings_are_refused_by_name(change):
    from core.config import ConfigError
    from heads.train import check_config

    with pytest.raises(ConfigError, match=next(iter(change))):
        check_config(profile("tiny", **change))
