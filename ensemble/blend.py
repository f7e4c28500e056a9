"""Blend every model's out-of-fold predictions in log space, calibrate one price scale, write the submission.

    python -m ensemble.blend                              # every model under checkpoints/predictions
    python -m ensemble.blend models=ridge,lgbm,all_embeddings output=test_out.csv
    python -m ensemble.blend profile=tiny                 # the demo's folders

CPU only; about 15 s for 3 models on 75,000 rows (2 cores). The blended log price is
sum_i w_i * p_i with w >= 0 (no intercept, no sum constraint), fitted to minimise the OOF SMAPE of
the floored prices; then one multiplicative price scale s is searched on a grid. The reported figure
is nested CV: for each fold, weights and scale are fitted on the other folds' OOF rows only and
applied to that fold. The in-sample figure (fitted and scored on the same rows) is printed too,
labelled optimistic. Only models whose `oof_kind` is "out_of_fold" can be blended; "holdout" models
are left out with a log line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize, minimize_scalar, nnls

from core.config import parse_args, to_dict
from core.errors import PipelineError, run_cli
from core.io import read_json, write_json
from core.metrics import format_table, prices_from_log, smape
from core.predictions import aligned_oof, aligned_test, list_models, read_predictions, write_predictions
from core.runtime import setup_logging
from core.submission import write_submission
from core.tables import META_FILE, load_table
from ensemble.config import PROFILES, EnsembleConfig

ENSEMBLE_MODEL = "ensemble"
MAX_LOG_PRICE = 30.0  # keeps exp() finite while the optimiser tries large weights


@dataclass
class Blend:
    weights: np.ndarray  # one non-negative weight per model, applied to log1p predictions
    scale: float  # multiplies the blended price


@dataclass
class NestedResult:
    prices: np.ndarray  # every row predicted by a blend fitted without its fold
    fold_smape: dict  # fold -> SMAPE of that fold's nested predictions
    fold_blends: dict  # fold -> the Blend fitted on the other folds


# ---------------------------------------------------------------- pure fitting functions


def blend_prices(log_preds: np.ndarray, weights, scale: float, floor: float) -> np.ndarray:
    """Prices of the blend: scale * expm1(sum_i w_i p_i), floored at `floor` (never at 0)."""
    blended = np.minimum(np.asarray(log_preds, dtype=np.float64) @ np.asarray(weights, dtype=np.float64), MAX_LOG_PRICE)
    return np.maximum(scale * np.expm1(blended), floor)


def smooth_smape_and_grad(weights, log_preds, y_price, floor, smoothing):
    """SMAPE (fraction, not percent) of the floored blend with |p - y| smoothed, and its gradient in w.
    Rows held at the floor contribute no gradient; the NNLS start keeps them few."""
    blended = np.minimum(log_preds @ weights, MAX_LOG_PRICE)
    raw = np.expm1(blended)
    price = np.maximum(raw, floor)
    diff = price - y_price
    soft_abs = np.sqrt(diff ** 2 + (smoothing * y_price) ** 2)
    total = price + y_price
    loss = np.mean(2.0 * soft_abs / total)
    d_price = 2.0 * (diff / soft_abs * total - soft_abs) / total ** 2
    d_blend = d_price * np.exp(blended) * (raw > floor)
    return loss, log_preds.T @ d_blend / len(y_price)


def fit_weights(log_preds, y_price, floor: float, smoothing: float = 1e-3, n_restarts: int = 0,
                seed: int = 0) -> np.ndarray:
    """Non-negative weights w minimising the SMAPE of prices_from_log(log_preds @ w, floor).

    Starts from the non-negative least-squares fit to log1p(price) and from equal weights (plus
    `n_restarts` random ones), runs L-BFGS-B on the smoothed SMAPE with w >= 0 from each, and keeps
    the weights with the lowest exact SMAPE, the NNLS start included."""
    log_preds = np.asarray(log_preds, dtype=np.float64)
    y_price = np.asarray(y_price, dtype=np.float64)
    if log_preds.ndim != 2 or len(log_preds) != len(y_price):
        raise ValueError(f"fit_weights: log_preds {log_preds.shape} and y_price {y_price.shape} do not match")
    n_models = log_preds.shape[1]
    start_nnls, _ = nnls(log_preds, np.log1p(y_price))
    total = start_nnls.sum() if start_nnls.sum() > 0 else 1.0
    starts = [start_nnls, np.full(n_models, total / n_models)]
    rng = np.random.default_rng(seed)
    starts += [rng.dirichlet(np.ones(n_models)) * total for _ in range(n_restarts)]

    def exact(w):
        return smape(y_price, prices_from_log(log_preds @ w, floor))

    best, best_score = start_nnls, exact(start_nnls)
    for start in starts:
        result = minimize(smooth_smape_and_grad, start, args=(log_preds, y_price, floor, smoothing), jac=True,
                          method="L-BFGS-B", bounds=[(0.0, None)] * n_models, options={"maxiter": 500})
        weights = np.maximum(result.x, 0.0)
        score = exact(weights)
        if score < best_score:
            best, best_score = weights, score
    return best


def fit_scale(log_pred, y_price, floor: float, scale_min: float = 0.8, scale_max: float = 1.2,
              steps: int = 81) -> float:
    """The price multiplier s in [scale_min, scale_max] minimising SMAPE of max(s * expm1(log_pred), floor):
    a grid, then a bounded 1-D refinement between the best point's neighbours."""
    raw = np.expm1(np.minimum(np.asarray(log_pred, dtype=np.float64), MAX_LOG_PRICE))
    y_price = np.asarray(y_price, dtype=np.float64)

    def score(s):
        return smape(y_price, np.maximum(s * raw, floor))

    grid = np.linspace(scale_min, scale_max, max(steps, 2))
    scores = [score(s) for s in grid]
    i = int(np.argmin(scores))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    refined = minimize_scalar(score, bounds=(lo, hi), method="bounded", options={"xatol": 1e-5})
    return float(refined.x) if refined.fun < scores[i] else float(grid[i])


