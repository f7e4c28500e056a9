"""Blend every model's out-of-fold predictions in log space, calibrate the price, write the submission.

    python -m ensemble.blend                              # every model under checkpoints/predictions
    python -m ensemble.blend models=ridge,lgbm,all_embeddings output=test_out.csv
    python -m ensemble.blend profile=tiny                 # the demo's folders

CPU only; about 25 s for 3 models on 75,000 rows (2 cores), half of it the calibration's inner CV; the
stack model adds about 7 s.
The blended log price is sum_i w_i * p_i with w >= 0 (no intercept, no sum constraint), fitted to
minimise the OOF SMAPE of the floored prices; then one multiplicative price scale s is searched on a
grid; then, unless `stack_share=0`, a small LightGBM on the same log predictions (a stack model,
which can follow one model where another goes wrong) is mixed in log space with that price; then,
unless `calibration_bins=0`, a price scale that depends on the predicted price (one per quantile bin
of the prediction, or log-linear in it; see `fit_calibration`). The reported figure is nested CV:
for each fold, weights, scale, stack model and calibration (bin edges included) are fitted on the
other folds' OOF rows only and applied to that fold. Nested CV is reported without and with the
stack model and without and with the calibration, and the submission uses each only if it lowers
the nested figure (by more than `stack_min_gain` / `calibration_min_gain`). The in-sample figure
(fitted and scored on the same rows) is printed too, labelled optimistic. Only models whose
`oof_kind` is "out_of_fold" can be blended; "holdout" models are left out with a log line.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from scipy.optimize import minimize, minimize_scalar, nnls

from core.config import ConfigError, parse_args, to_dict
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


CALIBRATION_SHAPES = ("bins", "loglinear", "auto")


@dataclass
class Calibration:
    """A price multiplier that depends on the (globally scaled, floored) predicted price.
    "bins": exp(log_scales[k]) for a price in bin k, bins split at `edges` (a price equal to an edge
    goes to the bin above). "loglinear": exp(intercept + slope * (log(price) - centre)), clipped to
    [log(scale_min), log(scale_max)]."""
    shape: str
    edges: np.ndarray = field(default_factory=lambda: np.zeros(0))  # interior bin edges, in price
    log_scales: np.ndarray = field(default_factory=lambda: np.zeros(1))  # one per bin
    counts: np.ndarray = field(default_factory=lambda: np.zeros(1, int))  # fitting rows per bin
    centre: float = 0.0  # loglinear: median log price of the fitting rows
    intercept: float = 0.0
    slope: float = 0.0
    scale_min: float = 0.5
    scale_max: float = 2.0
    inner_cv_smape: dict = field(default_factory=dict)  # "auto": each shape's inner-CV SMAPE

    def log_scale(self, price) -> np.ndarray:
        price = np.asarray(price, dtype=np.float64)
        if self.shape == "bins":
            return self.log_scales[np.searchsorted(self.edges, price, side="right")]
        value = self.intercept + self.slope * (np.log(price) - self.centre)
        return np.clip(value, np.log(self.scale_min), np.log(self.scale_max))

    def describe(self) -> dict:
        if self.shape == "bins":
            lows = np.concatenate([[0.0], self.edges])
            highs = np.concatenate([self.edges, [np.inf]])
            bins = [{"price_from": float(lo), "price_to": float(hi), "rows": int(n), "scale": float(np.exp(ls))}
                    for lo, hi, n, ls in zip(lows, highs, self.counts, self.log_scales)]
            return {"shape": "bins", "bins": bins, "inner_cv_smape": self.inner_cv_smape}
        return {"shape": "loglinear", "centre_price": float(np.exp(self.centre)), "scale_at_centre":
                float(np.exp(self.intercept)), "slope": self.slope, "inner_cv_smape": self.inner_cv_smape,
                "formula": "scale = exp(log(scale_at_centre) + slope * log(price / centre_price)), clipped to "
                           f"[{self.scale_min}, {self.scale_max}]"}


@dataclass
class Blend:
    weights: np.ndarray  # one non-negative weight per model, applied to log1p predictions
    scale: float  # multiplies the blended price
    calibration: Optional[Calibration] = None  # then multiplies by a scale that depends on the price
    # a level-2 LightGBM (model text) on the same log predictions; before the calibration, the log price is
    # (1 - stack_share) * log1p(scaled blend) + stack_share * the stack model's
    stack: Optional[str] = None
    stack_share: float = 0.0


@dataclass
class NestedResult:
    prices: np.ndarray  # every row predicted by a blend fitted without its fold (no calibration)
    fold_smape: dict  # fold -> SMAPE of that fold's nested predictions
    fold_blends: dict  # fold -> the Blend fitted on the other folds
    calibrated_prices: Optional[np.ndarray] = None  # the same blends with their calibration; None when off
    calibrated_fold_smape: dict = field(default_factory=dict)
    linear_prices: Optional[np.ndarray] = None  # the weights and scale alone, without the stack model


# ---------------------------------------------------------------- pure fitting functions


def blend_prices(log_preds: np.ndarray, weights, scale: float, floor: float) -> np.ndarray:
    """Prices of the blend: scale * expm1(sum_i w_i p_i), floored at `floor` (never at 0)."""
    blended = np.minimum(np.asarray(log_preds, dtype=np.float64) @ np.asarray(weights, dtype=np.float64), MAX_LOG_PRICE)
    return np.maximum(scale * np.expm1(blended), floor)


def fit_stack(log_preds, y_price, rounds: int = 300, leaves: int = 8, learning_rate: float = 0.03,
              min_child_samples: int = 50, seed: int = 0) -> str:
    """A small LightGBM (L1 on log1p price) on the models' log predictions: it can follow a model
    where another is known to go wrong, which one weight per model cannot. Returned as model text,
    the form the stored blend keeps."""
    import lightgbm as lgb

    params = {"objective": "l1", "num_leaves": leaves, "learning_rate": learning_rate,
              "min_child_samples": min_child_samples, "feature_fraction": 0.8, "bagging_fraction": 0.8,
              "bagging_freq": 1, "seed": seed, "deterministic": True, "num_threads": 1, "verbose": -1}
    data = lgb.Dataset(np.asarray(log_preds, dtype=np.float64), np.log1p(np.asarray(y_price, dtype=np.float64)))
    return lgb.train(params, data, num_boost_round=rounds).model_to_string()


def stack_log_prices(stack: str, log_preds) -> np.ndarray:
    import lightgbm as lgb

    return lgb.Booster(model_str=stack).predict(np.asarray(log_preds, dtype=np.float64))


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


# ---------------------------------------------------------------- calibration by predicted price


def apply_calibration(calibration: Optional[Calibration], price, floor: float) -> np.ndarray:
    """max(price * calibration scale(price), floor); the prices unchanged when there is no calibration."""
    price = np.asarray(price, dtype=np.float64)
    if calibration is None:
        return price
    return np.maximum(price * np.exp(calibration.log_scale(price)), floor)


def fit_calibration(price, y_price, floor: float, shape: str = "bins", bins: int = 10, scale_min: float = 0.5,
                    scale_max: float = 2.0, shrink_rows: float = 0.0, folds=None, steps: int = 81) -> Calibration:
    """A price scale depending on the predicted price `price`, fitted to minimise SMAPE on these rows.

    "bins": edges at the quantiles of `price` (repeated edges merged); each bin's scale is a grid over
    [scale_min, scale_max] then a bounded refinement (`fit_scale`), and its log is shrunk by
    n / (n + shrink_rows) so that a thin bin stays near 1. "loglinear": log scale = a + b * (log price -
    median log price), (a, b) by Nelder-Mead on the exact SMAPE from (0, 0), both shrunk the same way with
    n = all rows. "auto": fits both on all but one of `folds` in turn (every fold once), keeps the shape
    whose held-out SMAPE is lower, and refits it on every row."""
    price = np.asarray(price, dtype=np.float64)
    y_price = np.asarray(y_price, dtype=np.float64)
    if shape not in CALIBRATION_SHAPES:
        raise ValueError(f"fit_calibration: shape {shape!r} is not one of {CALIBRATION_SHAPES}")
    kwargs = dict(bins=bins, scale_min=scale_min, scale_max=scale_max, shrink_rows=shrink_rows, steps=steps)
    if shape == "auto":
        if folds is None or len(np.unique(folds)) < 2:  # no folds given: five seeded parts
            folds = np.random.default_rng(0).permutation(len(price)) % 5
        folds = np.asarray(folds)
        inner = {}
        for candidate in ("bins", "loglinear"):
            held_out = np.empty(len(price))
            for fold in np.unique(folds):
                held = folds == fold
                calibration = fit_calibration(price[~held], y_price[~held], floor, candidate, **kwargs)
                held_out[held] = apply_calibration(calibration, price[held], floor)
            inner[candidate] = smape(y_price, held_out)
        chosen = fit_calibration(price, y_price, floor, min(inner, key=inner.get), **kwargs)
        chosen.inner_cv_smape = inner
        return chosen

    def keep(n):  # the share of a fitted log scale that n rows earn
        return n / (n + shrink_rows) if shrink_rows > 0 else 1.0

    if shape == "bins":
        edges = np.unique(np.quantile(price, np.linspace(0.0, 1.0, max(bins, 1) + 1)[1:-1]))
        which = np.searchsorted(edges, price, side="right")
        counts = np.bincount(which, minlength=len(edges) + 1)
        log_scales = np.zeros(len(edges) + 1)
        for k in np.flatnonzero(counts):
            rows = which == k
            scale = fit_scale(np.log1p(price[rows]), y_price[rows], floor, scale_min, scale_max, steps)
            log_scales[k] = np.log(scale) * keep(counts[k])
        return Calibration("bins", edges=edges, log_scales=log_scales, counts=counts,
                           scale_min=scale_min, scale_max=scale_max)

    centre = float(np.median(np.log(price)))
    lo, hi = np.log(scale_min), np.log(scale_max)

    def score(params):
        log_scale = np.clip(params[0] + params[1] * (np.log(price) - centre), lo, hi)
        return smape(y_price, np.maximum(price * np.exp(log_scale), floor))

    result = minimize(score, np.zeros(2), method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-6})
    params = result.x if result.fun < score(np.zeros(2)) else np.zeros(2)
    params = params * keep(len(price))
    return Calibration("loglinear", counts=np.array([len(price)]), centre=centre, intercept=float(params[0]),
                       slope=float(params[1]), scale_min=scale_min, scale_max=scale_max)


# ---------------------------------------------------------------- the whole fit, and nested CV


def fit_blend(log_preds, y_price, floor: float, scale_min: float = 0.8, scale_max: float = 1.2,
              scale_steps: int = 81, smoothing: float = 1e-3, n_restarts: int = 0, seed: int = 0,
              calibration_bins: int = 0, calibration_shape: str = "auto", calibration_scale_min: float = 0.5,
              calibration_scale_max: float = 2.0, calibration_shrink_rows: float = 0.0, folds=None,
              stack_share: float = 0.0, stack_leaves: int = 8, stack_rounds: int = 300,
              stack_learning_rate: float = 0.03, stack_min_child_samples: int = 50) -> Blend:
    """Weights on the log predictions, then one price scale on the blended prediction, then (when
    `stack_share` > 0) a level-2 LightGBM on the same predictions mixed in, then (when
    `calibration_bins` > 0) a calibration on that price, its inner CV over `folds`."""
    log_preds, y_price = np.asarray(log_preds, dtype=np.float64), np.asarray(y_price, dtype=np.float64)
    weights = fit_weights(log_preds, y_price, floor, smoothing, n_restarts, seed)
    blended = log_preds @ weights
    blend = Blend(weights, fit_scale(blended, y_price, floor, scale_min, scale_max, scale_steps))
    if stack_share > 0:
        blend.stack = fit_stack(log_preds, y_price, stack_rounds, stack_leaves, stack_learning_rate,
                                stack_min_child_samples, seed)
        blend.stack_share = float(stack_share)
    if calibration_bins > 0:
        # on the fitting rows, where the stack model is in-sample; calibrating on its inner out-of-fold
        # predictions instead changed the real rows' nested figure by under 0.01, at five more fits
        price = uncalibrated_prices(blend, log_preds, floor)
        blend.calibration = fit_calibration(price, y_price, floor, calibration_shape, calibration_bins,
                                            calibration_scale_min, calibration_scale_max, calibration_shrink_rows,
                                            folds=folds, steps=scale_steps)
    return blend


def uncalibrated_prices(blend: Blend, log_preds, floor: float) -> np.ndarray:
    """The weights and scale's floored prices, mixed in log space with the stack model's when there is one."""
    price = blend_prices(log_preds, blend.weights, blend.scale, floor)
    if blend.stack is None:
        return price
    mixed = (1 - blend.stack_share) * np.log1p(price) + blend.stack_share * stack_log_prices(blend.stack, log_preds)
    return np.maximum(np.expm1(np.minimum(mixed, MAX_LOG_PRICE)), floor)


def predict_prices(blend: Blend, log_preds, floor: float, calibrated: bool = True) -> np.ndarray:
    """The blend's floored prices, with its calibration when it has one and `calibrated`."""
    price = uncalibrated_prices(blend, log_preds, floor)
    return apply_calibration(blend.calibration, price, floor) if calibrated else price


