"""Fit the classical heads out of fold, save the fitted run, and write their predictions.

    python -m heads.train [heads=ridge,knn_per_qty,lgbm] [profile=default|small|tiny] key=value ...

Every head trains once per fold of the data stage's `fold` column: the model scored on fold f
never saw fold f. The fold models and every train-side quantity a new row's price needs (TF-IDF,
SVD projections, the train rows' vectors and targets, target-encoding statistics) are saved under
`out_dir` (heads.predict.save_run), so `python -m heads.predict` prices new rows without refitting.
Test predictions are the mean of the fold models in log space, made by heads.predict.predict_rows,
and each head writes `predictions_dir/<head>/` in the core.predictions format with oof_kind
"out_of_fold".

  ridge  word + char TF-IDF -> Ridge on log1p(price)
  knn    distance-weighted mean log price of the nearest rows (cosine, TF-IDF or a cache)
  lgbm   LightGBM on structure, cheap text features, SVD projections, neighbour prices, the ridge
         prediction and target encodings of brand, unit and pack size; the price-based columns of its
         training rows are inner out-of-fold (they never see the scored fold nor the row's own fold)
  lgbm_no_te  the same LightGBM without the target encodings
  mlp    a small network on lgbm's columns, trained on SMAPE of the price (heads.mlp)
  mlp_dist  the same network predicting a distribution over bins of log price, priced at its median
  <head>_per_qty  any head on log(price / quantity), quantity added back in log space; a row without a
         positive quantity keeps log price (offset 0); lgbm_per_qty also reads the neighbours' and the
         encodings' per-quantity prices beside the log price ones
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd

from core.config import ConfigError, parse_args, to_dict
from core.errors import run_cli
from core.metrics import format_table, prices_from_log, smape
from core.predictions import write_predictions
from core.runtime import pick_device, seed_everything, setup_logging
from core.tables import holdout_fold, load_table
from heads.config import HEADS, PROFILES, HeadsConfig
from heads.features import (RIDGE_FEATURES, TfidfText, available_sources, fit_svd, lgbm_base_features,
                            lgbm_fold_frame, name_text, project, row_text, tabular_features)
from heads.neighbours import neighbour_price_features, train_neighbours
from heads.mlp import fit_folds as fit_mlp_folds
from heads.parallel import cores, process_map, thread_map
from heads.predict import (ENCODED_HEADS, NETWORK_HEADS, HeadsRun, RowFeatures, SourceFit, TabularFit, fold_encoding_rows,
                           head_parts, load_row_vectors, quantity_offset, reads_lgbm_columns, save_run, tabular_values,
                           truncated_svd, write_fold_encoding_caches, write_tabular_cache, write_test_caches)
from heads.target_encoding import FIELDS as TARGET_ENCODING_FIELDS, category_keys, encoding_columns, fit_statistics

SELECTION = "fixed hyperparameters from the config; no early stopping or model choice on the scored fold"


def parse_cli(argv=None) -> HeadsConfig:
    return parse_args(HeadsConfig, argv, PROFILES)


def check_config(cfg: HeadsConfig) -> None:
    unknown = [h for h in cfg.heads if h not in HEADS]
    if unknown or not cfg.heads:
        raise ConfigError(f"heads={','.join(cfg.heads)}: each head must be one of {', '.join(HEADS)}")
    if any(f not in TARGET_ENCODING_FIELDS for f in cfg.target_encoding_fields):
        raise ConfigError(f"target_encoding_fields={','.join(cfg.target_encoding_fields)}: each field must be one of "
                          f"{', '.join(TARGET_ENCODING_FIELDS)}")
    if cfg.target_encoding_m < 0:
        raise ConfigError(f"target_encoding_m={cfg.target_encoding_m}: the smoothing weight must be >= 0")
    if cfg.knn_space != "tfidf" and cfg.knn_space not in cfg.embedding_sources:
        raise ConfigError(f"knn_space={cfg.knn_space!r}: use tfidf or one of embedding_sources {cfg.embedding_sources}")
    if any(r not in RIDGE_FEATURES for r in cfg.ridge_features):
        raise ConfigError(f"ridge_features={','.join(cfg.ridge_features)}: each must be one of {', '.join(RIDGE_FEATURES)}")
    if cfg.lgbm_objective not in ("huber", "l1", "regression"):
        raise ConfigError(f"lgbm_objective={cfg.lgbm_objective!r}: use huber, l1 or regression")
    for name in ("mlp_hidden", "mlp_epochs", "mlp_batch_size", "mlp_seeds"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)}: must be at least 1")
    if not 0 <= cfg.mlp_dropout < 1 or cfg.mlp_learning_rate <= 0 or cfg.mlp_weight_decay < 0:
        raise ConfigError(f"mlp_dropout={cfg.mlp_dropout}, mlp_learning_rate={cfg.mlp_learning_rate}, mlp_weight_decay="
                          f"{cfg.mlp_weight_decay}: need 0 <= dropout < 1, learning rate > 0, weight decay >= 0")
    for name in ("n_jobs", "lgbm_threads", "tfidf_neighbour_dims"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)}: must be 0 or more")
    if cfg.mlp_bins < 2 or cfg.mlp_bin_sigma <= 0:
        raise ConfigError(f"mlp_bins={cfg.mlp_bins}, mlp_bin_sigma={cfg.mlp_bin_sigma}: need at least 2 bins and a "
                          "positive label width")


def search_k(cfg: HeadsConfig, space: str) -> int:
    """Neighbours searched in `space`: one search serves every head that reads it."""
    k = 0
    if any(h.startswith("knn") for h in cfg.heads) and space == cfg.knn_space:
        k = max(k, cfg.knn_k)
    if any(reads_lgbm_columns(h) for h in cfg.heads):
        k = max(k, cfg.neighbour_k)
    return k


class Inputs:
    """The train rows and what the heads share, built once: folds, targets, TF-IDF, caches, neighbours.
    What a fit learns from them goes into `self.run`, the HeadsRun that prices any rows afterwards."""

    def __init__(self, cfg: HeadsConfig, log):
        self.cfg, self.log = cfg, log
        self.train = load_table(cfg.data_dir, "train").reset_index(drop=True)
        self.train_ids = self.train["sample_id"].astype(str).to_numpy()
        self.folds = self.train["fold"].to_numpy(dtype=np.int64)
        self.fold_ids = sorted(np.unique(self.folds).tolist())
        if len(self.fold_ids) < 3:
            raise ConfigError(f"{cfg.data_dir}: {len(self.fold_ids)} folds; the inner out-of-fold features need at least 3")
        self.y = self.train["log_price"].to_numpy(dtype=np.float64)
        self.price = self.train["price"].to_numpy(dtype=np.float64)
        self.floor = float(self.price.min())
        # the per-quantity twins learn log(price / quantity), log price where a row has no positive quantity
        self.targets = {"log1p": self.y, "per_qty": np.log(self.price) - quantity_offset(self.train)}
        self.device = str(pick_device(cfg.device))
        self.units = sorted(self.train["unit"].astype(str).unique().tolist())
        self.n_jobs = cores(cfg.n_jobs)
        self._cache = {}
        self._ridge: dict[str, tuple] = {}

    def _once(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def text(self) -> TfidfText:
        return self.tfidf_fit[0]

    @property
    def tfidf(self):
        """The train rows' TF-IDF matrix."""
        return self.tfidf_fit[1]

    @property
    def tfidf_fit(self):
        def fit():
            start = time.time()
            text = TfidfText(self.cfg)
            matrix = text.fit_transform(row_text(self.train))
            self.log.info("TF-IDF: %d features (%.0f s)", matrix.shape[1], time.time() - start)
            return text, matrix

        return self._once("tfidf", fit)

    @property
    def name_tfidf(self):
        """(TfidfText fitted on the train rows' item names, their matrix) for the name ridge."""
        def fit():
            text = TfidfText(self.cfg)
            return text, text.fit_transform(name_text(self.train))

        return self._once("name_tfidf", fit)

    def text_svd(self, dims: int):
        """The TF-IDF's SVD with `dims` components, each width fitted once. The tabular cache and the
        neighbour space share one fit (the wider, cut to each); LightGBM's columns keep a fit of their own
        width, since cut from the wider fit they moved lgbm's out-of-fold SMAPE 54.67 -> 54.77 on the real rows."""
        cfg = self.cfg
        shared = max(cfg.tabular_svd_dims if cfg.tabular_source else 0, cfg.tfidf_neighbour_dims)
        width = dims if dims == cfg.tfidf_svd_dims or dims > shared else shared

        def fit():
            start = time.time()
            svd = fit_svd(self.tfidf, width, cfg.seed)
            self.log.info("TF-IDF SVD: %d components (%.0f s)", svd.components_.shape[0], time.time() - start)
            return svd

        return truncated_svd(self._once(("text_svd", width), fit), dims)

    @property
    def tfidf_vectors(self) -> np.ndarray:
        """The train rows in the neighbour search's TF-IDF space (tfidf_neighbour_dims of the SVD)."""
        return self._once("tfidf_vectors", lambda: project(self.text_svd(self.cfg.tfidf_neighbour_dims), self.tfidf))

    @property
    def sources(self):
        return self._once("sources", lambda: {s.name: s for s in available_sources(self.cfg, self.train_ids, None,
                                                                                  self.log)})

    def neighbours(self, space: str):
        """(indices, similarities) [n_folds, n_train, k] of the train rows in `space` ('tfidf' or a source)."""
        def search():
            start, k = time.time(), search_k(self.cfg, space)
            if space == "tfidf":
                vectors = self.tfidf_vectors if self.cfg.tfidf_neighbour_dims > 0 else self.tfidf
                result = train_neighbours(vectors, self.folds, k, device=self.device, chunk_size=self.cfg.chunk_size)
            else:
                if space not in self.sources:
                    raise ConfigError(f"neighbour space {space!r}: no cache for it under {self.cfg.embeddings_dir}")
                s = self.sources[space]
                result = train_neighbours(s.train, self.folds, k, s.train_present, device=self.device,
                                          chunk_size=self.cfg.chunk_size)
            self.log.info("neighbours in %s: k=%d, %d folds (%.0f s)", space, k, len(self.fold_ids), time.time() - start)
            return result

        return self._once(("neighbours", space), search)

    def fold_mask(self, fold: int) -> np.ndarray:
        return self.folds == fold

    def ridge(self, tag: str):
        """(out-of-fold predictions, fold models) of the ridge on target `tag`, fitted once: a head of its
        own and (on log1p price) LightGBM's ridge feature. Tag "name": log1p price from the item name alone."""
        if tag not in self._ridge:
            target = self.y if tag == "name" else self.targets[tag]
            self._ridge[tag] = fit_ridge(self, target, self.ridge_matrix(tag))
        return self._ridge[tag]

    def ridge_matrix(self, tag: str):
        """The TF-IDF the ridge on `tag` reads: the item names' for "name", else the whole text's."""
        return self.name_tfidf[1] if tag == "name" else self.tfidf

    @property
    def run(self) -> HeadsRun:
        """The fitted run the heads fill in as they train."""
        def start_run():
            spaces = set()
            if any(h.startswith("knn") for h in self.cfg.heads):
                spaces.add(self.cfg.knn_space)
            if any(reads_lgbm_columns(h) for h in self.cfg.heads):
                spaces.update(["tfidf", *self.sources])
            dense = "tfidf" in spaces and self.cfg.tfidf_neighbour_dims > 0
            return HeadsRun(cfg=self.cfg, fold_ids=self.fold_ids, train_ids=self.train_ids,
                            train_text=row_text(self.train).to_numpy(), folds=self.folds, targets=self.targets,
                            text=self.text, train_tfidf=self.tfidf, tfidf_svd=None, units=self.units, sources={},
                            search_k={s: search_k(self.cfg, s) for s in sorted(spaces)},
                            neighbour_svd=self.text_svd(self.cfg.tfidf_neighbour_dims) if dense else None,
                            tfidf_vectors=self.tfidf_vectors if dense else None, device=self.device,
                            chunk_size=self.cfg.chunk_size)

        return self._once("run", start_run)


