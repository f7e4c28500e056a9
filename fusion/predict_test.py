"""Predict test prices with a trained fusion run, write a checked submission and the run's shared predictions.

    python -m fusion.predict_test model=all_embeddings                  # -> checkpoints/fusion/all_embeddings/test_out.csv
    python -m fusion.predict_test model=all_embeddings output=test_out.csv
    python -m fusion.predict_test model=qwen_clip profile=tiny

Uses the folds the run lists in its own metrics.json (one for a holdout run; k for `folds=all`,
averaged in log space), each checked against the run's config.json; nothing else in the folder is
read. Predictions are floored at the smallest training price, never clamped to 0. The file is
written only if it passes the submission check against the test CSV. Also writes
predictions_dir/run_name/ (core.predictions): the scored folds' rows (every train row for
`folds=all`, the holdout rows otherwise) and the test rows, as log1p(price).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.config import from_dict
from core.errors import PipelineError, run_cli
from core.io import read_json
from core.metrics import prices_from_log
from core.predictions import write_predictions
from core.runtime import amp_dtype, pick_device, setup_logging
from core.submission import write_submission
from core.tables import META_FILE, load_table, n_folds
from fusion.config import FusionConfig
from fusion.inference import (EXPERT_LOAD_NOTE, load_inputs, model_from_checkpoint, pooled_load, predict_log,
                              run_config, run_folds)
from fusion.train import parse_cli, selection_sentence


def out_of_fold(run_folds_, run_cfg: FusionConfig, data_dir: Path) -> tuple[pd.DataFrame, str]:
    """(sample_id, log_pred, fold) of every scored row, and its oof_kind. A k-fold run must cover every train row."""
    parts = []
    for f in run_folds_:
        preds = pd.read_csv(f.dir / "val_predictions.csv", dtype={"sample_id": str})
        log_pred = preds["log_pred"] if "log_pred" in preds else np.log1p(preds["pred"])
        parts.append(pd.DataFrame({"sample_id": preds["sample_id"], "log_pred": log_pred, "fold": f.fold}))
    oof = pd.concat(parts, ignore_index=True)
    if run_cfg.folds != "all":
        return oof, "holdout"
    train_ids = set(load_table(data_dir, "train")["sample_id"].astype(str))
    missing = train_ids.difference(oof["sample_id"])
    if missing or len(oof) != len(train_ids):
        raise PipelineError(f"{run_cfg.run_name}: the k-fold predictions do not cover the train table once per row "
                            f"({len(missing)} train rows missing, {len(oof)} rows for {len(train_ids)} ids)")
    return oof, "out_of_fold"


def fold_mean_log(cfg, folds, sample_ids: list[str], device) -> np.ndarray:
    """log1p predictions for `sample_ids` (their vectors in the caches under cfg.embeddings_dir, split
    test), averaged over the run's fold models. Rows are independent: any subset of rows gets the
    values it gets in the whole table. The run's own test rows and new rows are priced here."""
    idx = torch.arange(len(sample_ids), device=device)
    inputs_by_sources, logs = {}, []
    for f in folds:
        names = tuple(s["name"] for s in f.checkpoint["sources"])
        if names not in inputs_by_sources:
            inputs_by_sources[names] = load_inputs(cfg, "test", sample_ids, device, list(names))
        inputs = inputs_by_sources[names]
        if [s["dim"] for s in f.checkpoint["sources"]] != [s.dim for s in inputs.specs]:
            raise PipelineError(f"{f.dir / 'best.pt'} was trained on sources {f.checkpoint['sources']}, "
                                f"but the test caches are {inputs.specs}")
        model = model_from_checkpoint(f.checkpoint, device)
        logs.append(predict_log(model, inputs, idx, 4096, device, amp_dtype(device, cfg.precision)))
    return np.mean(logs, 0)


def main(cfg, output: Path | None = None) -> Path:
    run_dir = Path(cfg.out_dir) / cfg.run_name
    log = setup_logging("fusion.predict_test", run_dir)
    run_cfg = from_dict(FusionConfig, run_config(run_dir))
    device = pick_device(cfg.device)
    folds = run_folds(run_dir, device)
    table = load_table(cfg.data_dir, "test")
    test_log = fold_mean_log(cfg, folds, table["sample_id"].tolist(), device)
    prices = prices_from_log(test_log, min(f.checkpoint["price_floor"] for f in folds))
    raw_test = Path(read_json(Path(cfg.data_dir) / META_FILE)["config"]["raw_dir"]) / "test.csv"
    output = Path(output) if output else run_dir / "test_out.csv"
    write_submission(output, table["sample_id"], prices, test_csv=raw_test if raw_test.exists() else None,
                     test_ids=None if raw_test.exists() else table["sample_id"].tolist())
    log.info("wrote %s: %d rows from %d model(s) (folds %s), prices %.2f to %.2f (median %.2f)", output, len(prices),
             len(folds), [f.fold for f in folds], prices.min(), prices.max(), np.median(prices))

    oof, oof_kind = out_of_fold(folds, run_cfg, cfg.data_dir)
    unseen = run_cfg.encoder_unseen_folds
    meta = {"oof_kind": oof_kind, "config": run_config(run_dir), "folds": [f.fold for f in folds],
            "val_smape_per_fold": {str(f.fold): f.metrics["val_smape"] for f in folds},
            "selection": selection_sentence(run_cfg),
            "sources": [s["name"] for s in folds[0].checkpoint["sources"]],
            "encoder_unseen_folds": list(range(n_folds(cfg.data_dir))) if unseen is None else list(unseen)}
    loads = [(f.metrics["expert_load"], int((oof["fold"] == f.fold).sum())) for f in folds
             if f.metrics.get("expert_load") is not None]
    if loads:
        # each fold's model on its own scored rows, pooled over every scored row
        meta["expert_load"] = pooled_load(loads)
        meta["expert_load_note"] = EXPERT_LOAD_NOTE
        meta["expert_load_per_fold"] = {str(f.fold): f.metrics["expert_load"] for f in folds if f.metrics.get("expert_load")}
    test = pd.DataFrame({"sample_id": table["sample_id"].astype(str), "log_pred": test_log})
    where = write_predictions(cfg.predictions_dir, cfg.run_name, oof, test, meta)
    log.info("wrote %s (%s: %d train rows, %d test rows)", where, oof_kind, len(oof), len(test))
    return output


if __name__ == "__main__":
    args = sys.argv[1:]
    out = next((a.split("=", 1)[1] for a in args if a.startswith("output=")), None)
    run_cli(lambda: main(parse_cli([a for a in args if not a.startswith("output=")]), out))
