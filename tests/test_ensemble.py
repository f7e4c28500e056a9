"""The ensemble stage: non-negative log-space weights, a price scale, nested CV, and the submission."""
import json

import numpy as np
import pandas as pd
import pytest

from core.config import parse_args
from core.metrics import prices_from_log, smape
from core.predictions import PredictionsError, read_predictions, write_predictions
from core.submission import check_submission
from core.tables import COMMON_COLUMNS
from ensemble.blend import fit_blend, fit_scale, fit_weights, main, nested_cv, smape_by_decile
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


def test_nested_cv_never_fits_on_the_scored_fold():
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

    nested = nested_cv(log_preds, price, folds, fit=spy_fit)
    for fold in range(5):
        scored_rows = set(np.round(price[folds == fold], 9))
        assert fitted_on[fold].isdisjoint(scored_rows)
        assert len(fitted_on[fold]) == int((folds != fold).sum())

    # fold 0's predictions do not depend on fold 0's labels: scrambling them changes nothing there
    scrambled = price.copy()
    scrambled[folds == 0] = rng.permutation(price[folds == 0]) * 3.0
    again = nested_cv(log_preds, scrambled, folds)
    np.testing.assert_allclose(again.prices[folds == 0], nested.prices[folds == 0], rtol=1e-12)

    assert nested.fold_blends[0].weights[0] < 0.05  # the oracle looks useless from the other folds
    honest_fold0 = smape(price[folds == 0], prices_from_log(honest[folds == 0], price.min()))
    assert nested.fold_smape[0] > 0.8 * honest_fold0 > 20  # no near-perfect fold 0
    in_sample = fit_blend(log_preds, price, price.min())
    in_sample_smape = smape(price, np.maximum(in_sample.scale * np.expm1(log_preds @ in_sample.weights), price.min()))
    assert smape(price, nested.prices) >= in_sample_smape


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
