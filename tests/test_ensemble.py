"""The ensemble stage: non-negative log-space weights, a price scale, a calibration by predicted price,
nested CV, and the submission."""
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from core.config import ConfigError, parse_args
from core.errors import PipelineError
from core.metrics import prices_from_log, smape
from core.predictions import PredictionsError, read_predictions, write_predictions
from core.submission import check_submission
from core.tables import COMMON_COLUMNS
import ensemble.blend
from ensemble.blend import (apply_calibration, blend_prices, fit_blend, fit_calibration, fit_scale, fit_weights, main,
                            nested_cv, smape_by_decile)
from ensemble.config import PROFILES, EnsembleConfig


def test_fit_weights_recovers_known_weights():
    # y = 0.6 p1 + 0.4 p2 (+ tiny noise); p3 is pure noise
    rng = np.random.default_rng(0)
    p1, p2, p3 = (rng.uniform(1, 6, 2000) for _ in range(3))
    log_price = 0.6 * p1 + 0.4 * p2 + rng.normal(0, 0.01, 2000)
    price = np.expm1(log_price)
    weights = fit_weights(np.column_stack([p1, p2, p3]), price, price.min(), n_restarts=1)
    np.testing.assert_allclose(weights, [0.6, 0.4, 0.0], atol=0.01)


def test_fit_scale_undoes_ten_percent_over_prediction():
    rng = np.random.default_rng(1)
    price = np.exp(rng.normal(2.6, 1.0, 1000))
    scale = fit_scale(np.log1p(price * 1.1), price, price.min())
    assert abs(scale - 1 / 1.1) < 1e-3
    # fitted as a one-model blend, weight and scale together remove most of the 9.5% error
    # (a log-space weight cannot undo a price ratio exactly, so not all of it)
    blend = fit_blend(np.log1p(price * 1.1)[:, None], price, price.min())
    assert smape(price, price * 1.1) == pytest.approx(200 * 0.1 / 2.1)
    assert smape(price, blend.scale * np.expm1(blend.weights[0] * np.log1p(price * 1.1))) < 3.0


@pytest.mark.parametrize("stack_share", [0.0, 0.5])
def test_nested_cv_never_fits_on_the_scored_fold(stack_share):
    # model "oracle" is perfect on fold 0 and pure noise elsewhere; "honest" is noisy everywhere.
    # A fit that saw fold 0 could lean on the oracle there and score fold 0 almost perfectly.
    rng = np.random.default_rng(2)
    n = 1000
    folds = np.arange(n) % 5
    log_price = rng.uniform(1, 6, n)
    price = np.expm1(log_price)  # all distinct, so a row can be recognised by its price
    oracle = np.where(folds == 0, log_price, rng.uniform(1, 6, n))
    honest = log_price + rng.normal(0, 0.4, n)
    log_preds = np.column_stack([oracle, honest])

    fitted_on = {}

    def spy_fit(p, y, floor, **kwargs):
        fitted_on[len(fitted_on)] = set(np.round(y, 9))
        return fit_blend(p, y, floor, **kwargs)

    nested = nested_cv(log_preds, price, folds, fit=spy_fit, stack_share=stack_share)
    for fold in range(5):
        scored_rows = set(np.round(price[folds == fold], 9))
        assert fitted_on[fold].isdisjoint(scored_rows)
        assert len(fitted_on[fold]) == int((folds != fold).sum())

    # fold 0's predictions do not depend on fold 0's labels: scrambling them changes nothing there
    scrambled = price.copy()
    scrambled[folds == 0] = rng.permutation(price[folds == 0]) * 3.0
    again = nested_cv(log_preds, scrambled, folds, stack_share=stack_share)
    np.testing.assert_allclose(again.prices[folds == 0], nested.prices[folds == 0], rtol=1e-12)

    assert nested.fold_blends[0].weights[0] < 0.05  # the oracle looks useless from the other folds
    honest_fold0 = smape(price[folds == 0], prices_from_log(honest[folds == 0], price.min()))
    assert nested.fold_smape[0] > 0.8 * honest_fold0 > 20  # no near-perfect fold 0
    in_sample = fit_blend(log_preds, price, price.min(), stack_share=stack_share)
    in_sample_smape = smape(price, ensemble.blend.predict_prices(in_sample, log_preds, price.min()))
    assert smape(price, nested.prices) >= in_sample_smape