def fit_blend(log_preds, y_price, floor: float, scale_min: float = 0.8, scale_max: float = 1.2,
              scale_steps: int = 81, smoothing: float = 1e-3, n_restarts: int = 0, seed: int = 0) -> Blend:
    """Weights on the log predictions, then one price scale on the blended prediction."""
    weights = fit_weights(log_preds, y_price, floor, smoothing, n_restarts, seed)
    blended = np.asarray(log_preds, dtype=np.float64) @ weights
    return Blend(weights, fit_scale(blended, y_price, floor, scale_min, scale_max, scale_steps))


def nested_cv(log_preds, y_price, folds, fit=fit_blend, **fit_kwargs) -> NestedResult:
    """For each fold f, fit on the other folds' rows only (their own price floor included) and
    predict fold f. `fit(log_preds, y_price, floor, **fit_kwargs)` returns a Blend."""
    log_preds = np.asarray(log_preds, dtype=np.float64)
    y_price = np.asarray(y_price, dtype=np.float64)
    folds = np.asarray(folds)
    prices = np.full(len(y_price), np.nan)
    fold_smape, fold_blends = {}, {}
    for fold in np.unique(folds):
        scored = folds == fold
        if scored.all():
            raise ValueError(f"nested_cv: fold {fold} holds every row; at least two folds are needed")
        floor = float(y_price[~scored].min())
        blend = fit(log_preds[~scored], y_price[~scored], floor, **fit_kwargs)
        prices[scored] = blend_prices(log_preds[scored], blend.weights, blend.scale, floor)
        fold_smape[int(fold)] = smape(y_price[scored], prices[scored])
        fold_blends[int(fold)] = blend
    return NestedResult(prices, fold_smape, fold_blends)


