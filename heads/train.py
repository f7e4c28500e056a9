"""Train the classical heads out of fold and write their predictions.

    python -m heads.train [heads=ridge,knn_per_qty,lgbm] [profile=default|small|tiny] key=value ...

Every head trains once per fold of the data stage's `fold` column: the model scored on fold f
never saw fold f, test predictions are the mean of the fold models in log space, and each head
writes `predictions_dir/<head>/` in the core.predictions format with oof_kind "out_of_fold".

  ridge  word + char TF-IDF -> Ridge on log1p(price)
  knn    distance-weighted mean log price of the nearest rows (cosine, TF-IDF or a cache)
  lgbm   LightGBM on structure, cheap text features, SVD projections, neighbour prices, the ridge
         prediction and target encodings of brand, unit and pack size; the price-based columns of its
         training rows are inner out-of-fold (they never see the scored fold nor the row's own fold)
  lgbm_no_te  the same LightGBM without the target encodings
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
from heads.features import available_sources, svd_projection, tabular_features, tfidf_matrices
from heads.neighbours import fold_neighbours, neighbour_price_features
from heads.target_encoding import FIELDS as TARGET_ENCODING_FIELDS, category_keys, target_encoding_columns

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
    if cfg.lgbm_objective not in ("huber", "l1", "regression"):
        raise ConfigError(f"lgbm_objective={cfg.lgbm_objective!r}: use huber, l1 or regression")


class Inputs:
    """Everything the heads share, built once: tables, folds, target, TF-IDF, caches, neighbours."""

    def __init__(self, cfg: HeadsConfig, log):
        self.cfg, self.log = cfg, log
        self.train = load_table(cfg.data_dir, "train").reset_index(drop=True)
        self.test = load_table(cfg.data_dir, "test").reset_index(drop=True)
        self.train_ids = self.train["sample_id"].astype(str).to_numpy()
        self.test_ids = self.test["sample_id"].astype(str).to_numpy()
        self.folds = self.train["fold"].to_numpy(dtype=np.int64)
        self.fold_ids = sorted(np.unique(self.folds).tolist())
        if len(self.fold_ids) < 3:
            raise ConfigError(f"{cfg.data_dir}: {len(self.fold_ids)} folds; the inner out-of-fold features need at least 3")
        self.y = self.train["log_price"].to_numpy(dtype=np.float64)
        self.price = self.train["price"].to_numpy(dtype=np.float64)
        self.floor = float(self.price.min())
        self.device = str(pick_device(cfg.device))
        self._tfidf = self._sources = None
        self._neighbours: dict[str, list] = {}
        self._ridge_predictions = None

    @property
    def tfidf(self):
        if self._tfidf is None:
            start = time.time()
            self._tfidf = tfidf_matrices(self.train["text"].fillna("").astype(str),
                                         self.test["text"].fillna("").astype(str), self.cfg)
            self.log.info("TF-IDF: %d features (%.0f s)", self._tfidf[0].shape[1], time.time() - start)
        return self._tfidf

    @property
    def sources(self):
        if self._sources is None:
            self._sources = {s.name: s for s in available_sources(self.cfg, self.train_ids, self.test_ids, self.log)}
        return self._sources

    def neighbours(self, space: str, k: int):
        """Per-fold neighbours in `space` ('tfidf' or a source name), at least k of them."""
        if space not in self._neighbours or self._neighbours[space][0].train_indices.shape[1] < k:
            start = time.time()
            # one search serves both heads: as many neighbours as either asks for in this space
            if any(h.startswith("knn") for h in self.cfg.heads) and space == self.cfg.knn_space:
                k = max(k, self.cfg.knn_k)
            if any(h.startswith("lgbm") for h in self.cfg.heads):
                k = max(k, self.cfg.neighbour_k)
            if space == "tfidf":
                train, test = self.tfidf
                result = fold_neighbours(train, test, self.folds, k, device=self.device, chunk_size=self.cfg.chunk_size)
            else:
                if space not in self.sources:
                    raise ConfigError(f"neighbour space {space!r}: no cache for it under {self.cfg.embeddings_dir}")
                s = self.sources[space]
                result = fold_neighbours(s.train, s.test, self.folds, k, s.train_present, s.test_present,
                                         device=self.device, chunk_size=self.cfg.chunk_size)
            self._neighbours[space] = result
            self.log.info("neighbours in %s: k=%d, %d folds (%.0f s)", space, k, len(result), time.time() - start)
        return self._neighbours[space]

    def fold_mask(self, fold: int) -> np.ndarray:
        return self.folds == fold

    def ridge_predictions(self):
        """The ridge head on log1p(price), computed once: a head of its own and LightGBM's ridge feature."""
        if self._ridge_predictions is None:
            self._ridge_predictions = ridge_predictions(self, self.y)
        return self._ridge_predictions


