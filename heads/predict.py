"""Price rows with a fitted heads run: the test table, or any new rows in the processed format.

    python -m heads.predict [profile=default|small|tiny] key=value ...

`python -m heads.train` fits every head once per fold and saves the run under `out_dir` (see
`save_run`). This script loads that run, prices the processed test table of `data_dir` with the test
caches of `embeddings_dir`, and writes each head's `predictions_dir/<head>/test.parquet` (the
out-of-fold half that the fit wrote stays) and the test half of the tabular cache and of each fold
model's target-encoding cache. It never reads
the train table: everything a prediction needs was saved with the run.

Every quantity behind a row's price is a function of the fitted run and that row alone (its TF-IDF,
its SVD projections, its neighbours among the train rows, its target encodings, the fold models), so
`predict_rows` gives a row the same price whether it is priced alone, in a chunk or in the whole
table; `heads.train` prices its test rows through the same function.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from core.config import from_dict, parse_args, to_dict
from core.embedding_cache import EmbeddingCacheWriter, load_embeddings
from core.errors import PipelineError, run_cli
from core.fingerprints import describe_changes, installed_versions, version_differences
from core.io import read_json, write_json
from core.predictions import PredictionsError, read_predictions, write_predictions
from core.runtime import pick_device, setup_logging
from core.tables import load_table
from heads.config import PROFILES, HeadsConfig
from heads.features import (RIDGE_FEATURES, TfidfText, lgbm_base_features, lgbm_fold_frame, name_text, project,
                            row_text, tabular_features)
from heads.neighbours import neighbour_price_features, row_neighbours
from heads.target_encoding import category_keys, encoding_columns

RUN_FILE = "run.json"
ROWS_PER_CHUNK = 8192  # rows priced at once by the script (the neighbour search has its own chunk_size)
# the train target each head learns: log1p(price), or log(price / quantity) for the per-quantity twins
TARGETS = ("log1p", "per_qty")
COLUMN_HEADS = ("lgbm", "lgbm_no_te", "mlp", "mlp_dist")  # heads on lgbm's columns (structure, SVDs, neighbour prices, ridge)
ENCODED_HEADS = ("lgbm", "mlp", "mlp_dist")  # those of them that also read the target encodings
NETWORK_HEADS = ("mlp", "mlp_dist")  # those of them that are networks (heads.mlp), the rest LightGBM


class RunError(PipelineError, RuntimeError):
    pass


def truncated_svd(svd, dims: int):
    """A fitted TruncatedSVD keeping its first `dims` components (itself if it has no more): the same
    projection's leading columns, so one fit serves every width."""
    import copy

    if svd.components_.shape[0] <= dims:
        return svd
    cut = copy.copy(svd)
    cut.components_ = svd.components_[:dims]
    cut.n_components = dims
    for name in ("explained_variance_", "explained_variance_ratio_", "singular_values_"):
        setattr(cut, name, getattr(svd, name)[:dims])
    return cut


def head_parts(head: str) -> tuple[str, str]:
    """(base head, target tag): 'lgbm_per_qty' -> ('lgbm', 'per_qty'), 'knn' -> ('knn', 'log1p')."""
    if head.endswith("_per_qty"):
        return head.removesuffix("_per_qty"), "per_qty"
    return head, "log1p"


def reads_lgbm_columns(head: str) -> bool:
    return head_parts(head)[0] in COLUMN_HEADS


def quantity_offset(table: pd.DataFrame) -> np.ndarray:
    """log(total quantity) where the catalog gives a positive one (the parsed Value, which is already
    the pack's total: "12 Ounce (Pack of 6)" has Value 72), else 0 so the row keeps log price."""
    q = pd.to_numeric(table["quantity_value"], errors="coerce").to_numpy(dtype=np.float64)
    return np.where(np.isfinite(q) & (q > 0), np.log(np.where(q > 0, q, 1.0)), 0.0)