def smape_by_decile(y_price, pred_price, n_bins: int = 10) -> pd.DataFrame:
    """SMAPE per decile of the true price (rows sorted by true price, split into near-equal groups)."""
    y_price = np.asarray(y_price, dtype=np.float64)
    pred_price = np.asarray(pred_price, dtype=np.float64)
    order = np.argsort(y_price, kind="stable")
    rows = []
    for i, idx in enumerate(np.array_split(order, n_bins)):
        if len(idx) == 0:
            continue
        rows.append({"decile": i + 1, "price_from": float(y_price[idx].min()), "price_to": float(y_price[idx].max()),
                     "count": int(len(idx)), "smape": smape(y_price[idx], pred_price[idx]),
                     "median_pred_over_true": float(np.median(pred_price[idx] / y_price[idx]))})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the stage


def select_models(cfg: EnsembleConfig, log) -> list:
    """Read the models to blend; models without out-of-fold predictions are left out with a log line."""
    names = list(cfg.models) or [m for m in list_models(cfg.predictions_dir) if m != ENSEMBLE_MODEL]
    if not names:
        raise PipelineError(f"{cfg.predictions_dir}: no model predictions found; run the stages that write them first")
    blendable = []
    for name in names:
        preds = read_predictions(cfg.predictions_dir, name)
        kind = preds.meta.get("oof_kind")
        if kind != "out_of_fold":
            log.info("left out %s: oof_kind=%r, not out-of-fold predictions for every train row", name, kind)
            continue
        blendable.append(preds)
    if not blendable:
        raise PipelineError(f"{cfg.predictions_dir}: none of {names} has out-of-fold predictions for every train "
                            f"row (oof_kind='out_of_fold'); nothing to blend")
    return blendable


def clean_rows(models, folds: np.ndarray, seed: int, log):
    """(mask of train rows every model's `encoder_unseen_folds` covers, the folds nested CV uses on them).
    With one clean fold only (one encoder fine-tuned outside the holdout fold), nested CV splits
    that fold's rows into five seeded parts."""
    unseen = None
    for preds in models:
        allowed = preds.meta.get("encoder_unseen_folds")  # None: every fold (frozen or no encoder)
        if allowed is not None:
            unseen = set(allowed) if unseen is None else unseen & set(allowed)
    if unseen is None:
        return np.ones(len(folds), bool), folds
    clean = np.isin(folds, sorted(unseen))
    if not clean.any():
        raise PipelineError("no train fold is unseen by every model's fine-tuned encoders; nothing to score the "
                            "blend on honestly (train the encoders with encoder_folds=all, or blend fewer models)")
    log.info("fitting and scoring the blend on fold(s) %s only (%d rows): a fine-tuned encoder trained on the "
             "other folds' rows", sorted(unseen), int(clean.sum()))
    cv_folds = folds[clean]
    if len(unseen) < 2:
        cv_folds = np.random.default_rng(seed).permutation(int(clean.sum())) % 5
    return clean, cv_folds