# ---------------------------------------------------------------- ridge

def _ridge(alpha: float, seed: int):
    from sklearn.linear_model import Ridge

    return Ridge(alpha=alpha, solver="sparse_cg", random_state=seed)


def ridge_predictions(inputs: Inputs, target: np.ndarray):
    """Out-of-fold ridge on the TF-IDF: (oof [n_train], test per fold [k, n_test])."""
    cfg, (x_train, x_test) = inputs.cfg, inputs.tfidf
    oof, test = np.zeros(len(target)), []
    for f in inputs.fold_ids:
        fit, scored = ~inputs.fold_mask(f), inputs.fold_mask(f)
        model = _ridge(cfg.ridge_alpha, cfg.seed).fit(x_train[fit], target[fit])
        oof[scored] = model.predict(x_train[scored])
        test.append(model.predict(x_test))
    return oof, np.stack(test)


def ridge_head(inputs: Inputs, target=None):
    if target is None:
        oof, test = inputs.ridge_predictions()
    else:
        oof, test = ridge_predictions(inputs, target)
    return oof, test, {"embedding_sources": []}


def ridge_inner_features(inputs: Inputs, oof: np.ndarray, test: np.ndarray):
    """The ridge prediction as a LightGBM feature, per fold model f: rows of fold f and the test rows
    get the model trained without f (the head's own out-of-fold prediction); rows of another fold g get
    a model trained without f and g. One inner model serves the pair {f, g} both ways."""
    cfg, (x_train, _) = inputs.cfg, inputs.tfidf
    pair_pred = {}
    for i, f in enumerate(inputs.fold_ids):
        for g in inputs.fold_ids[i + 1:]:
            fit = ~(inputs.fold_mask(f) | inputs.fold_mask(g))
            both = ~fit
            model = _ridge(cfg.ridge_alpha, cfg.seed).fit(x_train[fit], inputs.y[fit])
            pred = np.full(len(inputs.y), np.nan)
            pred[both] = model.predict(x_train[both])
            pair_pred[(f, g)] = pair_pred[(g, f)] = pred
    features = {}
    for m, f in enumerate(inputs.fold_ids):
        train_feature = np.where(inputs.fold_mask(f), oof, np.nan)
        for g in inputs.fold_ids:
            if g != f:
                train_feature = np.where(inputs.fold_mask(g), pair_pred[(f, g)], train_feature)
        features[f] = (train_feature, test[m])
    return features


# ---------------------------------------------------------------- knn

def weighted_neighbour_price(indices, similarities, y, eps: float) -> np.ndarray:
    """Distance-weighted mean log price of the given neighbours; NaN where a row has none."""
    return neighbour_price_features(indices, similarities, y, eps)["weighted_log_price"]


def knn_head(inputs: Inputs, target=None):
    """The neighbours' distance-weighted mean of the target (log1p price unless given)."""
    cfg = inputs.cfg
    target = inputs.y if target is None else target
    per_fold = inputs.neighbours(cfg.knn_space, cfg.knn_k)
    oof, test = np.zeros(len(target)), []
    for fn in per_fold:
        scored = inputs.fold_mask(fn.fold)
        fallback = float(np.median(target[~scored]))  # rows without a vector in this space
        k = cfg.knn_k
        pred = weighted_neighbour_price(fn.train_indices[scored, :k], fn.train_similarities[scored, :k], target,
                                        cfg.distance_eps)
        oof[scored] = np.where(np.isnan(pred), fallback, pred)
        pred = weighted_neighbour_price(fn.test_indices[:, :k], fn.test_similarities[:, :k], target, cfg.distance_eps)
        test.append(np.where(np.isnan(pred), fallback, pred))
    return oof, np.stack(test), {"embedding_sources": [cfg.knn_space]}