@dataclass
class SourceFit:
    """What a row's cache vector meets: the SVD fitted on the train vectors (None: no projection) and
    the train vectors themselves (the neighbour candidates)."""
    svd: object
    train: np.ndarray  # [n_train, D] float32
    train_present: np.ndarray  # [n_train] bool


@dataclass
class TabularFit:
    """The tabular cache's transform: standardisation of the signed-log1p columns and the TF-IDF SVD,
    both from the train rows."""
    svd: object
    mean: np.ndarray
    std: np.ndarray
    scale: float


@dataclass
class HeadsRun:
    """A fitted heads run: every fold model and everything on the train side that pricing a row needs."""
    cfg: HeadsConfig  # the fit's settings
    fold_ids: list[int]
    train_ids: np.ndarray
    train_text: np.ndarray  # what a loaded run refits the train rows' sparse TF-IDF from, if it needs it
    folds: np.ndarray  # [n_train]
    targets: dict  # {"log1p" | "per_qty": [n_train]} what the neighbours' prices summarise
    text: TfidfText
    tfidf_svd: object  # None without a TF-IDF projection
    units: list[str]
    sources: dict  # {name: SourceFit}, in the fit's order
    search_k: dict  # {space: neighbours searched}; the same k as in the fit, so ties fall the same way
    # the TF-IDF neighbour space: its SVD and the train rows in it; None: the full sparse TF-IDF
    neighbour_svd: object = None
    tfidf_vectors: np.ndarray | None = None  # [n_train, tfidf_neighbour_dims] float32
    # the train rows' sparse TF-IDF, which only the sparse neighbour space reads: a loaded run leaves it
    # None and train_matrix() refits it on first use (minutes at 75,000 rows)
    train_tfidf: sp.csr_matrix | None = None
    ridge: dict = field(default_factory=dict)  # {target tag | "name": [fold model]}
    name_text: TfidfText | None = None  # the item names' TF-IDF the name ridge reads; None without it
    knn_fallback: dict = field(default_factory=dict)  # {target tag: [fold value]} for rows without neighbours
    lgbm: dict = field(default_factory=dict)  # {head: [fold booster]}
    mlp: dict = field(default_factory=dict)  # {head: [heads.mlp.MLPFold]}
    features: dict = field(default_factory=dict)  # {head: [fold columns]}
    encodings: dict = field(default_factory=dict)  # {"te" | "teq": {field: KeyStatistics}}
    tabular: TabularFit | None = None
    device: str = "cpu"  # placement of the neighbour search, not a setting of the fit
    chunk_size: int = 1024

    def train_matrix(self) -> sp.csr_matrix:
        if self.train_tfidf is None:
            self.train_tfidf = self.text.train_matrix(self.train_text)
        return self.train_tfidf

    @property
    def heads(self) -> list[str]:
        return list(self.cfg.heads)


# ---------------------------------------------------------------- save and load