def nested_cv(log_preds, y_price, folds, fit=fit_blend, **fit_kwargs) -> NestedResult:
    """For each fold f, fit on the other folds' rows only (their own price floor included) and
    predict fold f. `fit(log_preds, y_price, floor, folds=<their folds>, **fit_kwargs)` returns a
    Blend; when it carries a calibration, fold f is predicted both without and with it."""
    log_preds = np.asarray(log_preds, dtype=np.float64)
    y_price = np.asarray(y_price, dtype=np.float64)
    folds = np.asarray(folds)
    prices = np.full(len(y_price), np.nan)
    linear = np.full(len(y_price), np.nan)
    calibrated = np.full(len(y_price), np.nan)
    fold_smape, fold_blends, calibrated_fold_smape = {}, {}, {}
    for fold in np.unique(folds):
        scored = folds == fold
        if scored.all():
            raise ValueError(f"nested_cv: fold {fold} holds every row; at least two folds are needed")
        floor = float(y_price[~scored].min())
        blend = fit(log_preds[~scored], y_price[~scored], floor, folds=folds[~scored], **fit_kwargs)
        linear[scored] = blend_prices(log_preds[scored], blend.weights, blend.scale, floor)
        prices[scored] = uncalibrated_prices(blend, log_preds[scored], floor)
        fold_smape[int(fold)] = smape(y_price[scored], prices[scored])
        fold_blends[int(fold)] = blend
        if blend.calibration is not None:
            calibrated[scored] = apply_calibration(blend.calibration, prices[scored], floor)
            calibrated_fold_smape[int(fold)] = smape(y_price[scored], calibrated[scored])
    has_calibration = len(calibrated_fold_smape) == len(fold_smape)
    return NestedResult(prices, fold_smape, fold_blends, calibrated if has_calibration else None,
                        calibrated_fold_smape if has_calibration else {}, linear)