# ---------------------------------------------------------------- lgbm

def lgbm_fold_frames(inputs: Inputs, m: int, fold: int, base_train, base_test, ridge_features, unit_target=None,
                     encodings=None):
    """(train features, test features) for the model scored on `fold`: the shared columns plus the
    neighbour-price columns of every space (and, given `unit_target`, the neighbours' log price per
    quantity), the ridge column and the target-encoding columns (`encodings`, per fold from
    `fold_encodings`), all computed under the fold rule."""
    cfg = inputs.cfg
    train_cols, test_cols = {}, {}
    targets = {"nb": inputs.y} if unit_target is None else {"nb": inputs.y, "nbq": unit_target}
    for space in ["tfidf", *inputs.sources]:
        fn = inputs.neighbours(space, cfg.neighbour_k)[m]
        k = cfg.neighbour_k
        for tag, values_of in targets.items():
            for name, values in neighbour_price_features(fn.train_indices[:, :k], fn.train_similarities[:, :k],
                                                         values_of, cfg.distance_eps).items():
                train_cols[f"{space}_{tag}_{name}"] = values
            for name, values in neighbour_price_features(fn.test_indices[:, :k], fn.test_similarities[:, :k],
                                                         values_of, cfg.distance_eps).items():
                test_cols[f"{space}_{tag}_{name}"] = values
    if ridge_features is not None:
        train_cols["ridge_log_price"], test_cols["ridge_log_price"] = ridge_features[fold]
    if encodings:
        train_cols.update(encodings[m][0])
        test_cols.update(encodings[m][1])
    train = pd.concat([base_train, pd.DataFrame(train_cols)], axis=1)
    test = pd.concat([base_test, pd.DataFrame(test_cols)], axis=1)
    return train, test


def lgbm_shared_features(inputs: Inputs):
    """Columns that hold no price: structure, cheap text features and SVD projections."""
    cfg = inputs.cfg
    units = sorted(inputs.train["unit"].astype(str).unique().tolist())
    train_parts = [tabular_features(inputs.train, units)]
    test_parts = [tabular_features(inputs.test, units)]
    x_train, x_test = inputs.tfidf
    if cfg.tfidf_svd_dims > 0:
        p_train, p_test = svd_projection(x_train, x_test, cfg.tfidf_svd_dims, cfg.seed)
        train_parts.append(pd.DataFrame(p_train).add_prefix("tfidf_svd_"))
        test_parts.append(pd.DataFrame(p_test).add_prefix("tfidf_svd_"))
    for s in inputs.sources.values():
        if cfg.embedding_svd_dims <= 0:
            continue
        p_train, p_test = svd_projection(s.train, s.test, cfg.embedding_svd_dims, cfg.seed, s.train_present)
        p_train[~s.train_present], p_test[~s.test_present] = np.nan, np.nan  # missing input, not a zero vector
        train_parts.append(pd.DataFrame(p_train).add_prefix(f"{s.name}_svd_"))
        test_parts.append(pd.DataFrame(p_test).add_prefix(f"{s.name}_svd_"))
    return pd.concat(train_parts, axis=1), pd.concat(test_parts, axis=1)


def lgbm_params(cfg: HeadsConfig) -> dict:
    params = {"objective": cfg.lgbm_objective, "learning_rate": cfg.lgbm_learning_rate,
              "num_leaves": cfg.lgbm_num_leaves, "min_child_samples": cfg.lgbm_min_child_samples,
              "feature_fraction": cfg.lgbm_feature_fraction, "bagging_fraction": cfg.lgbm_bagging_fraction,
              "bagging_freq": 1, "lambda_l2": cfg.lgbm_lambda_l2, "num_threads": cfg.lgbm_threads,
              "seed": cfg.seed, "deterministic": True, "verbose": -1}
    if cfg.lgbm_objective == "huber":
        params["alpha"] = cfg.lgbm_huber_delta
    return params