def save_run(run: HeadsRun, out_dir: Path) -> Path:
    """Write the run to `out_dir`, replacing an earlier one only once the new one is complete: it is
    written to a sibling folder first, and a crash leaves the earlier run (or none), never half of one.

        run.json             config, heads, folds, feature columns per head and fold, package versions
        train_rows.parquet   sample_id, text, fold and the targets of the train rows
        text.joblib          TF-IDF vectorizers, SVD projections, units, the tabular transform
        tfidf_vectors.npy    the train rows in the TF-IDF neighbour space (absent: the sparse TF-IDF)
        sources/<name>.npz   each cache's train vectors (the neighbour candidates)
        ridge.joblib         ridge fold models per target; target_encoding.joblib: key statistics per fold
        lgbm/<head>/fold_<f>.txt  LightGBM fold models (booster.save_model, text)
        mlp/<head>/fold_<f>.joblib  network fold models (input transform, centre, weights per seed)
    """
    import joblib

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        pd.DataFrame({"sample_id": run.train_ids, "text": run.train_text, "fold": run.folds,
                      **{f"target_{tag}": values for tag, values in run.targets.items()}}).to_parquet(
            tmp / "train_rows.parquet", index=False)
        joblib.dump({"text": run.text, "name_text": run.name_text, "tfidf_svd": run.tfidf_svd, "units": run.units,
                     "source_svds": {name: s.svd for name, s in run.sources.items()}, "tabular": run.tabular,
                     "neighbour_svd": run.neighbour_svd}, tmp / "text.joblib")
        if run.tfidf_vectors is not None:
            np.save(tmp / "tfidf_vectors.npy", run.tfidf_vectors)
        (tmp / "sources").mkdir()
        for name, s in run.sources.items():
            np.savez(tmp / "sources" / f"{name}.npz", train=s.train, present=s.train_present)
        joblib.dump(run.ridge, tmp / "ridge.joblib")
        joblib.dump(run.encodings, tmp / "target_encoding.joblib")
        for head, boosters in run.lgbm.items():
            (tmp / "lgbm" / head).mkdir(parents=True)
            for f, booster in zip(run.fold_ids, boosters):
                booster.save_model(str(tmp / "lgbm" / head / f"fold_{f}.txt"))
        for head, models in run.mlp.items():
            (tmp / "mlp" / head).mkdir(parents=True)
            for f, model in zip(run.fold_ids, models):
                joblib.dump(model, tmp / "mlp" / head / f"fold_{f}.joblib")
        write_json(tmp / RUN_FILE, {
            "complete": True, "config": to_dict(run.cfg), "heads": run.heads, "folds": run.fold_ids,
            "n_train": len(run.train_ids), "sources": list(run.sources), "search_k": run.search_k,
            "knn_fallback": run.knn_fallback, "features": run.features, "lgbm_heads": list(run.lgbm),
            "mlp_heads": list(run.mlp), "tfidf_vectors": run.tfidf_vectors is not None,
            "versions": installed_versions()})
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            if old.exists() and not out_dir.exists():
                os.replace(old, out_dir)  # the earlier run back in place
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _fit_command(out_dir: Path) -> str:
    return f"python -m heads.train out_dir={out_dir} (with the run's data_dir and embeddings_dir)"


def load_run(out_dir: Path, device: str = "cpu", chunk_size: int | None = None, log=None) -> HeadsRun:
    """The run `save_run` wrote to `out_dir`; a clear error when it is missing or incomplete."""
    import joblib
    import lightgbm as lgb

    out_dir = Path(out_dir)
    if not (out_dir / RUN_FILE).exists():
        what = "does not exist" if not out_dir.exists() else f"has no {RUN_FILE}"
        raise RunError(f"{out_dir}: no fitted heads run ({what}); make it with `{_fit_command(out_dir)}`")
    meta = read_json(out_dir / RUN_FILE)
    if not meta.get("complete"):
        raise RunError(f"{out_dir}/{RUN_FILE}: the run is incomplete; fit it again with `{_fit_command(out_dir)}`")
    needed = ["train_rows.parquet", "text.joblib", "ridge.joblib", "target_encoding.joblib",
              *(["tfidf_vectors.npy"] if meta.get("tfidf_vectors") else []),
              *[f"sources/{name}.npz" for name in meta["sources"]],
              *[f"lgbm/{head}/fold_{f}.txt" for head in meta["lgbm_heads"] for f in meta["folds"]],
              *[f"mlp/{head}/fold_{f}.joblib" for head in meta.get("mlp_heads", []) for f in meta["folds"]]]
    missing = [name for name in needed if not (out_dir / name).exists()]
    if missing:
        raise RunError(f"{out_dir}: the run is incomplete ({len(missing)} file(s) missing, first {missing[0]}); "
                       f"fit it again with `{_fit_command(out_dir)}`")
    if log is not None and (changes := version_differences(meta.get("versions") or {})):
        log.warning("%s was fitted with other package versions: %s", out_dir, describe_changes(changes))
    cfg = from_dict(HeadsConfig, meta["config"])
    rows = pd.read_parquet(out_dir / "train_rows.parquet")
    saved = joblib.load(out_dir / "text.joblib")
    train_text = rows["text"].astype(str).to_numpy()
    sources = {}
    for name in meta["sources"]:
        with np.load(out_dir / "sources" / f"{name}.npz") as z:
            sources[name] = SourceFit(saved["source_svds"][name], z["train"], z["present"])
    lgbm = {head: [lgb.Booster(model_file=str(out_dir / "lgbm" / head / f"fold_{f}.txt")) for f in meta["folds"]]
            for head in meta["lgbm_heads"]}
    mlp = {head: [joblib.load(out_dir / "mlp" / head / f"fold_{f}.joblib") for f in meta["folds"]]
           for head in meta.get("mlp_heads", [])}
    return HeadsRun(
        cfg=cfg, fold_ids=[int(f) for f in meta["folds"]], train_ids=rows["sample_id"].astype(str).to_numpy(),
        train_text=train_text, folds=rows["fold"].to_numpy(dtype=np.int64),
        targets={tag: rows[f"target_{tag}"].to_numpy(dtype=np.float64) for tag in TARGETS},
        text=saved["text"], tfidf_svd=saved["tfidf_svd"],
        units=list(saved["units"]), sources=sources, search_k={k: int(v) for k, v in meta["search_k"].items()},
        ridge=joblib.load(out_dir / "ridge.joblib"), name_text=saved.get("name_text"),
        knn_fallback=meta["knn_fallback"], lgbm=lgbm, mlp=mlp,
        features=meta["features"], encodings=joblib.load(out_dir / "target_encoding.joblib"),
        tabular=saved["tabular"], neighbour_svd=saved.get("neighbour_svd"),
        tfidf_vectors=np.load(out_dir / "tfidf_vectors.npy") if saved.get("neighbour_svd") is not None else None,
        device=device, chunk_size=chunk_size or cfg.chunk_size)