# ---------------------------------------------------------------- ridge

def _ridge(alpha: float, seed: int):
    from sklearn.linear_model import Ridge

    return Ridge(alpha=alpha, solver="sparse_cg", random_state=seed)


def fit_ridge_rows(x, target: np.ndarray, fit: np.ndarray, scored: np.ndarray, alpha: float, seed: int):
    """(ridge fitted on rows `fit`, its predictions for rows `scored`): one task of the parallel fits."""
    model = _ridge(alpha, seed).fit(x[fit], target[fit])
    return model, model.predict(x[scored])


def fit_ridge(inputs: Inputs, target: np.ndarray, x_train):
    """Out-of-fold ridge on a TF-IDF matrix of the train rows: (oof [n_train], fold models); the folds
    are fitted n_jobs at a time."""
    cfg = inputs.cfg
    fitted = process_map(fit_ridge_rows, [(x_train, target, ~inputs.fold_mask(f), inputs.fold_mask(f), cfg.ridge_alpha,
                                           cfg.seed) for f in inputs.fold_ids], inputs.n_jobs)
    oof = np.zeros(len(target))
    for f, (_, pred) in zip(inputs.fold_ids, fitted):
        oof[inputs.fold_mask(f)] = pred
    return oof, [model for model, _ in fitted]