def test_nested_calibration_never_sees_the_scored_fold(monkeypatch):
    """Bin edges, bin scales and the inner-CV choice of shape are all fitted on the other folds' rows."""
    rng = np.random.default_rng(4)
    n = 1000
    folds = np.arange(n) % 5
    log_price = rng.uniform(1, 6, n)
    price = np.expm1(log_price)
    log_preds = (log_price + rng.normal(0, 0.4, n))[:, None]
    outer_fold, calls = [None], []
    real_fit_blend, real_fit_calibration = ensemble.blend.fit_blend, ensemble.blend.fit_calibration

    def spy_fit(p, y, floor, **kwargs):
        outer_fold[0] = next(f for f in range(5) if not set(np.round(y, 9)) & set(np.round(price[folds == f], 9)))
        return real_fit_blend(p, y, floor, **kwargs)

    def spy_calibration(p, y, floor, *args, **kwargs):
        calls.append((outer_fold[0], set(np.round(y, 9))))
        return real_fit_calibration(p, y, floor, *args, **kwargs)

    monkeypatch.setattr(ensemble.blend, "fit_calibration", spy_calibration)
    kwargs = dict(calibration_bins=5, calibration_shape="auto")
    nested = nested_cv(log_preds, price, folds, fit=spy_fit, **kwargs)
    assert nested.calibrated_prices is not None and not np.isnan(nested.calibrated_prices).any()
    for fold in range(5):
        scored_rows = set(np.round(price[folds == fold], 9))
        fits = [rows for f, rows in calls if f == fold]
        assert len(fits) == 1 + 2 * 4 + 1  # the auto call, both shapes on each of the 4 inner folds, the refit
        assert all(rows.isdisjoint(scored_rows) for rows in fits)
        assert max(len(rows) for rows in fits) == int((folds != fold).sum())

    # scrambling fold 0's labels leaves fold 0's calibrated predictions exactly as they were
    scrambled = price.copy()
    scrambled[folds == 0] = rng.permutation(price[folds == 0]) * 3.0
    again = nested_cv(log_preds, scrambled, folds, **kwargs)
    np.testing.assert_allclose(again.calibrated_prices[folds == 0], nested.calibrated_prices[folds == 0], rtol=1e-12)


BIAS_PER_BIN = np.array([1.5, 1.0, 1.3, 0.9, 1.2, 1.0, 0.8, 1.1, 0.9, 0.7])  # cheapest bin 1.5x, dearest 0.7x


def _planted_bin_bias(seed=3, rows_per_bin=200):
    """Ten price clusters ($1 to $512, each +/-5%), predictions off by BIAS_PER_BIN per cluster, truth within
    5% (log-normal) of the unbiased price. The clusters stay apart after the bias, so quantile bins of the
    prediction are exactly the clusters."""
    rng = np.random.default_rng(seed)
    cluster = np.repeat(np.arange(10), rows_per_bin)
    clean = 2.0 ** cluster * np.exp(rng.uniform(-0.05, 0.05, len(cluster)))
    truth = clean * np.exp(rng.normal(0, 0.05, len(cluster)))
    return clean * BIAS_PER_BIN[cluster], truth, rng


def test_bin_calibration_recovers_a_planted_bias_per_bin():
    pred, truth, _ = _planted_bin_bias()
    calibration = fit_calibration(pred, truth, truth.min(), "bins", bins=10)
    assert list(calibration.counts) == [200] * 10
    # each bin's scale undoes its bias to within 3% (the noise alone gives about 0.5% per bin)
    np.testing.assert_allclose(np.exp(calibration.log_scales) * BIAS_PER_BIN, 1.0, atol=0.03)
    assert smape(truth, apply_calibration(calibration, pred, truth.min())) < 5.0 < 15.0 < smape(truth, pred)

    # shrinkage: 200 rows with shrink_rows=200 keep exactly half of each log scale
    shrunk = fit_calibration(pred, truth, truth.min(), "bins", bins=10, shrink_rows=200)
    np.testing.assert_allclose(shrunk.log_scales, 0.5 * calibration.log_scales, rtol=1e-9)


