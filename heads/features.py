"""Features the heads share: the TF-IDF matrix, its low-rank projection, the cheap text and
structural features, and the embedding caches that are available."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.base import clone
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer

from core.embedding_cache import CacheError, load_embeddings, read_meta, skipped_reason
from core.tables import STRUCTURAL_FEATURES
from heads.neighbours import neighbour_price_features

# "Pack of 6", "6 Pack", "6-pack", "Set of 2", "Case of 12", "12 per case", "6 pk", "3 bottles", ...
_PACK_PATTERNS = [
    re.compile(r"\b(?:pack|set|case|box|bag|bundle|lot) of (\d{1,4})\b", re.I),
    re.compile(r"\b(\d{1,4})\s*[- ]?\s*(?:pack|pk|packs|pcs|pieces|piece)\b", re.I),
    re.compile(r"\b(\d{1,4})\s*(?:per|/)\s*(?:case|pack|box)\b", re.I),
    re.compile(r"\b(\d{1,4})\s*(?:bottles|cans|jars|boxes|bags|pouches|packets|bars|cups|tins)\b", re.I),
]
_COUNT_PATTERN = re.compile(r"\b(\d{1,5})\s*(?:count|ct|counts)\b", re.I)


def pack_count(text: str) -> float:
    """The pack size a product name states ("Pack of 6", "6 Pack", "Set of 2", "12 per case"); 1 if none."""
    found = [int(m) for pattern in _PACK_PATTERNS for m in pattern.findall(text or "")]
    found = [n for n in found if n > 0]
    return float(max(found)) if found else 1.0


def item_count(text: str) -> float:
    """The count a product name states ("12 Count", "100 ct"); NaN if none."""
    found = [int(m) for m in _COUNT_PATTERN.findall(text or "") if int(m) > 0]
    return float(max(found)) if found else np.nan


def bullet_counts(table: pd.DataFrame) -> pd.Series:
    """Bullet points per row: non-empty lines of `bullets` where the table has it, else the text's
    lines between the item name and the closing quantity line."""
    if "bullets" in table.columns:
        return table["bullets"].fillna("").astype(str).str.count(r"(?m)^\s*\S")
    return (table["text"].fillna("").astype(str).str.count("\n") - 1).clip(lower=0)


def tabular_features(table: pd.DataFrame, units: list[str]) -> pd.DataFrame:
    """Structural features and cheap text features; `unit` is a category over the train table's units
    (the same list for train and test, so a code means the same unit in both)."""
    name = table["item_name"].fillna("").astype(str)
    text = table["text"].fillna("").astype(str)
    out = pd.DataFrame(index=table.index)
    for column in STRUCTURAL_FEATURES:
        out[column] = table[column].astype(float)
    out["value"] = table["value"].astype(float)
    out["unit"] = pd.Categorical(table["unit"].astype(str), categories=units)
    out["pack_count"] = [pack_count(t) for t in name]
    out["name_count"] = [item_count(t) for t in name]
    out["value_per_pack"] = out["value"] / out["pack_count"]
    out["text_chars"] = text.str.len()
    out["name_chars"] = name.str.len()
    out["text_words"] = text.str.split().str.len()
    out["bullets"] = bullet_counts(table).to_numpy()
    out["text_digits"] = text.str.count(r"\d")
    out["name_digits"] = name.str.count(r"\d")
    out["name_upper_share"] = name.str.count(r"[A-Z]") / out["name_chars"].clip(lower=1)
    return out.reset_index(drop=True)


class TfidfText:
    """Word 1-2-gram and char_wb 2-5-gram TF-IDF (sublinear tf), side by side; vocabulary and idf
    come from the train rows' text only (no prices are involved). Fitted once, it turns any text
    into the same columns, one row at a time."""

    def __init__(self, cfg):
        self.word = TfidfVectorizer(ngram_range=(1, 2), min_df=cfg.min_df, max_features=cfg.word_max_features,
                                    sublinear_tf=True, lowercase=True, dtype=np.float32)
        self.char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=cfg.min_df,
                                    max_features=cfg.char_max_features, sublinear_tf=True, lowercase=True,
                                    dtype=np.float32)

    def fit_transform(self, train_text) -> sp.csr_matrix:
        return sp.hstack([self.word.fit_transform(train_text), self.char.fit_transform(train_text)]).tocsr()

    def transform(self, text) -> sp.csr_matrix:
        return sp.hstack([self.word.transform(text), self.char.transform(text)]).tocsr()

    def train_matrix(self, train_text) -> sp.csr_matrix:
        """The train rows' matrix exactly as the fit made it, from the text it was fitted on. transform()
        gives the same values in another order within a row, and the order of a sparse dot product's sum
        moves its last bits, so a fresh fit of the same settings makes it; its vocabulary must match."""
        fresh = TfidfText.__new__(TfidfText)
        fresh.word, fresh.char = clone(self.word), clone(self.char)
        matrix = fresh.fit_transform(train_text)
        for name in ("word", "char"):
            if getattr(fresh, name).vocabulary_ != getattr(self, name).vocabulary_:
                raise ValueError(f"the {name} TF-IDF refitted on the saved train text has another vocabulary")
        return matrix


def row_text(table: pd.DataFrame) -> pd.Series:
    """The text the TF-IDF reads, '' where a row has none."""
    return table["text"].fillna("").astype(str)


# LightGBM's ridge features: {cfg.ridge_features entry: (the ridge's tag in a run's `ridge`, its column)}
RIDGE_FEATURES = {"text": ("log1p", "ridge_log_price"), "name": ("name", "name_ridge_log_price")}


def name_text(table: pd.DataFrame) -> pd.Series:
    """The item name alone, '' where a row has none: the name ridge's TF-IDF reads it."""
    return table["item_name"].fillna("").astype(str)