def ridge_head(inputs: Inputs, tag: str):
    oof, models = inputs.ridge(tag)
    inputs.run.ridge[tag] = models
    return oof, {"embedding_sources": []}


def ridge_inner_features(inputs: Inputs, oof: np.ndarray, x_train) -> dict:
    """The ridge prediction as a LightGBM feature of the train rows, per fold model f: rows of fold f get
    the model trained without f (the head's own out-of-fold prediction); rows of another fold g get a
    model trained without f and g. One inner model serves the pair {f, g} both ways. New rows get the
    fold model f (the ridge head's), as the scored fold's rows do. x_train: the TF-IDF the ridge reads."""
    cfg = inputs.cfg
    pairs = [(f, g) for i, f in enumerate(inputs.fold_ids) for g in inputs.fold_ids[i + 1:]]
    both = [inputs.fold_mask(f) | inputs.fold_mask(g) for f, g in pairs]
    fitted = process_map(fit_ridge_rows, [(x_train, inputs.y, ~rows, rows, cfg.ridge_alpha, cfg.seed) for rows in both],
                         inputs.n_jobs)
    pair_pred = {}
    for (f, g), rows, (_, values) in zip(pairs, both, fitted):
        pred = np.full(len(inputs.y), np.nan)
        pred[rows] = values
        pair_pred[(f, g)] = pair_pred[(g, f)] = pred
    features = {}
    for f in inputs.fold_ids:
        train_feature = np.where(inputs.fold_mask(f), oof, np.nan)
        for g in inputs.fold_ids:
            if g != f:
                train_feature = np.where(inputs.fold_mask(g), pair_pred[(f, g)], train_feature)
        features[f] = train_feature
    return features


