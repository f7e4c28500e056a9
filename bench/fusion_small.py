"""Choose `profile=small`'s fusion widths and dropout by cross-validation on real rows, and print the grid.

    python -m bench.fusion_small root=/tmp/fusion_work                   # a finished profile=small run's folder
    python -m bench.fusion_small root=/tmp/fusion_work folds=0,1,2,3,4 hidden=64,128,256 dropout=0.1,0.2,0.3
    python -m bench.fusion_small architectures=hierarchical router_top_k=2   # other key=value: every run's config

For each architecture (`hierarchical`: fusion/all_embeddings, cross-attention + mixture of experts;
`concat_mlp`: fusion/qwen_clip's block) and each grid point (hidden_dim x dropout; the experts' widths
scale with hidden_dim as [2h, h]), trains the model with the small profile's other settings on the
sources `sources` and scores it out of fold: every epoch choice (early stopping, LR plateau, best
checkpoint) is made on a seeded 10% slice of the training folds (`selection=inner`), and each
listed fold is predicted once, at the end. The figure is the pooled SMAPE over the listed folds'
rows. To keep the search to about 20 minutes on 2 shared cores it scores fold 0 only (1,383 rows)
over 3 widths x 2 dropouts by default; the chosen settings are then confirmed on all five folds
with `python -m fusion.train ... folds=all`.

Epochs are not a grid axis: early stopping on the inner slice already chooses them per fold; the
table shows the best epochs it chose, and the profile's `epochs` cap is set well above them.
Writes nothing into `root`: runs go to `work` (default /tmp/fusion_small_grid), the table to
`work/grid.csv`.
"""
from __future__ import annotations

import itertools
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench import split_options
from core.metrics import format_table, smape
from core.runtime import pick_device, setup_logging
from core.tables import load_table
from fusion import train
from fusion.inference import available_sources, load_inputs

ARCHITECTURES = {
    "hierarchical": ["model=all_embeddings"],
    "concat_mlp": ["model=qwen_clip", "architecture=block", "block=concat_mlp"],
}


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    """(the search's options, the other key=value tokens, which go to every run's fusion config)."""
    return split_options(argv, {"root": "/tmp/fusion_work", "work": "/tmp/fusion_small_grid", "folds": "0",
                                "hidden": "64,128,256", "dropout": "0.1,0.3", "sources": "qwen_text,text_tabular",
                                "architectures": "hierarchical,concat_mlp"})


def score(cfg, folds: list[int], table: pd.DataFrame, inputs, log) -> dict:
    """Train `cfg` on each fold in `folds` (epochs chosen on the inner slice); pooled SMAPE over their rows."""
    run_dir = Path(cfg.out_dir) / cfg.run_name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    device = pick_device(cfg.device)
    t0 = time.time()
    metrics = [train.train_fold(cfg, k, table, inputs, run_dir, device, log) for k in folds]
    preds = pd.concat(pd.read_csv(run_dir / f"fold_{k}" / "val_predictions.csv") for k in folds)
    loads = [m["expert_load"] for m in metrics if m.get("expert_load")]
    return {"smape": smape(preds["price"], preds["pred"]),
            "per_fold": "/".join(f"{m['val_smape']:.2f}" for m in metrics),
            "best_epochs": "/".join(str(m["best_epoch"]) for m in metrics),
            "min_expert_load": float(np.min(loads)) if loads else np.nan,
            "parameters": metrics[0]["parameters"], "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    opts, extra = parse(list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(1)  # these small models train faster on one thread than on two contended ones
    root, work = Path(opts["root"]), Path(opts["work"])
    folds = [int(k) for k in opts["folds"].split(",")]
    common = [f"data_dir={root / 'data'}", f"embeddings_dir={root / 'embeddings'}", f"out_dir={work}",
              f"predictions_dir={work / 'predictions'}", f"sources={opts['sources']}", "profile=small", "folds=all"]
    log = setup_logging("bench.fusion_small", work)
    table = load_table(root / "data", "train")
    rows, inputs = [], None
    for arch, hidden, dropout in itertools.product(opts["architectures"].split(","),
                                                   [int(h) for h in opts["hidden"].split(",")],
                                                   [float(d) for d in opts["dropout"].split(",")]):
        name = f"{arch}_h{hidden}_d{dropout}"
        cfg = train.parse_cli([*ARCHITECTURES[arch], *common, f"hidden_dim={hidden}", f"dropout={dropout}",
                               f"expert_dims={2 * hidden},{hidden}", f"run_name={name}", *extra])
        if inputs is None:  # the same caches for every run
            inputs = load_inputs(cfg, "train", table["sample_id"].tolist(), pick_device(cfg.device),
                                 available_sources(cfg, log))
        result = score(cfg, folds, table, inputs, log)
        rows.append({"architecture": arch, "hidden_dim": hidden, "dropout": dropout, **result})
        log.info("%s: SMAPE %.3f over folds %s (%s), best epochs %s, %.0fs", name, result["smape"], folds,
                 result["per_fold"], result["best_epochs"], result["seconds"])
    grid = pd.DataFrame(rows).sort_values("smape").reset_index(drop=True)
    grid.to_csv(work / "grid.csv", index=False)
    print(f"out-of-fold SMAPE pooled over folds {folds} (epochs chosen on an inner slice of the training folds)")
    print(format_table(grid))
    for arch, best in grid.groupby("architecture").head(1).set_index("architecture").iterrows():
        print(f"best {arch}: hidden_dim={best['hidden_dim']} dropout={best['dropout']} SMAPE {best['smape']:.3f}")
    return grid


if __name__ == "__main__":
    main()