def quantity_offset(table: pd.DataFrame) -> np.ndarray:
    """log(total quantity) where the catalog gives a positive one (the parsed Value, which is already
    the pack's total: "12 Ounce (Pack of 6)" has Value 72), else 0 so the row keeps log price."""
    q = pd.to_numeric(table["quantity_value"], errors="coerce").to_numpy(dtype=np.float64)
    return np.where(np.isfinite(q) & (q > 0), np.log(np.where(q > 0, q, 1.0)), 0.0)


def fold_encodings(inputs: Inputs, unit_target=None):
    """Per fold: (train columns, test columns) of the out-of-fold target encodings of
    cfg.target_encoding_fields, of log1p price (`te_*`, with the counts) and of `unit_target` (`teq_*`)."""
    cfg = inputs.cfg
    if not cfg.target_encoding_fields:
        return []
    targets = {"te": inputs.y} if unit_target is None else {"te": inputs.y, "teq": unit_target}
    return target_encoding_columns(category_keys(inputs.train, cfg.target_encoding_fields),
                                   category_keys(inputs.test, cfg.target_encoding_fields),
                                   targets, inputs.folds, cfg.target_encoding_m)


def lgbm_head(inputs: Inputs, target=None, target_encoding: bool = True):
    """LightGBM on the target (log1p price unless given); a given target is also summarised by the
    neighbours and the encodings, beside log1p price."""
    import lightgbm as lgb

    cfg = inputs.cfg
    unit_target, target = target, inputs.y if target is None else target
    base_train, base_test = lgbm_shared_features(inputs)
    ridge_features = None
    if cfg.ridge_feature:
        ridge_features = ridge_inner_features(inputs, *inputs.ridge_predictions())
    encodings = fold_encodings(inputs, unit_target) if target_encoding else []
    oof, test, columns = np.zeros(len(target)), [], []
    for m, f in enumerate(inputs.fold_ids):
        x_train, x_test = lgbm_fold_frames(inputs, m, f, base_train, base_test, ridge_features, unit_target,
                                           encodings)
        fit, scored = ~inputs.fold_mask(f), inputs.fold_mask(f)
        data = lgb.Dataset(x_train[fit], target[fit], free_raw_data=True)
        model = lgb.train(lgbm_params(cfg), data, num_boost_round=cfg.lgbm_rounds)
        oof[scored] = model.predict(x_train[scored])
        test.append(model.predict(x_test))
        columns = list(x_train.columns)
    return oof, np.stack(test), {"features": columns, "embedding_sources": list(inputs.sources)}


def lgbm_no_te_head(inputs: Inputs, target=None):
    return lgbm_head(inputs, target, target_encoding=False)


def per_quantity(head):
    """The per-quantity twin of a head: it learns log(price / quantity) (log price where a row has no
    positive quantity), and the row's own log quantity is added back to every prediction."""

    def twin(inputs: Inputs):
        offset_train, offset_test = quantity_offset(inputs.train), quantity_offset(inputs.test)
        oof, test, extra = head(inputs, np.log(inputs.price) - offset_train)
        extra = {**extra, "target": "log(price / quantity_value), + log(quantity_value); log(price) where no quantity",
                 "rows_with_quantity": int((offset_train != 0).sum())}
        return np.log1p(np.exp(oof + offset_train)), np.log1p(np.exp(test + offset_test[None, :])), extra

    return twin


BASE_HEADS = {"ridge": ridge_head, "knn": knn_head, "lgbm": lgbm_head, "lgbm_no_te": lgbm_no_te_head}


def head_function(name: str):
    """The function training head `name`: (inputs) -> (oof [n_train], test per fold [k, n_test], meta extras),
    predictions in log1p(price)."""
    if name.endswith("_per_qty"):
        return per_quantity(BASE_HEADS[name.removesuffix("_per_qty")])
    return BASE_HEADS[name]


