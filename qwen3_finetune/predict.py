"""Test predictions from the best text-model checkpoint, written as a checked submission (the text
model alone is a baseline submission) and, with its holdout-fold predictions, to the shared
predictions folder (`predictions_dir/text_head/`) that the report and the ensemble read. With one
encoder per fold (`encoder_folds=all`) every train row is predicted by the encoder that never saw
its fold (out of fold) and test predictions are the mean of the k encoders in log space.

The heads are applied to the vectors qwen_extract cached (the pooled text vector; the structural
features are standardised again from the processed table), so the model does not run over the rows
a second time. Where no cache matches the run's checkpoints (qwen_extract not run, or run with other
checkpoints or settings), or for test rows with one encoder per fold (their cache holds the mean of
the k encoders' vectors, not each encoder's own), the model runs over those rows instead.

    python -m qwen3_finetune.predict                 # -> out_dir/run_name/test_out.csv
    python -m qwen3_finetune.predict profile=tiny
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.config import parse_args, to_dict
from core.embedding_cache import CacheError, load_embeddings, read_meta
from core.errors import run_cli
from core.io import read_json
from core.metrics import prices_from_log, smape
from core.predictions import write_predictions
from core.runtime import amp_dtype, autocast, pick_device, setup_logging
from core.submission import write_submission
from core.tables import META_FILE, STRUCTURAL_FEATURES, encoder_selection, load_table
from qwen3_finetune.config import PROFILES, QwenConfig
from qwen3_finetune.model import (best_checkpoint, encoder_folds, load_head, load_run, run_rows, table_inputs,
                                  vector_identity)

MODEL_NAME = "text_head"


def head_log(cfg: QwenConfig, encoder, table, device, dtype) -> np.ndarray:
    """One encoder's text-head log1p predictions for the rows of `table`."""
    model, scaler, tokenizer, _ = encoder
    token_ids, features = table_inputs(table, tokenizer, scaler, cfg.max_length)
    return run_rows(model, token_ids, features, cfg.eval_batch_size, tokenizer.pad_token_id, device, dtype)


def fold_mean_log(cfg: QwenConfig, table, device, dtype) -> np.ndarray:
    """The text head's log1p predictions for the rows of `table`, averaged over the run's encoders (one, or
    one per fold). A row's value does not depend on the other rows (up to float rounding of the
    length-bucketed batches): the run's own test rows and new rows are priced here."""
    return np.mean([head_log(cfg, load_run(cfg, device, fold), table, device, dtype) for fold in encoder_folds(cfg)],
                   axis=0)


def cached_vectors(cfg: QwenConfig, split: str, ids, identity: dict):
    """The cached qwen_text vectors of `ids` (in that order) when the cache was made by this run's
    checkpoints and settings (`identity`); None otherwise."""
    try:
        meta = read_meta(cfg.embeddings_dir, cfg.source_name, split)
        if not meta.get("complete") or meta.get("config", {}).get("vectors") != identity:
            return None
        return load_embeddings(cfg.embeddings_dir, cfg.source_name, split, ids).values
    except CacheError:  # no cache, or without some of these rows
        return None