def test_loglinear_calibration_recovers_a_planted_power_law():
    rng = np.random.default_rng(6)
    clean = np.exp(rng.uniform(0, 5, 3000))
    truth = clean * np.exp(rng.normal(0, 0.08, 3000))
    pred = clean * 1.1 * (clean / 10) ** 0.2  # log pred = 1.2 log clean + const, so the fix has slope -0.2 / 1.2
    calibration = fit_calibration(pred, truth, truth.min(), "loglinear")
    assert calibration.slope == pytest.approx(-0.2 / 1.2, abs=0.005)
    np.testing.assert_allclose(apply_calibration(calibration, pred, truth.min()) / clean, 1.0, atol=0.01)


def test_nested_cv_with_calibration_removes_a_planted_bias():
    pred, truth, rng = _planted_bin_bias()
    folds = rng.permutation(len(truth)) % 5
    nested = nested_cv(np.log1p(pred)[:, None], truth, folds, calibration_bins=10, calibration_shrink_rows=0)
    without, with_calibration = smape(truth, nested.prices), smape(truth, nested.calibrated_prices)
    assert without > 15.0 and with_calibration < 0.6 * without  # about 17.3 -> 5.8
    # a step bias is no power law: every fold's inner CV picks the bins over the log-linear shape
    assert {b.calibration.shape for b in nested.fold_blends.values()} == {"bins"}


def test_the_stack_model_follows_each_model_where_it_is_right_and_scores_nested():
    # model "low" is sharp on cheap rows and noisy on dear ones, model "high" the reverse: one weight per
    # model can only average them; the stack model learns from their values which one to follow
    rng = np.random.default_rng(7)
    n = 3000
    folds = np.arange(n) % 5
    log_price = rng.uniform(1, 6, n)
    price = np.expm1(log_price)
    cheap = log_price < 3.5
    low = log_price + rng.normal(0, 1, n) * np.where(cheap, 0.05, 1.0)
    high = log_price + rng.normal(0, 1, n) * np.where(cheap, 1.0, 0.05)
    log_preds = np.column_stack([low, high])

    linear = nested_cv(log_preds, price, folds)
    stacked = nested_cv(log_preds, price, folds, stack_share=0.5)
    alone = nested_cv(log_preds, price, folds, stack_share=1.0)
    np.testing.assert_array_equal(stacked.linear_prices, linear.prices)  # the weights and scale are unchanged
    assert smape(price, stacked.prices) < smape(price, linear.prices) - 5
    assert smape(price, alone.prices) < smape(price, stacked.prices)
    # the stored record prices rows exactly as the fitted blend does, in a fresh Blend
    blend = fit_blend(log_preds, price, price.min(), stack_share=0.5)
    record = ensemble.blend.blend_record(["low", "high"], blend, price.min(), calibrated=False)
    np.testing.assert_array_equal(ensemble.blend.price_rows(json.loads(json.dumps(record)), {"low": low, "high": high}),
                                  ensemble.blend.predict_prices(blend, log_preds, price.min()))


def test_smape_by_decile_on_known_values():
    price = np.arange(1.0, 101.0)
    pred = price.copy()
    pred[90:] *= 2  # only the top decile is wrong, each row by 2|2y - y| / 3y = 66.7%
    table = smape_by_decile(price, pred)
    assert list(table["count"]) == [10] * 10
    np.testing.assert_allclose(table["smape"].to_numpy(), [0.0] * 9 + [200 / 3])
    assert table["price_from"].iloc[-1] == 91.0


# ---------------------------------------------------------------- the stage end to end