# ---------------------------------------------------------------- knn

def weighted_neighbour_price(indices, similarities, y, eps: float) -> np.ndarray:
    """Distance-weighted mean log price of the given neighbours; NaN where a row has none."""
    return neighbour_price_features(indices, similarities, y, eps)["weighted_log_price"]


def knn_head(inputs: Inputs, tag: str):
    """The neighbours' distance-weighted mean of the target."""
    cfg, target = inputs.cfg, inputs.targets[tag]
    indices, similarities = inputs.neighbours(cfg.knn_space)
    oof, fallbacks = np.zeros(len(target)), []
    for m, f in enumerate(inputs.fold_ids):
        scored = inputs.fold_mask(f)
        fallback = float(np.median(target[~scored]))  # rows without a vector in this space
        k = cfg.knn_k
        pred = weighted_neighbour_price(indices[m][scored, :k], similarities[m][scored, :k], target, cfg.distance_eps)
        oof[scored] = np.where(np.isnan(pred), fallback, pred)
        fallbacks.append(fallback)
    inputs.run.knn_fallback[tag] = fallbacks
    return oof, {"embedding_sources": [cfg.knn_space]}


# ---------------------------------------------------------------- lgbm

def lgbm_shared_features(inputs: Inputs) -> pd.DataFrame:
    """The train rows' columns that hold no price (structure, cheap text features, SVD projections);
    the SVDs are fitted here, once, and join the run."""
    def fit():
        cfg, run = inputs.cfg, inputs.run
        if cfg.tfidf_svd_dims > 0:
            run.tfidf_svd = inputs.text_svd(cfg.tfidf_svd_dims)
        for name, s in inputs.sources.items():
            svd = fit_svd(s.train, cfg.embedding_svd_dims, cfg.seed, s.train_present) if cfg.embedding_svd_dims > 0 else None
            run.sources[name] = SourceFit(svd, s.train, s.train_present)
        return lgbm_base_features(inputs.train, inputs.units, inputs.tfidf, run.tfidf_svd,
                                  {name: (s.train, s.train_present) for name, s in inputs.sources.items()},
                                  {name: s.svd for name, s in run.sources.items() if s.svd is not None})

    return inputs._once("lgbm_base", fit)


