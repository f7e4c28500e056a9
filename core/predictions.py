"""One place and one format for every model's predictions; the report and the ensemble read only this.

    <predictions_dir>/<model>/oof.parquet    sample_id, log_pred, fold   (train rows, out of fold)
    <predictions_dir>/<model>/test.parquet   sample_id, log_pred         (every test row)
    <predictions_dir>/<model>/meta.json      how the out-of-fold rows were made, config, scores

`log_pred` is log1p(price). `meta["oof_kind"]` says what the train-row predictions are:
  "out_of_fold"  every train row, each predicted by a model that never trained on it (k-fold);
  "holdout"      only the rows of the holdout fold(s), predicted by a model trained on the others.
`meta["selection"]` says how each model chose its checkpoint (e.g. "fixed epochs", "best epoch on
the scored fold": the latter is optimistic and the report says so). `meta["encoder_unseen_folds"]`
lists the folds whose rows no upstream fine-tuned encoder trained on (all folds for frozen encoders).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import PipelineError
from core.io import atomic_save, read_json, write_json

OOF_KINDS = ("out_of_fold", "holdout")


class PredictionsError(PipelineError, RuntimeError):
    pass


@dataclass
class Predictions:
    model: str
    oof: pd.DataFrame  # sample_id, log_pred, fold
    test: pd.DataFrame  # sample_id, log_pred
    meta: dict


def _check_frame(df: pd.DataFrame, columns: list[str], where: str) -> pd.DataFrame:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise PredictionsError(f"{where}: missing columns {missing} (expected {columns})")
    df = df[columns].copy()
    df["sample_id"] = df["sample_id"].astype(str)
    if df["sample_id"].duplicated().any():
        dup = df.loc[df["sample_id"].duplicated(), "sample_id"].iloc[0]
        raise PredictionsError(f"{where}: sample_id {dup!r} appears more than once")
    values = df["log_pred"].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        bad = df.loc[~np.isfinite(values), "sample_id"].iloc[0]
        raise PredictionsError(f"{where}: log_pred is NaN or infinite for sample_id {bad!r}")
    df["log_pred"] = values
    if "fold" in columns:
        df["fold"] = df["fold"].astype(int)
    return df


def write_predictions(predictions_dir: Path, model: str, oof: pd.DataFrame, test: pd.DataFrame, meta: dict) -> Path:
    """Write one model's predictions atomically; `meta` must say `oof_kind`."""
    if meta.get("oof_kind") not in OOF_KINDS:
        raise PredictionsError(f"{model}: meta['oof_kind'] must be one of {OOF_KINDS}, got {meta.get('oof_kind')!r}")
    out = Path(predictions_dir) / model
    oof = _check_frame(oof, ["sample_id", "log_pred", "fold"], f"{model} oof")
    test = _check_frame(test, ["sample_id", "log_pred"], f"{model} test")
    atomic_save(lambda p: oof.to_parquet(p, index=False), out / "oof.parquet")
    atomic_save(lambda p: test.to_parquet(p, index=False), out / "test.parquet")
    write_json(out / "meta.json", {**meta, "model": model, "n_oof": len(oof), "n_test": len(test)})
    return out


def read_predictions(predictions_dir: Path, model: str) -> Predictions:
    out = Path(predictions_dir) / model
    if not (out / "meta.json").exists():
        raise PredictionsError(f"{out}: no predictions (meta.json missing); run the stage that writes {model!r}")
    meta = read_json(out / "meta.json")
    oof = _check_frame(pd.read_parquet(out / "oof.parquet"), ["sample_id", "log_pred", "fold"], str(out / "oof.parquet"))
    test = _check_frame(pd.read_parquet(out / "test.parquet"), ["sample_id", "log_pred"], str(out / "test.parquet"))
    return Predictions(model, oof, test, meta)


def list_models(predictions_dir: Path) -> list[str]:
    """Every model with complete predictions under `predictions_dir`, sorted by name."""
    root = Path(predictions_dir)
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "meta.json").exists() and (p / "test.parquet").exists())


def aligned_oof(preds: Predictions, sample_ids) -> np.ndarray:
    """The model's out-of-fold log predictions in the order of `sample_ids`; every id must be present."""
    series = preds.oof.set_index("sample_id")["log_pred"]
    ids = pd.Index([str(s) for s in sample_ids])
    missing = ids.difference(series.index)
    if len(missing):
        raise PredictionsError(f"{preds.model}: {len(missing)} train rows have no out-of-fold prediction "
                               f"(first: {missing[0]!r}); oof_kind={preds.meta.get('oof_kind')!r}")
    return series.loc[ids].to_numpy()


def aligned_test(preds: Predictions, sample_ids) -> np.ndarray:
    series = preds.test.set_index("sample_id")["log_pred"]
    ids = pd.Index([str(s) for s in sample_ids])
    missing = ids.difference(series.index)
    if len(missing):
        raise PredictionsError(f"{preds.model}: {len(missing)} test rows have no prediction (first: {missing[0]!r})")
    return series.loc[ids].to_numpy()