def smape_by_decile(y_price, pred_price, n_bins: int = 10, by=None) -> pd.DataFrame:
    """SMAPE per decile of `by` (default the true price): rows sorted by it, split into near-equal groups;
    price_from/price_to are the range of `by` in each group."""
    y_price = np.asarray(y_price, dtype=np.float64)
    pred_price = np.asarray(pred_price, dtype=np.float64)
    by = y_price if by is None else np.asarray(by, dtype=np.float64)
    order = np.argsort(by, kind="stable")
    rows = []
    for i, idx in enumerate(np.array_split(order, n_bins)):
        if len(idx) == 0:
            continue
        rows.append({"decile": i + 1, "price_from": float(by[idx].min()), "price_to": float(by[idx].max()),
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


def gain_decision(without: float, with_it: Optional[float], min_gain: float, setting: str,
                  off: str) -> tuple[bool, str]:
    """(use a step for the submission?, the reason in one sentence), from the nested figures without and
    with it; `with_it` None: the step is off (`off` says why). `setting` names the min-gain key."""
    if with_it is None:
        return False, off
    gain = without - with_it
    if gain > min_gain:
        return True, f"used: nested CV {without:.3f} -> {with_it:.3f} with it (gain {gain:.3f} > {setting} {min_gain:g})"
    return False, (f"not used: nested CV {without:.3f} without, {with_it:.3f} with it (gain {gain:.3f}, "
                   f"not above {setting} {min_gain:g})")


def describe_calibration(calibration: Calibration) -> str:
    inner = ", ".join(f"{k} {v:.3f}" for k, v in calibration.inner_cv_smape.items())
    chosen = f"shape {calibration.shape}" + (f", chosen by inner CV SMAPE: {inner}" if inner else "")
    if calibration.shape == "loglinear":
        chosen += (f"; scale {np.exp(calibration.intercept):.4f} at ${np.exp(calibration.centre):.2f}, "
                   f"times (price / ${np.exp(calibration.centre):.2f})^{calibration.slope:.4f}")
    return chosen


def calibration_table(calibration: Calibration) -> pd.DataFrame:
    """The scale the calibration gives across the fitting rows' bins (for "bins": exactly its bins)."""
    if calibration.shape == "bins":
        return pd.DataFrame(calibration.describe()["bins"])
    prices = np.exp(calibration.centre + np.log([0.25, 0.5, 1.0, 2.0, 4.0]))
    return pd.DataFrame({"price": prices, "scale": np.exp(calibration.log_scale(prices))})


def check_config(cfg: EnsembleConfig):
    if cfg.calibration_bins < 0:
        raise ConfigError(f"calibration_bins={cfg.calibration_bins}: must be 0 (off) or a positive bin count")
    if cfg.calibration_shape not in CALIBRATION_SHAPES:
        raise ConfigError(f"calibration_shape={cfg.calibration_shape!r}: must be one of "
                          f"{', '.join(CALIBRATION_SHAPES)}")
    if not cfg.calibration_scale_min <= 1.0 <= cfg.calibration_scale_max:
        raise ConfigError(f"calibration_scale_min={cfg.calibration_scale_min}, calibration_scale_max="
                          f"{cfg.calibration_scale_max}: the range must hold 1 (no change)")
    if not 0.0 <= cfg.stack_share <= 1.0:
        raise ConfigError(f"stack_share={cfg.stack_share}: the stack model's share of the log price, from 0 (off) to 1")
    if cfg.stack_share > 0 and min(cfg.stack_leaves - 1, cfg.stack_rounds, cfg.stack_min_child_samples) < 1:
        raise ConfigError(f"stack_leaves={cfg.stack_leaves}, stack_rounds={cfg.stack_rounds}, stack_min_child_samples="
                          f"{cfg.stack_min_child_samples}: need at least 2 leaves, 1 round and 1 row per leaf")


def blend_record(names: list[str], blend: Blend, floor: float, calibrated: bool) -> dict:
    """Everything that prices a row from its models' log predictions, as JSON (floats round-trip exactly):
    ensemble.json's "blend" entry, read back by `price_rows`."""
    calibration = None
    if calibrated and blend.calibration is not None:
        calibration = {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                       for k, v in dataclasses.asdict(blend.calibration).items() if k != "inner_cv_smape"}
    return {"models": list(names), "weights": [float(w) for w in blend.weights], "scale": float(blend.scale),
            "price_floor": float(floor), "calibration": calibration, "stack": blend.stack,
            "stack_share": blend.stack_share}


def price_rows(record: dict, log_preds: dict) -> np.ndarray:
    """Prices from a stored blend (`blend_record`) and each blended model's log1p predictions for the
    same rows ({model: array}); a model the blend needs and `log_preds` lacks is an error naming it."""
    missing = [m for m in record["models"] if m not in log_preds]
    if missing:
        raise PipelineError(f"the blend needs predictions from {', '.join(missing)}; it has {', '.join(log_preds) or 'none'}")
    columns = np.column_stack([np.asarray(log_preds[m], dtype=np.float64) for m in record["models"]])
    stored = record["calibration"]
    calibration = None if stored is None else Calibration(**{k: (np.asarray(v) if k in ("edges", "log_scales", "counts")
                                                                 else v) for k, v in stored.items()})
    blend = Blend(np.asarray(record["weights"], dtype=np.float64), record["scale"], calibration,
                  record.get("stack"), record.get("stack_share", 0.0))
    return predict_prices(blend, columns, record["price_floor"], calibrated=calibration is not None)


def main(cfg: EnsembleConfig) -> Path:
    out_dir = Path(cfg.predictions_dir) / ENSEMBLE_MODEL
    check_config(cfg)
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
                      smoothing=cfg.smoothing, n_restarts=cfg.n_restarts, seed=cfg.seed,
                      calibration_bins=cfg.calibration_bins, calibration_shape=cfg.calibration_shape,
                      calibration_scale_min=cfg.calibration_scale_min, calibration_scale_max=cfg.calibration_scale_max,
                      calibration_shrink_rows=cfg.calibration_shrink_rows, stack_share=cfg.stack_share,
                      stack_leaves=cfg.stack_leaves, stack_rounds=cfg.stack_rounds,
                      stack_learning_rate=cfg.stack_learning_rate, stack_min_child_samples=cfg.stack_min_child_samples)
    y_clean = y_price[clean]
    model_smape = {name: smape(y_clean, prices_from_log(oof[clean, i], floor)) for i, name in enumerate(names)}
    nested = nested_cv(oof[clean], y_clean, cv_folds, **fit_kwargs)
    # like the calibration below, the stack model is kept only when the nested figure says it helps
    linear_smape = smape(y_clean, nested.linear_prices)
    stacked_smape = smape(y_clean, nested.prices) if cfg.stack_share > 0 else None
    use_stack, stack_decision = gain_decision(linear_smape, stacked_smape, cfg.stack_min_gain, "stack_min_gain",
                                              "off (stack_share=0)")
    if stacked_smape is not None and not use_stack:
        fit_kwargs["stack_share"] = 0.0
        nested = nested_cv(oof[clean], y_clean, cv_folds, **fit_kwargs)
    final = fit_blend(oof[clean], y_clean, floor, folds=cv_folds, **fit_kwargs)

    # the calibration is kept only when the nested figure, which fitted it without the scored fold, says it helps
    uncalibrated_smape = smape(y_clean, nested.prices)
    calibrated_smape = smape(y_clean, nested.calibrated_prices) if final.calibration is not None else None
    use_calibration, decision = gain_decision(uncalibrated_smape, calibrated_smape, cfg.calibration_min_gain,
                                              "calibration_min_gain", "off (calibration_bins=0)")
    nested_prices = nested.calibrated_prices if use_calibration else nested.prices
    fold_smape = nested.calibrated_fold_smape if use_calibration else nested.fold_smape
    nested_smape = smape(y_clean, nested_prices)
    fold_values = np.array(list(fold_smape.values()))
    in_sample = {kind: smape(y_clean, predict_prices(final, oof[clean], floor, calibrated=kind == "calibrated"))
                 for kind in ("uncalibrated", "calibrated")}
    in_sample_smape = in_sample["calibrated" if use_calibration else "uncalibrated"]
    # the test rows are priced from the stored record, the same path that prices new rows later
    record = blend_record(names, final, floor, use_calibration)
    test_prices = price_rows(record, dict(zip(names, test_log.T)))

    # the submission, checked against the raw test CSV when it is still where the data stage read it
    output = Path(cfg.output) if cfg.output else Path(cfg.predictions_dir).parent / "test_out.csv"
    raw_test = Path(read_json(Path(cfg.data_dir) / META_FILE)["config"]["raw_dir"]) / "test.csv"
    write_submission(output, test_ids, test_prices, test_csv=raw_test if raw_test.exists() else None,
                     test_ids=None if raw_test.exists() else test_ids)

    weights = {name: float(w) for name, w in zip(names, final.weights)}
    deciles = smape_by_decile(y_clean, nested.prices)
    if nested.calibrated_prices is not None:
        calibrated_deciles = smape_by_decile(y_clean, nested.calibrated_prices)
        deciles["smape_calibrated"] = calibrated_deciles["smape"]
        deciles["median_pred_over_true_calibrated"] = calibrated_deciles["median_pred_over_true"]
    # by decile of the prediction, the axis the calibration acts on: a bias by true price that the blend
    # shows here too is one a calibration can remove; one that vanishes here is regression to the mean
    predicted_deciles = smape_by_decile(y_clean, nested.prices, by=nested.prices)
    summary = {
        "models": names,
        "weights": weights,
        "scale": final.scale,
        "price_floor": floor,
        "nested_cv_smape": nested_smape,
        "nested_cv_smape_uncalibrated": uncalibrated_smape,
        "nested_cv_smape_calibrated": calibrated_smape,
        "nested_cv_smape_linear": linear_smape,
        "nested_cv_smape_stacked": stacked_smape,
        "stack_used": use_stack,
        "stack_decision": stack_decision,
        "stack_share": cfg.stack_share,
        "calibration_used": use_calibration,
        "calibration_decision": decision,
        "calibration": final.calibration.describe() if final.calibration is not None else None,
        "rows_fitted": int(clean.sum()),
        "encoder_unseen_folds": sorted(set(folds[clean].tolist())),
        "nested_cv_fold_smape": {str(f): v for f, v in fold_smape.items()},
        "nested_cv_fold_smape_uncalibrated": {str(f): v for f, v in nested.fold_smape.items()},
        "nested_cv_fold_smape_calibrated": {str(f): v for f, v in nested.calibrated_fold_smape.items()},
        "nested_cv_smape_std": float(fold_values.std()),
        "nested_cv_fold_weights": {str(f): {n: float(w) for n, w in zip(names, b.weights)}
                                   for f, b in nested.fold_blends.items()},
        "nested_cv_fold_scale": {str(f): b.scale for f, b in nested.fold_blends.items()},
        "nested_cv_fold_calibration_shape": {str(f): b.calibration.shape for f, b in nested.fold_blends.items()
                                             if b.calibration is not None},
        "in_sample_smape": in_sample_smape,
        "in_sample_smape_uncalibrated": in_sample["uncalibrated"],
        "in_sample_smape_calibrated": in_sample["calibrated"] if final.calibration is not None else None,
        "in_sample_note": "weights, scale and calibration fitted and scored on the same OOF rows: optimistic",
        "model_oof_smape": model_smape,
        "model_selection": {p.model: p.meta.get("selection") for p in models},
        "nested_cv_smape_by_decile": deciles.to_dict(orient="records"),
        "nested_cv_smape_by_predicted_decile": predicted_deciles.to_dict(orient="records"),
        "output": str(output),
        "blend": record,
        "config": to_dict(cfg),
    }
    fitted = ["weights", "scale"] + ["stack model"] * use_stack + ["price calibration"] * use_calibration
    selection = f"{', '.join(fitted[:-1])} and {fitted[-1]} fitted on the other folds (nested CV)"
    write_predictions(cfg.predictions_dir, ENSEMBLE_MODEL,
                      pd.DataFrame({"sample_id": np.asarray(train_ids)[clean], "log_pred": np.log1p(nested_prices),
                                    "fold": folds[clean]}),
                      pd.DataFrame({"sample_id": test_ids, "log_pred": np.log1p(test_prices)}),
                      {**summary, "oof_kind": "out_of_fold", "selection": selection})
    write_json(out_dir / "ensemble.json", summary)

    rows = [{"model": n, "oof_smape": model_smape[n], "weight": weights[n],
             "note": "optimistic" if "optimistic" in str(p.meta.get("selection", "")).lower() else ""}
            for n, p in zip(names, models)]
    rows.append({"model": "blend in-sample (optimistic)", "oof_smape": in_sample["uncalibrated"], "weight": "",
                 "note": ""})
    if final.calibration is not None:
        rows.append({"model": "blend + calibration in-sample (optimistic)", "oof_smape": in_sample["calibrated"],
                     "weight": "", "note": ""})
    if stacked_smape is not None:
        rows.append({"model": "weights and scale alone nested CV", "oof_smape": linear_smape, "weight": "", "note": ""})
        rows.append({"model": "with the stack model nested CV", "oof_smape": stacked_smape, "weight": "",
                     "note": f"share {cfg.stack_share:g}, {'used' if use_stack else 'not used'}"})
    rows.append({"model": "blend nested CV", "oof_smape": uncalibrated_smape, "weight": "",
                 "note": f"+/- {np.std(list(nested.fold_smape.values())):.2f} over {len(fold_values)} folds"})
    if final.calibration is not None:
        rows.append({"model": "blend + calibration nested CV", "oof_smape": calibrated_smape, "weight": "",
                     "note": f"+/- {np.std(list(nested.calibrated_fold_smape.values())):.2f} over "
                             f"{len(fold_values)} folds"})
    log.info("blend of %d model(s), price scale %.4f:\n%s", len(names), final.scale,
             format_table(pd.DataFrame(rows), "{:.3f}"))
    if final.calibration is not None:
        log.info("calibration fitted on every row (%s):\n%s", describe_calibration(final.calibration),
                 format_table(calibration_table(final.calibration), "{:.3f}"))
    log.info("stack model: %s", stack_decision)
    log.info("calibration: %s", decision)
    log.info("nested CV SMAPE by decile of the true price:\n%s", format_table(deciles))
    log.info("nested CV SMAPE (no calibration) by decile of the predicted price (price_from/to: predicted):\n%s",
             format_table(predicted_deciles))
    log.info("wrote %s: %d rows, prices %.2f to %.2f (median %.2f)", output, len(test_prices), test_prices.min(),
             test_prices.max(), np.median(test_prices))
    return output

if __name__ == "__main__":
    run_cli(lambda: main(parse_args(EnsembleConfig, profiles=PROFILES)))