def _write_tables(root, n_train=400, n_test=60, seed=0):
    rng = np.random.default_rng(seed)
    data_dir, raw_dir = root / "data", root / "raw"
    data_dir.mkdir()
    raw_dir.mkdir()

    def table(prefix, n):
        df = pd.DataFrame({c: [""] * n for c in COMMON_COLUMNS})
        df["sample_id"] = [f"{prefix}{i}" for i in range(n)]
        df["has_image"] = False
        for c in ("value", "quantity_value", "unit_volume", "unit_weight"):
            df[c] = 0.0
        return df

    train = table("tr", n_train)
    train["price"] = np.round(np.exp(rng.normal(2.6, 1.0, n_train)), 2) + 0.1
    train["log_price"] = np.log1p(train["price"])
    train["fold"] = np.arange(n_train) % 5
    test = table("te", n_test)
    test_log_price = rng.normal(2.6, 1.0, n_test)
    train.to_parquet(data_dir / "train.parquet", index=False)
    test.to_parquet(data_dir / "test.parquet", index=False)
    pd.DataFrame({"sample_id": test["sample_id"], "catalog_content": "x", "image_link": ""}).to_csv(
        raw_dir / "test.csv", index=False)
    (data_dir / "prepare.json").write_text(json.dumps(
        {"complete": True, "config": {"holdout_fold": 0, "n_folds": 5, "raw_dir": str(raw_dir)}}))
    return data_dir, train, test, test_log_price


def _write_model(predictions_dir, name, train, test, train_log, test_log, oof_kind="out_of_fold"):
    oof = pd.DataFrame({"sample_id": train["sample_id"], "log_pred": train_log, "fold": train["fold"]})
    if oof_kind == "holdout":
        oof = oof[oof["fold"] == 0]
    write_predictions(predictions_dir, name, oof, pd.DataFrame({"sample_id": test["sample_id"], "log_pred": test_log}),
                      {"oof_kind": oof_kind, "selection": "fixed settings"})


@pytest.fixture
def stage(tmp_path):
    """Processed tables and three fake models: two out-of-fold ones with independent noise, one holdout."""
    data_dir, train, test, test_log_price = _write_tables(tmp_path)
    rng = np.random.default_rng(5)
    predictions_dir = tmp_path / "predictions"
    y = train["log_price"].to_numpy()
    for name, noise, bias in (("sharp", 0.3, 0.0), ("blurry", 0.5, 0.15)):
        _write_model(predictions_dir, name, train, test, y + bias + rng.normal(0, noise, len(y)),
                     test_log_price + bias + rng.normal(0, noise, len(test)))
    _write_model(predictions_dir, "holdout_head", train, test, y, test_log_price, oof_kind="holdout")
    return EnsembleConfig(data_dir=data_dir, predictions_dir=predictions_dir, n_restarts=1), train, test


def test_blend_writes_checked_submission_and_ensemble_predictions(stage, capsys):
    cfg, train, test = stage
    output = main(cfg)
    log = capsys.readouterr().out

    assert output == cfg.predictions_dir.parent / "test_out.csv"
    assert check_submission(output, cfg.data_dir.parent / "raw" / "test.csv") == []
    assert "left out holdout_head: oof_kind='holdout'" in log
    assert "blend nested CV" in log and "blend in-sample (optimistic)" in log

    summary = json.loads((cfg.predictions_dir / "ensemble" / "ensemble.json").read_text())
    assert set(summary["weights"]) == {"sharp", "blurry"}
    assert summary["weights"]["sharp"] > summary["weights"]["blurry"] > 0
    assert summary["nested_cv_smape"] >= summary["in_sample_smape"]
    # two independent noise sources blend to less noise than the better one alone
    assert summary["nested_cv_smape"] < min(summary["model_oof_smape"].values()) - 1.0
    assert set(summary["nested_cv_fold_smape"]) == {"0", "1", "2", "3", "4"}
    assert len(summary["nested_cv_smape_by_decile"]) == 10

    ensemble = read_predictions(cfg.predictions_dir, "ensemble")
    assert ensemble.meta["oof_kind"] == "out_of_fold" and "nested" in ensemble.meta["selection"]
    assert len(ensemble.oof) == len(train) and len(ensemble.test) == len(test)
    # the written OOF rows are the nested predictions: they reproduce the reported figure
    oof = ensemble.oof.set_index("sample_id").loc[train["sample_id"]]
    nested = smape(train["price"], prices_from_log(oof["log_pred"], train["price"].min()))
    assert nested == pytest.approx(summary["nested_cv_smape"], abs=1e-6)
    submitted = pd.read_csv(output, dtype={"sample_id": str}).set_index("sample_id")["price"]
    np.testing.assert_allclose(submitted.loc[test["sample_id"]], np.expm1(ensemble.test["log_pred"]), rtol=1e-9)

    # a second run ignores its own earlier output
    main(cfg)
    rerun = json.loads((cfg.predictions_dir / "ensemble" / "ensemble.json").read_text())
    assert set(rerun["weights"]) == {"sharp", "blurry"}