def write_tabular_cache(inputs: Inputs, log) -> None:
    """The price-free columns (structure, cheap text features, the TF-IDF's SVD) as an embedding cache
    of modality `tabular`, so fusion can read the catalog's sparse text signal beside the encoders'
    vectors. Signed log1p, then standardised with the train rows' statistics; a unit is one-hot."""
    from core.embedding_cache import EmbeddingCacheWriter

    cfg = inputs.cfg
    units = sorted(inputs.train["unit"].astype(str).unique().tolist())
    parts = []
    for table in (inputs.train, inputs.test):
        tab = tabular_features(table, units)
        onehot = pd.get_dummies(tab.pop("unit"), prefix="unit", dtype=np.float32)
        numeric = tab.to_numpy(dtype=np.float64)
        parts.append([np.sign(numeric) * np.log1p(np.abs(numeric)), onehot.to_numpy()])
    svd_train, svd_test = svd_projection(*inputs.tfidf, cfg.tabular_svd_dims, cfg.seed)
    mean = np.nanmean(parts[0][0], axis=0)
    std = np.nanstd(parts[0][0], axis=0) + 1e-6
    scale = np.abs(svd_train).std() + 1e-6
    for (numeric, onehot), svd, split, ids in zip(parts, (svd_train, svd_test), ("train", "test"),
                                                  (inputs.train_ids, inputs.test_ids)):
        values = np.hstack([np.nan_to_num((numeric - mean) / std), onehot, svd / scale]).astype(np.float32)
        writer = EmbeddingCacheWriter(cfg.embeddings_dir, cfg.tabular_source, split, ids, values.shape[1], "tabular",
                                      model="tfidf_svd+structure", config=to_dict(cfg), dtype="float32",
                                      chunk_size=max(len(ids), 1))
        for chunk, start, stop in writer.pending_chunks():
            writer.write_chunk(chunk, values[start:stop])
        writer.finalize()
    log.info("wrote the %s cache: %d columns (structure, text counts, %d-d TF-IDF SVD)", cfg.tabular_source,
             values.shape[1], svd_train.shape[1])


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


def main(cfg: HeadsConfig) -> dict:
    log = setup_logging("heads.train")
    check_config(cfg)
    seed_everything(cfg.seed)
    inputs = Inputs(cfg, log)
    log.info("%d train rows in %d folds, %d test rows; heads %s; device %s", len(inputs.y), len(inputs.fold_ids),
             len(inputs.test_ids), ",".join(cfg.heads), inputs.device)

    if cfg.tabular_source:
        write_tabular_cache(inputs, log)
    baseline = np.zeros(len(inputs.y))
    for f in inputs.fold_ids:
        baseline[inputs.fold_mask(f)] = np.median(inputs.y[~inputs.fold_mask(f)])
    rows = [{"head": "constant median", "oof_smape": score(inputs, baseline)[0], "fold_std": float("nan"),
             "seconds": 0.0}]
    results = {}
    for head in cfg.heads:
        start = time.time()
        oof, test, extra = head_function(head)(inputs)
        spaces = extra.pop("embedding_sources")
        seconds = time.time() - start
        oof_smape, fold_smape = score(inputs, oof)
        meta = {"oof_kind": "out_of_fold", "selection": SELECTION, "config": to_dict(cfg), "folds": inputs.fold_ids,
                "fold_smape": fold_smape, "oof_smape": oof_smape, "seconds": seconds, "target": "log1p(price)",
                "embedding_sources": spaces,
                "encoder_unseen_folds": encoder_unseen_folds(inputs, spaces), **extra}
        write_predictions(cfg.predictions_dir, head,
                          pd.DataFrame({"sample_id": inputs.train_ids, "log_pred": oof, "fold": inputs.folds}),
                          pd.DataFrame({"sample_id": inputs.test_ids, "log_pred": test.mean(axis=0)}), meta)
        log.info("%s: OOF SMAPE %.2f, folds %s (%.0f s)", head, oof_smape,
                 " ".join(f"{v:.2f}" for v in fold_smape.values()), seconds)
        results[head] = meta
        rows.append({"head": head, "oof_smape": oof_smape, "fold_std": float(np.std(list(fold_smape.values()))),
                     "seconds": seconds})
    print(format_table(pd.DataFrame(rows)))
    return results


if __name__ == "__main__":
    run_cli(lambda: main(parse_cli()))
