"""Test predictions from the best text-model checkpoint, written as a checked submission (the text
model alone is a baseline submission) and, with its holdout-fold predictions, to the shared
predictions folder (`predictions_dir/text_head/`) that the report and the ensemble read.

    python -m qwen3_finetune.predict                 # -> out_dir/run_name/test_out.csv
    python -m qwen3_finetune.predict profile=tiny
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from core.config import parse_args, to_dict
from core.errors import run_cli
from core.io import read_json
from core.metrics import prices_from_log, smape
from core.predictions import write_predictions
from core.runtime import amp_dtype, pick_device, setup_logging
from core.submission import write_submission
from core.tables import META_FILE, encoder_selection, holdout_fold, load_table
from qwen3_finetune.config import PROFILES, QwenConfig
from qwen3_finetune.model import load_run, run_rows, table_inputs

MODEL_NAME = "text_head"


def main(cfg: QwenConfig) -> Path | None:
    log = setup_logging("qwen3_predict", None)
    if not cfg.finetune:
        log.info("finetune=false: the frozen encoder has no trained head, so there is no text-head prediction; "
                 "its vectors feed fusion and the classical heads")
        return None
    device = pick_device(cfg.device)
    dtype = amp_dtype(device, cfg.precision)
    model, scaler, tokenizer, meta = load_run(cfg, device)

    def predict_log(table):
        token_ids, features = table_inputs(table, tokenizer, scaler, cfg.max_length)
        return run_rows(model, token_ids, features, cfg.eval_batch_size, tokenizer.pad_token_id, device, dtype)

    test = load_table(cfg.data_dir, "test")
    test_log = predict_log(test)
    prices = prices_from_log(test_log, meta["price_floor"])
    raw_test = Path(read_json(Path(cfg.data_dir) / META_FILE)["config"]["raw_dir"]) / "test.csv"
    out = Path(cfg.out_dir) / cfg.run_name / "test_out.csv"
    write_submission(out, test["sample_id"], prices, test_csv=raw_test if raw_test.exists() else None,
                     test_ids=None if raw_test.exists() else test["sample_id"].tolist())

    train = load_table(cfg.data_dir, "train")
    fold = holdout_fold(cfg.data_dir)
    holdout = train[train["fold"] == fold].reset_index(drop=True)
    holdout_log = predict_log(holdout)
    holdout_smape = smape(holdout["price"], prices_from_log(holdout_log, meta["price_floor"]))
    write_predictions(cfg.predictions_dir, MODEL_NAME,
                      oof=pd.DataFrame({"sample_id": holdout["sample_id"], "log_pred": holdout_log, "fold": fold}),
                      test=pd.DataFrame({"sample_id": test["sample_id"], "log_pred": test_log}),
                      meta={"oof_kind": "holdout", "holdout_smape": holdout_smape, "config": to_dict(cfg),
                            "selection": encoder_selection(cfg.selection_fraction),
                            "encoder_unseen_folds": [fold], "checkpoint_epoch": meta["epoch"]})
    log.info("wrote %s: %d rows, prices %.2f to %.2f; holdout SMAPE %.2f", out, len(prices), prices.min(),
             prices.max(), holdout_smape)
    return out


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(QwenConfig, profiles=PROFILES)))