def test_missing_train_row_is_an_error_naming_the_model(stage):
    cfg, train, test = stage
    short = train.iloc[1:]
    _write_model(cfg.predictions_dir, "gappy", short, test, short["log_price"], np.zeros(len(test)))
    with pytest.raises(PredictionsError, match="gappy: 1 train rows have no out-of-fold prediction"):
        main(cfg)


def test_command_line_picks_profile_and_model_list():
    cfg = parse_args(EnsembleConfig, ["profile=tiny", "models=ridge,lgbm", "scale_min=0.9"], PROFILES)
    assert cfg.models == ["ridge", "lgbm"] and cfg.scale_min == 0.9
    assert str(cfg.predictions_dir) == "checkpoints/demo/predictions" and cfg.output is None
    assert parse_args(EnsembleConfig, ["models="], PROFILES).models == []  # empty: every model found
    assert set(PROFILES) == {"default", "small", "tiny"}


def test_rows_seen_by_a_fine_tuned_encoder_are_neither_fitted_nor_scored(stage, capsys):
    """A model whose encoder trained on folds 1-4 flatters itself there: the blend uses fold 0 alone."""
    cfg, train, test = stage
    y = train["log_price"].to_numpy()
    leaky = np.where(train["fold"] == 0, y + np.random.default_rng(9).normal(0, 0.6, len(y)), y)  # perfect where seen
    oof = pd.DataFrame({"sample_id": train["sample_id"], "log_pred": leaky, "fold": train["fold"]})
    write_predictions(cfg.predictions_dir, "finetuned", oof,
                      pd.DataFrame({"sample_id": test["sample_id"], "log_pred": np.zeros(len(test))}),
                      {"oof_kind": "out_of_fold", "selection": "fixed", "encoder_unseen_folds": [0]})
    main(cfg)
    assert "on fold(s) [0] only" in capsys.readouterr().out
    summary = json.loads((cfg.predictions_dir / "ensemble" / "ensemble.json").read_text())
    fold0 = int((train["fold"] == 0).sum())
    assert summary["rows_fitted"] == fold0 and summary["encoder_unseen_folds"] == [0]
    # scored on fold 0 alone, the leaky model is no near-perfect model: its weight stays below the sharp one's
    assert summary["model_oof_smape"]["finetuned"] > 10
    assert summary["weights"]["sharp"] > summary["weights"]["finetuned"]
    assert len(read_predictions(cfg.predictions_dir, "ensemble").oof) == fold0


def _stage_summary(cfg):
    main(cfg)
    summary = json.loads((cfg.predictions_dir / "ensemble" / "ensemble.json").read_text())
    return summary, read_predictions(cfg.predictions_dir, "ensemble")