def lgbm_fold_frames(inputs: Inputs, m: int, base_train: pd.DataFrame, targets: dict, ridge_features=None,
                     encodings=None) -> pd.DataFrame:
    """The train rows' features for the model scored on fold `fold_ids[m]`: the shared columns plus the
    neighbour-price columns of every space and target (`targets`: {tag: train values}), the ridge column
    and the target-encoding columns (`encodings`, per fold from `fold_encodings`), all under the fold rule."""
    cfg = inputs.cfg
    neighbours = {s: tuple(a[m] for a in inputs.neighbours(s)) for s in ["tfidf", *inputs.sources]}
    return lgbm_fold_frame(base_train, neighbours, targets, cfg.neighbour_k, cfg.distance_eps,
                           {column: values[inputs.fold_ids[m]] for column, values in (ridge_features or {}).items()},
                           encodings[m] if encodings else None)


def lgbm_ridge_features(inputs: Inputs) -> dict:
    """{column: {fold: train rows' values}} of cfg.ridge_features under the inner fold rule, computed once;
    their fold models join the run."""
    def fit():
        run, features = inputs.run, {}
        for name in inputs.cfg.ridge_features:
            tag, column = RIDGE_FEATURES[name]
            oof, models = inputs.ridge(tag)
            run.ridge[tag] = models
            if tag == "name":
                run.name_text = inputs.name_tfidf[0]
            features[column] = ridge_inner_features(inputs, oof, inputs.ridge_matrix(tag))
        return features

    return inputs._once("ridge_features", fit)


