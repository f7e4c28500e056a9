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
    oof, test_logs, epochs, floor = [], [], {}, float(train["price"].min())
    for fold in folds:
        model, scaler, tokenizer, meta = load_run(cfg, device, fold)

        def predict_log(table):
            token_ids, features = table_inputs(table, tokenizer, scaler, cfg.max_length)
            return run_rows(model, token_ids, features, cfg.eval_batch_size, tokenizer.pad_token_id, device, dtype)

        scored = train[train["fold"] == fold].reset_index(drop=True)
        oof.append(pd.DataFrame({"sample_id": scored["sample_id"], "log_pred": predict_log(scored), "fold": fold}))
        test_logs.append(predict_log(test))
        epochs[str(fold)], floor = meta["epoch"], meta["price_floor"]
    test_log = np.mean(test_logs, axis=0)
    prices = prices_from_log(test_log, floor)
    raw_test = Path(read_json(Path(cfg.data_dir) / META_FILE)["config"]["raw_dir"]) / "test.csv"
    out = Path(cfg.out_dir) / cfg.run_name / "test_out.csv"
    write_submission(out, test["sample_id"], prices, test_csv=raw_test if raw_test.exists() else None,
                     test_ids=None if raw_test.exists() else test["sample_id"].tolist())

    oof = pd.concat(oof, ignore_index=True)
    truth = train.set_index("sample_id").loc[oof["sample_id"], "price"]
    oof_smape = smape(truth, prices_from_log(oof["log_pred"], floor))
    every_fold = cfg.encoder_folds == "all"
    selection = encoder_selection(cfg.selection_fraction)
    if every_fold:
        selection = "one encoder per fold, each chose its best epoch on a slice of its own training folds"
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
