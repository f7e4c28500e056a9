"""Test predictions from the best Qwen checkpoint, written as a checked submission: the text model
alone is a baseline submission.

    python -m qwen3_finetune.predict                 # -> out_dir/run_name/test_out.csv
    python -m qwen3_finetune.predict profile=tiny
"""
from __future__ import annotations

from pathlib import Path


from core.config import parse_args
from core.errors import run_cli
from core.io import read_json
from core.metrics import prices_from_log
from core.runtime import amp_dtype, pick_device
from core.submission import write_submission
from core.tables import META_FILE, load_table
from qwen3_finetune.config import PROFILES, QwenConfig
from qwen3_finetune.model import load_run, run_rows, table_inputs


def main(cfg: QwenConfig) -> Path:
    device = pick_device(cfg.device)
    model, scaler, tokenizer, meta = load_run(cfg, device)
    table = load_table(cfg.data_dir, "test")
    token_ids, features = table_inputs(table, tokenizer, scaler, cfg.max_length)
    log_pred = run_rows(model, token_ids, features, cfg.eval_batch_size, tokenizer.pad_token_id, device,
                        amp_dtype(device, cfg.precision))
    prices = prices_from_log(log_pred, meta["price_floor"])
    raw_test = Path(read_json(Path(cfg.data_dir) / META_FILE)["config"]["raw_dir"]) / "test.csv"
    out = Path(cfg.out_dir) / cfg.run_name / "test_out.csv"
    write_submission(out, table["sample_id"], prices, test_csv=raw_test if raw_test.exists() else None,
                     test_ids=None if raw_test.exists() else table["sample_id"].tolist())
    print(f"wrote {out}: {len(prices)} rows, prices {prices.min():.2f} to {prices.max():.2f}")
    return out


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(QwenConfig, profiles=PROFILES)))
