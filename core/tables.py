"""Reading the processed tables that `data.prepare` writes; every later stage goes through here."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from core.errors import PipelineError
from core.io import read_json

COMMON_COLUMNS = ["sample_id", "item_name", "text", "value", "unit", "quantity_value", "unit_volume",
                  "unit_weight", "image_path", "has_image"]
TRAIN_COLUMNS = COMMON_COLUMNS + ["price", "log_price", "fold"]
STRUCTURAL_FEATURES = ["quantity_value", "unit_volume", "unit_weight"]
META_FILE = "prepare.json"


class TableError(PipelineError, RuntimeError):
    pass


def load_table(data_dir: Path, split: str) -> pd.DataFrame:
    """The processed `split` ('train' or 'test') table, after checking the data stage finished."""
    data_dir = Path(data_dir)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    meta_path = data_dir / META_FILE
    if not meta_path.exists():
        raise TableError(f"{data_dir}: no {META_FILE}; run `python -m data.prepare out_dir={data_dir}` first")
    if not read_json(meta_path).get("complete"):
        raise TableError(f"{meta_path}: the data stage did not finish; run it again")
    df = pd.read_parquet(data_dir / f"{split}.parquet")
    needed = TRAIN_COLUMNS if split == "train" else COMMON_COLUMNS
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise TableError(f"{data_dir / f'{split}.parquet'}: missing columns {missing}")
    return df


def holdout_fold(data_dir: Path) -> int:
    return int(read_json(Path(data_dir) / META_FILE)["config"]["holdout_fold"])


def n_folds(data_dir: Path) -> int:
    return int(read_json(Path(data_dir) / META_FILE)["config"]["n_folds"])


def encoder_rows(table: pd.DataFrame, holdout: int, selection_fraction: float = 0.1, seed: int = 42):
    """(fit, select) boolean masks for an encoder fine-tuned once: it trains on `fit` and chooses its
    checkpoint (early stopping, best epoch) on `select`, a seeded slice of the non-holdout folds.
    The holdout fold is neither, so fusion and the ensemble score it on rows the encoder never saw
    nor chose a checkpoint with."""
    import numpy as np

    outside = table["fold"].to_numpy() != holdout
    rng = np.random.default_rng(seed)
    select = outside & (rng.random(len(table)) < selection_fraction)
    if outside.any() and not select.any():
        select[np.flatnonzero(outside)[0]] = True
    return outside & ~select, select


def encoder_selection(fraction: float, per_fold: bool = False) -> str:
    """How an encoder split by `encoder_rows` chose its checkpoint, as the predictions' meta says it;
    `per_fold`: one encoder per fold (`encoder_folds=all`)."""
    if per_fold:
        return f"one encoder per fold, each chose its best epoch on a {fraction:.0%} slice of its own training folds"
    return f"best epoch on a {fraction:.0%} slice of the training folds; the holdout fold is unseen"