def main(cfg: EnsembleConfig) -> Path:
    out_dir = Path(cfg.predictions_dir) / ENSEMBLE_MODEL
    log = setup_logging("ensemble.blend", out_dir)
    train = load_table(cfg.data_dir, "train")
    test = load_table(cfg.data_dir, "test")
    train_ids, test_ids = train["sample_id"].astype(str).tolist(), test["sample_id"].astype(str).tolist()
    y_price = train["price"].to_numpy(dtype=np.float64)
    folds = train["fold"].to_numpy(dtype=int)
    floor = float(y_price.min())

    models = select_models(cfg, log)
    names = [p.model for p in models]
    oof = np.column_stack([aligned_oof(p, train_ids) for p in models])  # a missing train row names its model
    test_log = np.column_stack([aligned_test(p, test_ids) for p in models])
    for preds in models:
        own_folds = preds.oof.set_index("sample_id")["fold"].reindex(train_ids).to_numpy()
        if (own_folds != folds).any():
            log.info("warning: %s's fold column differs from the data stage's on %d rows; its OOF rows may not "
                     "match the shared split", preds.model, int((own_folds != folds).sum()))

    # Rows whose inputs came from an encoder fine-tuned on them (or that chose its checkpoint with them)
    # would flatter that model; the blend is fitted and scored only on rows every model calls unseen.
    clean, cv_folds = clean_rows(models, folds, cfg.seed, log)
    fit_kwargs = dict(scale_min=cfg.scale_min, scale_max=cfg.scale_max, scale_steps=cfg.scale_steps,
                      smoothing=cfg.smoothing, n_restarts=cfg.n_restarts, seed=cfg.seed)
    model_smape = {name: smape(y_price[clean], prices_from_log(oof[clean, i], floor)) for i, name in enumerate(names)}
    nested = nested_cv(oof[clean], y_price[clean], cv_folds, **fit_kwargs)
    nested_smape = smape(y_price[clean], nested.prices)
    fold_values = np.array(list(nested.fold_smape.values()))
    final = fit_blend(oof[clean], y_price[clean], floor, **fit_kwargs)
    in_sample_smape = smape(y_price[clean], blend_prices(oof[clean], final.weights, final.scale, floor))
    test_prices = blend_prices(test_log, final.weights, final.scale, floor)

    # the submission, checked against the raw test CSV when it is still where the data stage read it
    output = Path(cfg.output) if cfg.output else Path(cfg.predictions_dir).parent / "test_out.csv"
    raw_test = Path(read_json(Path(cfg.data_dir) / META_FILE)["config"]["raw_dir"]) / "test.csv"
    write_submission(output, test_ids, test_prices, test_csv=raw_test if raw_test.exists() else None,
                     test_ids=None if raw_test.exists() else test_ids)

    weights = {name: float(w) for name, w in zip(names, final.weights)}
    deciles = smape_by_decile(y_price[clean], nested.prices)
    summary = {
        "models": names,
        "weights": weights,
        "scale": final.scale,
        "price_floor": floor,
        "nested_cv_smape": nested_smape,
        "rows_fitted": int(clean.sum()),
        "encoder_unseen_folds": sorted(set(folds[clean].tolist())),
        "nested_cv_fold_smape": {str(f): v for f, v in nested.fold_smape.items()},
        "nested_cv_smape_std": float(fold_values.std()),
        "nested_cv_fold_weights": {str(f): {n: float(w) for n, w in zip(names, b.weights)}
                                   for f, b in nested.fold_blends.items()},
        "nested_cv_fold_scale": {str(f): b.scale for f, b in nested.fold_blends.items()},
        "in_sample_smape": in_sample_smape,
        "in_sample_note": "weights and scale fitted and scored on the same OOF rows: optimistic",
        "model_oof_smape": model_smape,
        "model_selection": {p.model: p.meta.get("selection") for p in models},
        "nested_cv_smape_by_decile": deciles.to_dict(orient="records"),
        "output": str(output),
        "config": to_dict(cfg),
    }
    write_predictions(cfg.predictions_dir, ENSEMBLE_MODEL,
                      pd.DataFrame({"sample_id": np.asarray(train_ids)[clean], "log_pred": np.log1p(nested.prices),
                                    "fold": folds[clean]}),
                      pd.DataFrame({"sample_id": test_ids, "log_pred": np.log1p(test_prices)}),
                      {**summary, "oof_kind": "out_of_fold",
                       "selection": "weights and scale fitted on the other folds (nested CV)"})
    write_json(out_dir / "ensemble.json", summary)

    table = pd.DataFrame(
        [{"model": n, "oof_smape": model_smape[n], "weight": weights[n],
          "note": "optimistic" if "optimistic" in str(p.meta.get("selection", "")).lower() else ""}
         for n, p in zip(names, models)]
        + [{"model": "blend in-sample (optimistic)", "oof_smape": in_sample_smape, "weight": "", "note": ""},
           {"model": "blend nested CV", "oof_smape": nested_smape, "weight": "",
            "note": f"+/- {fold_values.std():.2f} over {len(fold_values)} folds"}])
    log.info("blend of %d model(s), price scale %.4f:\n%s", len(names), final.scale, format_table(table, "{:.3f}"))
    log.info("nested CV SMAPE by decile of the true price:\n%s", format_table(deciles))
    log.info("wrote %s: %d rows, prices %.2f to %.2f (median %.2f)", output, len(test_prices), test_prices.min(),
             test_prices.max(), np.median(test_prices))
    return output


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(EnsembleConfig, profiles=PROFILES)))