# ---------------------------------------------------------------- pricing rows

def load_row_vectors(run: HeadsRun, embeddings_dir: Path, split: str, sample_ids) -> dict:
    """{source: (vectors, present)} of the run's sources for `sample_ids`, from the caches of `split`."""
    out = {}
    for name, s in run.sources.items():
        cached = load_embeddings(embeddings_dir, name, split, sample_ids, expected_dim=s.train.shape[1])
        out[name] = (cached.values, cached.present)
    return out


def tabular_values(fit: TabularFit, table: pd.DataFrame, units: list[str], tfidf_rows) -> np.ndarray:
    """The tabular cache's rows: the price-free columns, signed log1p then standardised with the train
    rows' statistics, a unit one-hot, and the TF-IDF's SVD scaled by the train rows' spread."""
    tab = tabular_features(table, units)
    onehot = pd.get_dummies(tab.pop("unit"), prefix="unit", dtype=np.float32)
    numeric = tab.to_numpy(dtype=np.float64)
    numeric = np.sign(numeric) * np.log1p(np.abs(numeric))
    return np.hstack([np.nan_to_num((numeric - fit.mean) / fit.std), onehot.to_numpy(),
                      project(fit.svd, tfidf_rows) / fit.scale]).astype(np.float32)


class RowFeatures:
    """One set of rows to price with a run; each feature is computed once and shared by the heads."""

    def __init__(self, run: HeadsRun, table: pd.DataFrame, vectors: dict | None = None):
        self.run, self.cfg = run, run.cfg
        self.table = table.reset_index(drop=True)
        self.vectors = {}
        for name, s in run.sources.items():
            if vectors is None or name not in vectors:
                raise RunError(f"the run reads the {name!r} cache: pass its vectors for these rows "
                               f"(load_row_vectors reads them from a cache)")
            values, present = vectors[name] if isinstance(vectors[name], tuple) else (vectors[name].values,
                                                                                     vectors[name].present)
            values, present = np.asarray(values, dtype=np.float32), np.asarray(present, dtype=bool)
            if values.shape != (len(self.table), s.train.shape[1]) or present.shape != (len(self.table),):
                raise RunError(f"{name}: vectors of shape {values.shape} for {len(self.table)} rows; the run's "
                               f"train vectors have dim {s.train.shape[1]}")
            self.vectors[name] = (values, present)
        self._cache = {}

    def _once(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def tfidf(self):
        return self._once("tfidf", lambda: self.run.text.transform(row_text(self.table)))

    @property
    def offset(self) -> np.ndarray:
        return self._once("offset", lambda: quantity_offset(self.table))

    def neighbours(self, space: str):
        """(indices, similarities) [n_folds, n_rows, k] among the train rows the fold models may use."""
        def search():
            run, k = self.run, self.run.search_k[space]
            if space == "tfidf" and run.neighbour_svd is not None:
                return row_neighbours(project(run.neighbour_svd, self.tfidf), run.tfidf_vectors, run.folds, k,
                                      device=run.device, chunk_size=run.chunk_size)
            if space == "tfidf":
                return row_neighbours(self.tfidf, run.train_matrix(), run.folds, k, device=run.device,
                                      chunk_size=run.chunk_size)
            s = run.sources[space]
            vectors, present = self.vectors[space]
            return row_neighbours(vectors, s.train, run.folds, k, s.train_present, present, device=run.device,
                                  chunk_size=run.chunk_size)

        return self._once(("neighbours", space), search)

    def ridge(self, tag: str) -> list[np.ndarray]:
        """Per fold model, the ridge's predictions on target `tag` ("name": log1p price from the item name)."""
        def predict():
            rows = self.run.name_text.transform(name_text(self.table)) if tag == "name" else self.tfidf
            return [m.predict(rows) for m in self.run.ridge[tag]]

        return self._once(("ridge", tag), predict)

    def ridge_columns(self, m: int) -> dict:
        """Fold model m's ridge features for LightGBM, those the run holds models for."""
        features = [RIDGE_FEATURES[name] for name in self.cfg.ridge_features]
        return {column: self.ridge(tag)[m] for tag, column in features if tag in self.run.ridge}

    def knn(self, tag: str) -> list[np.ndarray]:
        cfg, k = self.cfg, self.cfg.knn_k
        indices, similarities = self.neighbours(cfg.knn_space)
        out = []
        for m, fallback in enumerate(self.run.knn_fallback[tag]):
            pred = neighbour_price_features(indices[m, :, :k], similarities[m, :, :k], self.run.targets[tag],
                                            cfg.distance_eps)["weighted_log_price"]
            out.append(np.where(np.isnan(pred), fallback, pred))
        return out

    @property
    def lgbm_base(self) -> pd.DataFrame:
        run = self.run
        return self._once("base", lambda: lgbm_base_features(
            self.table, run.units, self.tfidf, run.tfidf_svd, self.vectors,
            {name: s.svd for name, s in run.sources.items() if s.svd is not None}))

    def encodings(self, tags: tuple) -> list[dict]:
        keys = self._once("keys", lambda: category_keys(self.table, self.cfg.target_encoding_fields))
        return encoding_columns({tag: self.run.encodings[tag] for tag in tags}, keys, self.cfg.target_encoding_m)

    def column_models(self, head: str, tag: str) -> list[np.ndarray]:
        """Per fold model, the predictions of a head on lgbm's columns (LightGBM or the network)."""
        cfg, run = self.cfg, self.run
        targets = {"nb": run.targets["log1p"]} if tag == "log1p" else {"nb": run.targets["log1p"],
                                                                          "nbq": run.targets["per_qty"]}
        with_te = head_parts(head)[0] in ENCODED_HEADS and bool(cfg.target_encoding_fields)
        encodings = self.encodings(("te",) if tag == "log1p" else ("te", "teq")) if with_te else None
        spaces = ["tfidf", *run.sources]
        out = []
        for m, model in enumerate(run.mlp[head] if head in run.mlp else run.lgbm[head]):
            frame = lgbm_fold_frame(self.lgbm_base, {s: tuple(a[m] for a in self.neighbours(s)) for s in spaces},
                                    targets, cfg.neighbour_k, cfg.distance_eps,
                                    self.ridge_columns(m), None if encodings is None else encodings[m])
            columns = run.features[head][m]
            missing = [c for c in columns if c not in frame.columns]
            if missing:
                raise RunError(f"{head} fold {run.fold_ids[m]}: the model was fitted on columns {missing} that the "
                               f"rows do not give")
            out.append(model.predict(frame[columns]))
        return out

    def head(self, head: str) -> np.ndarray:
        """Per fold model, the head's log1p(price) predictions [n_folds, n_rows]."""
        base, tag = head_parts(head)
        if base == "ridge":
            per_fold = self.ridge(tag)
        elif base == "knn":
            per_fold = self.knn(tag)
        else:
            per_fold = self.column_models(head, tag)
        per_fold = np.stack(per_fold)
        if tag == "per_qty":  # the row's own log quantity added back
            return np.log1p(np.exp(per_fold + self.offset[None, :]))
        return per_fold

    def predictions(self) -> dict[str, np.ndarray]:
        """{head: fold-averaged log1p(price)} for every head of the run."""
        return {head: self.head(head).mean(axis=0) for head in self.run.heads}

    def tabular(self) -> np.ndarray:
        return tabular_values(self.run.tabular, self.table, self.run.units, self.tfidf)


def predict_rows(run: HeadsRun, table: pd.DataFrame, vectors: dict | None = None) -> dict[str, np.ndarray]:
    """Price rows in the processed format (`core.tables.load_table`'s columns) with a fitted run:
    {head: log1p(price) per row, the mean of the fold models}. vectors: {source: (vectors [n, D],
    present [n])} or {source: CachedEmbeddings} for every cache the run reads, aligned with `table`."""
    return RowFeatures(run, table, vectors).predictions()


def write_tabular_cache(embeddings_dir: Path, source: str, split: str, ids, values: np.ndarray, config: dict,
                        model: str = "tfidf_svd+structure") -> None:
    writer = EmbeddingCacheWriter(embeddings_dir, source, split, ids, values.shape[1], "tabular",
                                  model=model, config=config, dtype="float32",
                                  chunk_size=max(len(ids), 1))
    for chunk, start, stop in writer.pending_chunks():
        writer.write_chunk(chunk, values[start:stop])
    writer.finalize()


def encoding_values(columns: dict, fields, center: float) -> np.ndarray:
    """A fold model's target-encoding columns as cache rows [n, 2 * fields]: each field's smoothed mean
    log price less `center` (0 for a row without a key) and log1p of its count, divided by 5."""
    parts = []
    for name in fields:
        parts.append(np.nan_to_num(np.asarray(columns[f"te_{name}"], np.float64) - center, nan=0.0))
        parts.append(np.log1p(np.asarray(columns[f"te_{name}_count"], np.float64)) / 5.0)
    return np.stack(parts, axis=1).astype(np.float32)


def fold_encoding_rows(run: HeadsRun, table: pd.DataFrame, folds=None) -> list[np.ndarray]:
    """Per fold model (the run's fold order), the target-encoding cache rows of `table`: new rows from
    every fold but the scored one; with `folds` (train rows) each row also leaves its own fold out.
    [] when the run has no encodings (no lgbm head, or no fields)."""
    if "te" not in run.encodings:
        return []
    fields = list(run.encodings["te"])
    keys = category_keys(table.reset_index(drop=True), fields)
    columns = encoding_columns({"te": run.encodings["te"]}, keys, run.cfg.target_encoding_m, folds)
    # each fold model's centre from the rows it may read: the scored fold's prices stay out
    centers = [float(run.targets["log1p"][run.folds != f].mean()) for f in run.fold_ids]
    return [encoding_values(c, fields, center) for c, center in zip(columns, centers)]


def write_fold_encoding_caches(run: HeadsRun, embeddings_dir: Path, split: str, ids, per_fold: list) -> list[str]:
    """One cache per fold model (core.embedding_cache.fold_source); returns the sources written."""
    from core.embedding_cache import fold_source

    written = []
    for fold, values in zip(run.fold_ids, per_fold):
        source = fold_source(run.cfg.target_encoding_source, fold)
        write_tabular_cache(embeddings_dir, source, split, ids, values, to_dict(run.cfg),
                            model="out-of-fold target encoding")
        written.append(source)
    return written


def write_test_caches(run: HeadsRun, embeddings_dir: Path, table: pd.DataFrame, tabular: np.ndarray | None) -> None:
    """The caches fusion reads for new rows: the tabular source (`price_table`'s rows) and each fold
    model's target encodings. The fit, `heads.predict` and scoring all write them here."""
    ids = table["sample_id"].astype(str).to_numpy()
    if tabular is not None and run.cfg.tabular_source:
        write_tabular_cache(embeddings_dir, run.cfg.tabular_source, "test", ids, tabular, to_dict(run.cfg))
    if run.cfg.target_encoding_source:
        write_fold_encoding_caches(run, embeddings_dir, "test", ids, fold_encoding_rows(run, table))


def price_table(run: HeadsRun, table: pd.DataFrame, vectors: dict, rows_per_chunk: int = ROWS_PER_CHUNK):
    """({head: log1p(price) [n]}, tabular cache rows [n, D] or None), priced `rows_per_chunk` rows at a time."""
    predictions, tabular = {head: [] for head in run.heads}, []
    for start in range(0, len(table), rows_per_chunk):
        stop = min(start + rows_per_chunk, len(table))
        rows = RowFeatures(run, table.iloc[start:stop],
                           {name: (v[start:stop], p[start:stop]) for name, (v, p) in vectors.items()})
        for head, values in rows.predictions().items():
            predictions[head].append(values)
        if run.tabular is not None:
            tabular.append(rows.tabular())
    predictions = {head: np.concatenate(parts) if parts else np.zeros(0) for head, parts in predictions.items()}
    return predictions, (np.concatenate(tabular) if tabular else None)


# ---------------------------------------------------------------- main

def parse_cli(argv=None) -> HeadsConfig:
    return parse_args(HeadsConfig, argv, PROFILES)


def main(cfg: HeadsConfig, rows_per_chunk: int = ROWS_PER_CHUNK) -> dict[str, np.ndarray]:
    """Price the test table of cfg.data_dir with the run in cfg.out_dir and write the test side: each
    head's test.parquet and the tabular cache's test split. The fit's settings come from the run; this
    config gives the folders and the placement (device, chunk_size)."""
    log = setup_logging("heads.predict")
    run = load_run(cfg.out_dir, str(pick_device(cfg.device)), cfg.chunk_size, log)
    missing = [h for h in run.heads if not (Path(cfg.predictions_dir) / h / "meta.json").exists()]
    if missing:
        raise PredictionsError(f"{cfg.predictions_dir}/{missing[0]}: no out-of-fold predictions beside the run in "
                               f"{cfg.out_dir}; run `python -m heads.train` with the same predictions_dir first")
    table = load_table(cfg.data_dir, "test").reset_index(drop=True)
    ids = table["sample_id"].astype(str).to_numpy()
    predictions, tabular = price_table(run, table, load_row_vectors(run, cfg.embeddings_dir, "test", ids),
                                       rows_per_chunk)
    for head, values in predictions.items():
        old = read_predictions(cfg.predictions_dir, head)
        meta = {k: v for k, v in old.meta.items() if k not in ("model", "n_oof", "n_test")}
        write_predictions(cfg.predictions_dir, head, old.oof, pd.DataFrame({"sample_id": ids, "log_pred": values}),
                          {**meta, "run_dir": str(cfg.out_dir)})
    write_test_caches(run, cfg.embeddings_dir, table, tabular)
    log.info("priced %d test rows with the run in %s: %s", len(ids), cfg.out_dir, ", ".join(run.heads))
    return predictions


if __name__ == "__main__":
    run_cli(lambda: main(parse_cli()))