@torch.no_grad()
def head_on_vectors(head, scaler, saved: dict, vectors: np.ndarray, table, device, dtype, batch_size: int = 8192):
    """The head's log1p predictions from cached vectors: the pooled part of each vector and the rows'
    structural features standardised by the checkpoint's scaler (exactly the model's head input)."""
    hidden = saved["hidden_size"]
    if vectors.shape[1] != hidden + len(STRUCTURAL_FEATURES):
        raise CacheError(f"cached qwen_text vectors are {vectors.shape[1]} wide; the head reads {hidden} + "
                         f"{len(STRUCTURAL_FEATURES)} structural features")
    features = scaler.transform(table[STRUCTURAL_FEATURES].to_numpy())
    out = []
    for start in range(0, len(table), batch_size):
        x = torch.cat([torch.from_numpy(vectors[start:start + batch_size, :hidden]),
                       torch.from_numpy(features[start:start + batch_size])], 1).to(device)
        with autocast(device, dtype):
            out.append(head(x).squeeze(-1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def main(cfg: QwenConfig) -> Path | None:
    log = setup_logging("qwen3_predict", None)
    if not cfg.finetune:
        log.info("finetune=false: the frozen encoder has no trained head, so there is no text-head prediction; "
                 "its vectors feed fusion and the classical heads")
        return None
    device = pick_device(cfg.device)
    dtype = amp_dtype(device, cfg.precision)
    train = load_table(cfg.data_dir, "train")
    test = load_table(cfg.data_dir, "test")
    folds = encoder_folds(cfg)
    heads = {fold: load_head(best_checkpoint(cfg, fold), cfg, device) for fold in folds}
    identity = vector_identity(cfg)
    # with one encoder per fold the test cache holds the mean of the k encoders' vectors: no head reads that
    vectors = cached_vectors(cfg, "test", test["sample_id"], identity) if len(folds) == 1 else None
    if vectors is not None:
        test_log = head_on_vectors(*heads[folds[0]], vectors, test, device, dtype)
        log.info("test: the text head applied to %d cached %s vectors", len(test), cfg.source_name)
    else:
        log.info("test: no %s cache of this run's encoder%s to read; running the model over %d rows",
                 cfg.source_name, "s" if len(folds) > 1 else "", len(test))
        test_log = fold_mean_log(cfg, test, device, dtype)
    oof, epochs, floor = [], {}, float(train["price"].min())
    for fold in folds:
        scored = train[train["fold"] == fold].reset_index(drop=True)
        vectors = cached_vectors(cfg, "train", scored["sample_id"], identity)
        if vectors is not None:
            fold_log = head_on_vectors(*heads[fold], vectors, scored, device, dtype)
            meta = read_json(best_checkpoint(cfg, fold) / "meta.json")
            log.info("fold %d: the text head applied to %d cached %s vectors", fold, len(scored), cfg.source_name)
        else:
            log.info("fold %d: no %s cache of this run's encoders to read; running the model over %d rows",
                     fold, cfg.source_name, len(scored))
            encoder = load_run(cfg, device, fold)
            fold_log, meta = head_log(cfg, encoder, scored, device, dtype), encoder[3]
        oof.append(pd.DataFrame({"sample_id": scored["sample_id"], "log_pred": fold_log, "fold": fold}))
        epochs[str(fold)], floor = meta["epoch"], meta["price_floor"]
    prices = prices_from_log(test_log, floor)
    raw_test = Path(read_json(Path(cfg.data_dir) / META_FILE)["config"]["raw_dir"]) / "test.csv"
    out = Path(cfg.out_dir) / cfg.run_name / "test_out.csv"
    write_submission(out, test["sample_id"], prices, test_csv=raw_test if raw_test.exists() else None,
                     test_ids=None if raw_test.exists() else test["sample_id"].tolist())

    oof = pd.concat(oof, ignore_index=True)
    truth = train.set_index("sample_id").loc[oof["sample_id"], "price"]
    oof_smape = smape(truth, prices_from_log(oof["log_pred"], floor))
    every_fold = cfg.encoder_folds == "all"
    selection = encoder_selection(cfg.selection_fraction, per_fold=every_fold)
    write_predictions(cfg.predictions_dir, MODEL_NAME, oof=oof,
                      test=pd.DataFrame({"sample_id": test["sample_id"], "log_pred": test_log}),
                      meta={"oof_kind": "out_of_fold" if every_fold else "holdout", "holdout_smape": oof_smape,
                            "config": to_dict(cfg), "selection": selection, "encoder_unseen_folds": folds,
                            "checkpoint_epoch": epochs})
    log.info("wrote %s: %d rows, prices %.2f to %.2f; %s SMAPE %.2f", out, len(prices), prices.min(),
             prices.max(), "out-of-fold" if every_fold else "holdout", oof_smape)
    return out


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(QwenConfig, profiles=PROFILES)))
