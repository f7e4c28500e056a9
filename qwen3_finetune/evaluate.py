"""Validation SMAPE and the per-price-bin table of the best Qwen checkpoint.

    python -m qwen3_finetune.evaluate
    python -m qwen3_finetune.evaluate profile=tiny

Scores the data stage's holdout fold; writes out_dir/run_name/val_predictions.csv and eval.json.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from core.config import parse_args
from core.errors import run_cli
from core.io import atomic_save, write_json
from core.metrics import format_table, price_bin_report, prices_from_log, smape
from core.runtime import amp_dtype, pick_device
from core.tables import holdout_fold, load_table
from qwen3_finetune.config import PROFILES, QwenConfig
from qwen3_finetune.model import load_run, run_rows, table_inputs


def main(cfg: QwenConfig) -> pd.DataFrame | None:
    if not cfg.finetune:
        print("finetune=false: the frozen encoder has no trained head to evaluate")
        return None
    device = pick_device(cfg.device)
    fold = holdout_fold(cfg.data_dir)
    model, scaler, tokenizer, meta = load_run(cfg, device, fold)  # the encoder that never saw this fold
    table = load_table(cfg.data_dir, "train")
    val = table[table["fold"] == fold].reset_index(drop=True)
    token_ids, features = table_inputs(val, tokenizer, scaler, cfg.max_length)
    log_pred = run_rows(model, token_ids, features, cfg.eval_batch_size, tokenizer.pad_token_id, device,
                        amp_dtype(device, cfg.precision))
    pred = prices_from_log(log_pred, meta["price_floor"])
    run_dir = Path(cfg.out_dir) / cfg.run_name
    atomic_save(lambda tmp: pd.DataFrame({"sample_id": val["sample_id"], "price": val["price"], "pred": pred})
                .to_csv(tmp, index=False), run_dir / "val_predictions.csv")
    report = price_bin_report(val["price"], pred)
    write_json(run_dir / "eval.json", {"val_smape": smape(val["price"], pred), "epoch": meta["epoch"],
                                       "by_price_bin": report.to_dict(orient="records")})
    print(format_table(report))
    return report


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(QwenConfig, profiles=PROFILES)))