def test_calibration_and_stack_off_reproduce_the_weights_and_scale_blend_exactly(stage):
    cfg, train, test = stage
    cfg = dataclasses.replace(cfg, calibration_bins=0, stack_share=0.0)
    summary, ensemble_preds = _stage_summary(cfg)
    assert summary["calibration_used"] is False and summary["nested_cv_smape_calibrated"] is None
    assert summary["calibration_decision"] == "off (calibration_bins=0)"

    # the blend as it was before calibration existed: weights and one scale, nothing else
    models = ["blurry", "sharp"]
    oof = np.column_stack([read_predictions(cfg.predictions_dir, m).oof.set_index("sample_id").loc[train["sample_id"],
                                                                                                   "log_pred"]
                           for m in models])
    test_log = np.column_stack([read_predictions(cfg.predictions_dir, m).test.set_index("sample_id").loc[
        test["sample_id"], "log_pred"] for m in models])
    y, folds = train["price"].to_numpy(), train["fold"].to_numpy()
    kwargs = dict(scale_min=cfg.scale_min, scale_max=cfg.scale_max, scale_steps=cfg.scale_steps,
                  smoothing=cfg.smoothing, n_restarts=cfg.n_restarts, seed=cfg.seed)
    final = fit_blend(oof, y, y.min(), **kwargs)
    assert final.calibration is None
    np.testing.assert_array_equal(ensemble_preds.test.set_index("sample_id").loc[test["sample_id"], "log_pred"],
                                  np.log1p(blend_prices(test_log, final.weights, final.scale, y.min())))
    np.testing.assert_array_equal(ensemble_preds.oof.set_index("sample_id").loc[train["sample_id"], "log_pred"],
                                  np.log1p(nested_cv(oof, y, folds, **kwargs).prices))