def lgbm_layout(cfg: HeadsConfig, n_jobs: int, n_folds: int) -> tuple[int, int]:
    """(LightGBM fits at once, threads per fit): lgbm_threads per fit, or the n_jobs cores shared among
    as many folds as they cover."""
    if cfg.lgbm_threads > 0:
        return max(1, n_jobs // cfg.lgbm_threads), cfg.lgbm_threads
    at_once = max(1, min(n_jobs, n_folds))
    return at_once, max(1, n_jobs // at_once)


def lgbm_params(cfg: HeadsConfig, threads: int | None = None) -> dict:
    """LightGBM's parameters; col-wise histograms, each feature's summed by one thread, and deterministic,
    so the trees do not depend on `threads` (default cfg.lgbm_threads, 0: LightGBM's own default)."""
    params = {"objective": cfg.lgbm_objective, "learning_rate": cfg.lgbm_learning_rate,
              "num_leaves": cfg.lgbm_num_leaves, "min_child_samples": cfg.lgbm_min_child_samples,
              "feature_fraction": cfg.lgbm_feature_fraction, "bagging_fraction": cfg.lgbm_bagging_fraction,
              "bagging_freq": 1, "lambda_l2": cfg.lgbm_lambda_l2,
              "num_threads": cfg.lgbm_threads if threads is None else threads, "force_col_wise": True,
              "seed": cfg.seed, "deterministic": True, "verbose": -1}
    if cfg.lgbm_objective == "huber":
        params["alpha"] = cfg.lgbm_huber_delta
    return params


def fold_encodings(inputs: Inputs, tag: str) -> list[dict]:
    """Per fold: the train rows' out-of-fold target encodings of cfg.target_encoding_fields, of log1p
    price (`te_*`, with the counts) and, for the per-quantity target, of it too (`teq_*`). Their key
    statistics join the run."""
    cfg = inputs.cfg
    if not cfg.target_encoding_fields:
        return []
    tags = ("te",) if tag == "log1p" else ("te", "teq")
    keys = inputs._once("keys", lambda: category_keys(inputs.train, cfg.target_encoding_fields))
    run = inputs.run
    for te_tag, target_tag in (("te", "log1p"), ("teq", "per_qty")):
        if te_tag in tags and te_tag not in run.encodings:
            run.encodings.update(fit_statistics(keys, {te_tag: inputs.targets[target_tag]}, inputs.folds))
    # the train rows' columns per fold model: each row also leaves its own fold out
    return encoding_columns({t: run.encodings[t] for t in tags}, keys, cfg.target_encoding_m, inputs.folds)


def fit_lgbm_fold(x, target, cfg: HeadsConfig, threads: int | None = None):
    import lightgbm as lgb

    model = lgb.train(lgbm_params(cfg, threads), lgb.Dataset(x, target, free_raw_data=True),
                      num_boost_round=cfg.lgbm_rounds)
    # the model as saved and loaded (text), so the fit prices rows exactly as a loaded run does
    return lgb.Booster(model_str=model.model_to_string())


def column_head(inputs: Inputs, tag: str, head: str = "lgbm"):
    """A model on lgbm's columns: LightGBM on target `tag` (lgbm, lgbm_no_te), or a network on SMAPE of
    the price (mlp) or on a distribution over price bins (mlp_dist). The per-quantity target is also
    summarised by the neighbours and the encodings, beside log1p price."""
    cfg, run, base = inputs.cfg, inputs.run, head_parts(head)[0]
    target = inputs.targets[tag]
    base_train = lgbm_shared_features(inputs)
    ridge_features = lgbm_ridge_features(inputs)
    encodings = fold_encodings(inputs, tag) if base in ENCODED_HEADS else []
    targets = {"nb": inputs.y} if tag == "log1p" else {"nb": inputs.y, "nbq": target}
    frames = [lgbm_fold_frames(inputs, m, base_train, targets, ridge_features, encodings)
              for m in range(len(inputs.fold_ids))]
    fits = [~inputs.fold_mask(f) for f in inputs.fold_ids]
    if base in NETWORK_HEADS:  # every (fold, seed) network a task of its own
        models = fit_mlp_folds([x[fit] for x, fit in zip(frames, fits)], [inputs.price[fit] for fit in fits], cfg,
                               inputs.device, distribution=base == "mlp_dist", n_jobs=inputs.n_jobs)
    else:
        at_once, threads = lgbm_layout(cfg, inputs.n_jobs, len(frames))
        models = thread_map(fit_lgbm_fold, [(x[fit], target[fit], cfg, threads) for x, fit in zip(frames, fits)],
                            at_once)
    oof, columns = np.zeros(len(target)), []
    for f, x_train, model in zip(inputs.fold_ids, frames, models):
        scored = inputs.fold_mask(f)
        oof[scored] = model.predict(x_train[scored])
        columns.append(list(x_train.columns))
    (run.mlp if base in NETWORK_HEADS else run.lgbm)[head] = models
    run.features[head] = columns
    return oof, {"features": columns[-1], "embedding_sources": list(inputs.sources)}


def head_function(name: str):
    """The function fitting head `name`: (inputs) -> (oof [n_train] in log1p(price), meta extras); its
    fold models join inputs.run."""
    base, tag = head_parts(name)
    if base == "ridge":
        fit = lambda inputs: ridge_head(inputs, tag)
    elif base == "knn":
        fit = lambda inputs: knn_head(inputs, tag)
    else:
        fit = lambda inputs: column_head(inputs, tag, name)
    if tag == "log1p":
        return fit

    def twin(inputs: Inputs):
        """log(price / quantity) learnt; the row's own log quantity added back to every prediction."""
        offset = quantity_offset(inputs.train)
        oof, extra = fit(inputs)
        extra = {**extra, "target": "log(price / quantity_value), + log(quantity_value); log(price) where no quantity",
                 "rows_with_quantity": int((offset != 0).sum())}
        return np.log1p(np.exp(oof + offset)), extra

    return twin


def fit_tabular(inputs: Inputs) -> np.ndarray:
    """The tabular cache's transform, fitted on the train rows (it joins the run), and their rows of it:
    the price-free columns (structure, cheap text features, the TF-IDF's SVD), so fusion can read the
    catalog's sparse text signal beside the encoders' vectors. Signed log1p, then standardised with the
    train rows' statistics; a unit is one-hot."""
    cfg = inputs.cfg
    tab = tabular_features(inputs.train, inputs.units).drop(columns="unit").to_numpy(dtype=np.float64)
    numeric = np.sign(tab) * np.log1p(np.abs(tab))
    svd = inputs.text_svd(cfg.tabular_svd_dims)
    fit = TabularFit(svd, np.nanmean(numeric, axis=0), np.nanstd(numeric, axis=0) + 1e-6,
                     float(np.abs(project(svd, inputs.tfidf)).std() + 1e-6))
    inputs.run.tabular = fit
    return tabular_values(fit, inputs.train, inputs.units, inputs.tfidf)


# ---------------------------------------------------------------- main

def encoder_unseen_folds(inputs: Inputs, spaces: list[str]) -> list[int]:
    """Folds no upstream fine-tuned encoder trained on: all of them unless a fine-tuned cache is used."""
    if any(s in inputs.cfg.finetuned_sources for s in spaces):
        return [holdout_fold(inputs.cfg.data_dir)]
    return list(inputs.fold_ids)


def score(inputs: Inputs, oof: np.ndarray) -> tuple[float, dict]:
    per_fold = {int(f): smape(inputs.price[inputs.fold_mask(f)], prices_from_log(oof[inputs.fold_mask(f)], inputs.floor))
                for f in inputs.fold_ids}
    return smape(inputs.price, prices_from_log(oof, inputs.floor)), per_fold


def main(cfg: HeadsConfig, timed=None) -> dict:
    """Fit every head out of fold, save the run, price the test rows. timed(piece, work): called around
    each piece of the stage with work() to run (bench.scale times them); by default it just runs it."""
    timed = timed or (lambda piece, work: work())
    log = setup_logging("heads.train")
    check_config(cfg)
    seed_everything(cfg.seed)
    inputs = timed("load the train table", lambda: Inputs(cfg, log))
    test = load_table(cfg.data_dir, "test").reset_index(drop=True)
    test_ids = test["sample_id"].astype(str).to_numpy()
    log.info("%d train rows in %d folds, %d test rows; heads %s; device %s", len(inputs.y), len(inputs.fold_ids),
             len(test_ids), ",".join(cfg.heads), inputs.device)
    # the shared pieces first, each timed alone (the heads would compute them on first use)
    timed("TF-IDF", lambda: inputs.tfidf)
    if cfg.tfidf_neighbour_dims > 0:
        timed("TF-IDF SVD (shared)", lambda: inputs.text_svd(cfg.tfidf_neighbour_dims))
    timed("embedding sources", lambda: inputs.sources)
    if cfg.tabular_source:
        values = timed("tabular cache", lambda: fit_tabular(inputs))
        write_tabular_cache(cfg.embeddings_dir, cfg.tabular_source, "train", inputs.train_ids, values, to_dict(cfg))
    for space in sorted(inputs.run.search_k):
        timed(f"neighbour search, train rows, {space}", lambda: inputs.neighbours(space))
    baseline = np.zeros(len(inputs.y))
    for f in inputs.fold_ids:
        baseline[inputs.fold_mask(f)] = np.median(inputs.y[~inputs.fold_mask(f)])
    rows = [{"head": "constant median", "oof_smape": score(inputs, baseline)[0], "fold_std": float("nan"),
             "seconds": 0.0}]
    results, oofs = {}, {}
    for head in cfg.heads:
        start = time.time()
        oof, extra = timed(head, lambda: head_function(head)(inputs))
        spaces = extra.pop("embedding_sources")
        seconds = time.time() - start
        oof_smape, fold_smape = score(inputs, oof)
        results[head] = {"oof_kind": "out_of_fold", "selection": SELECTION, "config": to_dict(cfg),
                         "folds": inputs.fold_ids, "fold_smape": fold_smape, "oof_smape": oof_smape,
                         "seconds": seconds, "target": "log1p(price)", "embedding_sources": spaces,
                         "encoder_unseen_folds": encoder_unseen_folds(inputs, spaces), "run_dir": str(cfg.out_dir),
                         **extra}
        oofs[head] = oof
        log.info("%s: OOF SMAPE %.2f, folds %s (%.0f s)", head, oof_smape,
                 " ".join(f"{v:.2f}" for v in fold_smape.values()), seconds)
        rows.append({"head": head, "oof_smape": oof_smape, "fold_std": float(np.std(list(fold_smape.values()))),
                     "seconds": seconds})

    run = inputs.run
    if cfg.knn_space in inputs.sources and any(h.startswith("knn") for h in cfg.heads):
        s = inputs.sources[cfg.knn_space]  # the knn head's space, when no lgbm head added it already
        run.sources.setdefault(s.name, SourceFit(None, s.train, s.train_present))
    timed("save the run", lambda: save_run(run, cfg.out_dir))
    log.info("saved the fitted run to %s", cfg.out_dir)

    # the test rows, priced by the code that prices any rows with a saved run
    start = time.time()
    priced = timed("load the test rows' vectors",
                   lambda: RowFeatures(run, test, load_row_vectors(run, cfg.embeddings_dir, "test", test_ids)))
    for space in sorted(run.search_k):
        timed(f"neighbour search, test rows, {space}", lambda: priced.neighbours(space))

    def write_test_side():
        for head in cfg.heads:
            write_predictions(cfg.predictions_dir, head,
                              pd.DataFrame({"sample_id": inputs.train_ids, "log_pred": oofs[head], "fold": inputs.folds}),
                              pd.DataFrame({"sample_id": test_ids, "log_pred": priced.head(head).mean(axis=0)}),
                              results[head])
        write_test_caches(run, cfg.embeddings_dir, test, priced.tabular() if cfg.tabular_source else None)
        if cfg.target_encoding_source and (train_rows := fold_encoding_rows(run, inputs.train, inputs.folds)):
            written = write_fold_encoding_caches(run, cfg.embeddings_dir, "train", inputs.train_ids, train_rows)
            log.info("wrote the target-encoding caches %s: %d columns each, under the lgbm heads' fold rule",
                     ", ".join(written), train_rows[0].shape[1])

    timed("price the test rows, write predictions and caches", write_test_side)
    log.info("priced %d test rows (%.0f s)", len(test_ids), time.time() - start)
    print(format_table(pd.DataFrame(rows)))
    return results


if __name__ == "__main__":
    run_cli(lambda: main(parse_cli()))
