"""Predict test prices with a trained fusion run and write a checked submission.

    python -m fusion.predict_test model=all_embeddings                  # -> checkpoints/fusion/all_embeddings/test_out.csv
    python -m fusion.predict_test model=all_embeddings output=test_out.csv
    python -m fusion.predict_test model=qwen_clip profile=tiny

Uses every fold's best.pt in the run folder (one for a holdout run; k for `folds=all`, averaged in
log space). Predictions are floored at the smallest training price, never clamped to 0. The file
is written only if it passes the submission check against the test CSV.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from core.errors import PipelineError, run_cli
from core.io import read_json
from core.metrics import prices_from_log
from core.runtime import amp_dtype, pick_device, setup_logging
from core.submission import write_submission
from core.tables import META_FILE, load_table
from fusion.train import load_checkpoint, load_inputs, parse_cli, predict_log


def main(cfg, output: Path | None = None) -> Path:
    run_dir = Path(cfg.out_dir) / cfg.run_name
    log = setup_logging("fusion.predict_test", run_dir)
    checkpoints = sorted(run_dir.glob("fold_*/best.pt"))
    if not checkpoints:
        raise PipelineError(f"no fold_*/best.pt in {run_dir}; train first: python -m fusion.train run_name={cfg.run_name}")
    device = pick_device(cfg.device)
    table = load_table(cfg.data_dir, "test")
    inputs = load_inputs(cfg, "test", table["sample_id"].tolist(), device)
    idx = torch.arange(len(table), device=device)
    logs, floors = [], []
    for path in checkpoints:
        model, ckpt = load_checkpoint(path, device)
        if [s["name"] for s in ckpt["sources"]] != [s.name for s in inputs.specs] or \
                [s["dim"] for s in ckpt["sources"]] != [s.dim for s in inputs.specs]:
            raise PipelineError(f"{path} was trained on sources {ckpt['sources']}, but the test caches are {inputs.specs}")
        logs.append(predict_log(model, inputs, idx, 4096, device, amp_dtype(device, cfg.precision)))
        floors.append(ckpt["price_floor"])
    prices = prices_from_log(np.mean(logs, 0), min(floors))
    raw_test = Path(read_json(Path(cfg.data_dir) / META_FILE)["config"]["raw_dir"]) / "test.csv"
    output = Path(output) if output else run_dir / "test_out.csv"
    write_submission(output, table["sample_id"], prices, test_csv=raw_test if raw_test.exists() else None,
                     test_ids=None if raw_test.exists() else table["sample_id"].tolist())
    log.info("wrote %s: %d rows from %d model(s), prices %.2f to %.2f (median %.2f)", output, len(prices),
             len(checkpoints), prices.min(), prices.max(), np.median(prices))
    return output


if __name__ == "__main__":
    args = sys.argv[1:]
    out = next((a.split("=", 1)[1] for a in args if a.startswith("output=")), None)
    run_cli(lambda: main(parse_cli([a for a in args if not a.startswith("output=")]), out))