def test_the_submission_uses_the_calibration_only_when_nested_cv_says_it_helps(stage):
    cfg, train, test = stage
    # the planted per-bin bias, on 40 rows per price cluster (train prices replaced to match)
    pred, truth, _ = _planted_bin_bias(seed=12, rows_per_bin=40)
    train = train.assign(price=truth, log_price=np.log1p(truth))
    train.to_parquet(cfg.data_dir / "train.parquet", index=False)
    test_pred, _, _ = _planted_bin_bias(seed=13, rows_per_bin=len(test) // 10)
    _write_model(cfg.predictions_dir, "biased", train, test, np.log1p(pred), np.log1p(test_pred))
    # the stack model could learn the same per-bin bias from the one model's values; it is off so the
    # calibration alone is measured
    cfg = dataclasses.replace(cfg, models=["biased"], calibration_bins=10, calibration_shape="bins",
                              calibration_shrink_rows=0, stack_share=0.0)
    summary, calibrated = _stage_summary(cfg)
    assert summary["calibration_used"] is True and summary["calibration_decision"].startswith("used")
    assert summary["nested_cv_smape_calibrated"] < summary["nested_cv_smape_uncalibrated"] - 5.0
    assert summary["nested_cv_smape"] == summary["nested_cv_smape_calibrated"]
    assert summary["in_sample_smape_calibrated"] <= summary["nested_cv_smape_calibrated"]
    assert [b["rows"] for b in summary["calibration"]["bins"]] == [40] * 10  # one bin per cluster
    # the written OOF rows are the calibrated nested predictions: they reproduce the reported figure
    oof = calibrated.oof.set_index("sample_id").loc[train["sample_id"]]
    assert smape(train["price"], prices_from_log(oof["log_pred"], train["price"].min())) == pytest.approx(
        summary["nested_cv_smape_calibrated"], abs=1e-6)

    # asked for a gain nested CV does not show, the submission is the uncalibrated blend's, exactly
    summary, kept_out = _stage_summary(dataclasses.replace(cfg, calibration_min_gain=1000.0))
    assert summary["calibration_used"] is False and summary["calibration_decision"].startswith("not used")
    assert summary["nested_cv_smape"] == summary["nested_cv_smape_uncalibrated"]
    _, off = _stage_summary(dataclasses.replace(cfg, calibration_bins=0))
    pd.testing.assert_frame_equal(kept_out.test, off.test)
    pd.testing.assert_frame_equal(kept_out.oof, off.oof)
    assert not np.allclose(calibrated.test["log_pred"], off.test["log_pred"])


def test_the_submission_uses_the_stack_model_only_when_nested_cv_says_it_helps(stage):
    cfg, train, test = stage
    cfg = dataclasses.replace(cfg, calibration_bins=0)
    summary, stacked = _stage_summary(dataclasses.replace(cfg, stack_min_gain=-1000.0))
    assert summary["stack_used"] is True and summary["stack_decision"].startswith("used")
    assert summary["nested_cv_smape"] == summary["nested_cv_smape_stacked"]
    assert summary["blend"]["stack"] is not None
    # asked for a gain nested CV does not show, the submission is the weights and scale's, exactly
    summary, kept_out = _stage_summary(dataclasses.replace(cfg, stack_min_gain=1000.0))
    assert summary["stack_used"] is False and summary["stack_decision"].startswith("not used")
    assert summary["nested_cv_smape"] == summary["nested_cv_smape_linear"] and summary["blend"]["stack"] is None
    _, off = _stage_summary(dataclasses.replace(cfg, stack_share=0.0))
    pd.testing.assert_frame_equal(kept_out.test, off.test)
    pd.testing.assert_frame_equal(kept_out.oof, off.oof)
    assert not np.allclose(stacked.test["log_pred"], off.test["log_pred"])


def test_calibration_and_stack_settings_are_checked(stage):
    cfg, _, _ = stage
    with pytest.raises(ConfigError, match="calibration_shape='steps'"):
        main(dataclasses.replace(cfg, calibration_shape="steps"))
    with pytest.raises(ConfigError, match="must hold 1"):
        main(dataclasses.replace(cfg, calibration_scale_min=1.1))
    with pytest.raises(ConfigError, match="stack_share=1.5"):
        main(dataclasses.replace(cfg, stack_share=1.5))
    with pytest.raises(ConfigError, match="stack_leaves=1"):
        main(dataclasses.replace(cfg, stack_leaves=1))


def test_bench_shows_the_expert_load_per_expert():
    from bench.real_data import expert_load_text

    per_fold = {"0": [0.6, 0.3, 0.1], "1": [0.4, 0.5, 0.1]}
    assert expert_load_text({"expert_load": per_fold}) == "0.50/0.40/0.10 (min 0.10)"
    assert expert_load_text({"expert_load": [0.0, 0.0, 1.0]}) == "0.00/0.00/1.00 (min 0.00)"  # a collapsed gate
    assert expert_load_text({"oof_kind": "out_of_fold"}) == ""
    # pooled load as fusion writes it, the minimum read from the per-fold loads
    assert expert_load_text({"expert_load": [0.4, 0.35, 0.25],
                             "expert_load_per_fold": {"0": [0.5, 0.45, 0.05], "1": [0.3, 0.25, 0.45]}}) == \
        "0.40/0.35/0.25 (min 0.05)"


# calibration and stack model each forced on or off
@pytest.mark.parametrize("calibration_min_gain,stack_min_gain", [(-1000.0, -1000.0), (1000.0, -1000.0), (-1000.0, 1000.0)])
def test_stored_blend_reprices_the_test_rows_exactly(stage, calibration_min_gain, stack_min_gain):
    from dataclasses import replace

    from core.predictions import read_predictions as read
    from ensemble.blend import price_rows

    cfg = replace(stage[0], calibration_min_gain=calibration_min_gain, stack_min_gain=stack_min_gain)
    main(cfg)
    record = json.loads((cfg.predictions_dir / "ensemble" / "ensemble.json").read_text())["blend"]
    assert (record["calibration"] is not None) == (calibration_min_gain < 0)
    assert (record["stack"] is not None) == (stack_min_gain < 0)
    logs = {m: read(cfg.predictions_dir, m).test.set_index("sample_id")["log_pred"] for m in record["models"]}
    ids = list(logs[record["models"][0]].index)
    prices = price_rows(record, {m: v.loc[ids].to_numpy() for m, v in logs.items()})
    written = np.expm1(read(cfg.predictions_dir, "ensemble").test.set_index("sample_id")["log_pred"].loc[ids])
    np.testing.assert_allclose(prices, written, rtol=1e-12)
    # any subset of rows gets the same prices: a row's price depends on that row alone
    np.testing.assert_array_equal(price_rows(record, {m: v.loc[ids[5:9]].to_numpy() for m, v in logs.items()}),
                                  prices[5:9])
    with pytest.raises(PipelineError, match="needs predictions from blurry"):
        price_rows(record, {"sharp": logs["sharp"].to_numpy()})
