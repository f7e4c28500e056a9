"""Test predictions from the best text-model checkpoint, written as a checked submission (the text
model alone is a baseline submission) and, with its holdout-fold predictions, to the shared
predictions folder (`predictions_dir/text_head/`) that the report and the ensemble read. With one
encoder per fold (`encoder_folds=all`) every train row is predicted by the encoder that never saw
its fold (out of fold) and test predictions are the mean of the k encoders in log space.

    python -m qwen3_finetune.predict                 # -> out_dir/run_name/test_out.csv
    python -m qwen3_finetune.predict profile=tiny
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.config import parse_args, to_dict
from core.errors import run_cli
from core.io import read_json
from core.metrics import prices_from_log, smape
from core.predictions import write_predictions
from core.runtime import amp_dtype, pick_device, setup_logging
from core.submission import write_submission
from core.tables import META_FILE, encoder_selection, load_table
from qwen3_finetune.config import PROFILES, QwenConfig
from qwen3_finetune.model import encoder_folds, load_run, run_rows, table_inputs

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
    test_log = fold_mean_log(cfg, test, device, dtype)
    folds = encoder_folds(cfg)
    oof, epochs, floor = [], {}, float(train["price"].min())
    for fold in folds:
        encoder = load_run(cfg, device, fold)
        scored = train[train["fold"] == fold].reset_index(drop=True)
        oof.append(pd.DataFrame({"sample_id": scored["sample_id"], "log_pred": head_log(cfg, encoder, scored, device, dtype),
                                 "fold": fold}))
        epochs[str(fold)], floor = encoder[3]["epoch"], encoder[3]["price_floor"]
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