def tfidf_matrices(train_text, test_text, cfg) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(train, test) TF-IDF matrices of a TfidfText fitted on the train text."""
    text = TfidfText(cfg)
    return text.fit_transform(train_text), text.transform(test_text)


def fit_svd(train, dims: int, seed: int, train_present=None) -> TruncatedSVD:
    """TruncatedSVD fitted on the (present) train rows."""
    rows = np.arange(train.shape[0]) if train_present is None else np.flatnonzero(train_present)
    dims = min(dims, train.shape[1] - 1, len(rows) - 1)
    return TruncatedSVD(n_components=dims, random_state=seed).fit(train[rows])


def project(svd: TruncatedSVD, rows) -> np.ndarray:
    return svd.transform(rows).astype(np.float32)


def svd_projection(train, test, dims: int, seed: int, train_present=None):
    """TruncatedSVD fitted on the (present) train rows, applied to both splits."""
    svd = fit_svd(train, dims, seed, train_present)
    return project(svd, train), project(svd, test)


@dataclass
class Source:
    name: str
    train: np.ndarray  # [n_train, D] float32
    test: np.ndarray | None  # None when only the train rows were loaded
    train_present: np.ndarray  # [n_train] bool
    test_present: np.ndarray | None


def available_sources(cfg, train_ids, test_ids, log: logging.Logger) -> list[Source]:
    """The caches named in cfg.embedding_sources that exist and are complete for both splits; each
    one left out is said once in the log. test_ids None: the test vectors are not loaded."""
    sources = []
    for name in cfg.embedding_sources:
        reason = skipped_reason(cfg.embeddings_dir, name)
        if reason is not None:
            log.info("embedding source %s left out: its stage skipped it (%s)", name, reason)
            continue
        try:
            read_meta(cfg.embeddings_dir, name, "train")
            test_meta = read_meta(cfg.embeddings_dir, name, "test")
        except CacheError as exc:
            log.info("embedding source %s left out: %s", name, exc)
            continue
        train = load_embeddings(cfg.embeddings_dir, name, "train", train_ids)
        test = None if test_ids is None else load_embeddings(cfg.embeddings_dir, name, "test", test_ids)
        test_dim = test_meta["dim"] if test is None else test.dim
        if train.dim != test_dim:
            raise CacheError(f"{cfg.embeddings_dir}/{name}: train dim {train.dim} != test dim {test_dim}")
        sources.append(Source(name, train.values, None if test is None else test.values, train.present,
                              None if test is None else test.present))
        log.info("embedding source %s: dim %d, %d/%d train rows present", name, train.dim,
                 int(train.present.sum()), len(train.present))
    return sources


def lgbm_base_features(table: pd.DataFrame, units: list[str], tfidf_rows, tfidf_svd, source_rows: dict,
                       source_svds: dict) -> pd.DataFrame:
    """Columns that hold no price, for any rows: structure, cheap text features and the SVD projections
    fitted on the train rows. source_rows: {name: (vectors, present)}; a row without a vector gets NaN
    there (missing input, not a zero vector)."""
    parts = [tabular_features(table, units)]
    if tfidf_svd is not None:
        parts.append(pd.DataFrame(project(tfidf_svd, tfidf_rows)).add_prefix("tfidf_svd_"))
    for name, svd in source_svds.items():
        vectors, present = source_rows[name]
        projected = project(svd, vectors)
        projected[~present] = np.nan
        parts.append(pd.DataFrame(projected).add_prefix(f"{name}_svd_"))
    return pd.concat(parts, axis=1)


def lgbm_fold_frame(base: pd.DataFrame, neighbours: dict, targets: dict, k: int, eps: float,
                    ridge: dict | None = None, encodings: dict | None = None) -> pd.DataFrame:
    """One fold model's LightGBM inputs: the shared columns, the price summaries of the rows' neighbours
    in each space (`neighbours`: {space: (indices, similarities)}, every neighbour allowed by the fold
    rule) of each target (`targets`: {tag: train values}), the ridge columns ({column: values}) and the
    target encodings."""
    columns = {}
    for space, (indices, similarities) in neighbours.items():
        for tag, values in targets.items():
            for name, values_of in neighbour_price_features(indices[:, :k], similarities[:, :k], values, eps).items():
                columns[f"{space}_{tag}_{name}"] = values_of
    if ridge:
        columns.update(ridge)
    if encodings:
        columns.update(encodings)
    return pd.concat([base, pd.DataFrame(columns)], axis=1)
