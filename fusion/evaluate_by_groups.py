"""Validation SMAPE by price bin, with plots, for a trained fusion run.

    python -m fusion.evaluate_by_groups model=all_embeddings
    python -m fusion.evaluate_by_groups model=qwen_clip profile=tiny

Reads val_predictions.csv and history.csv of the folds the run lists in its own metrics.json (each
checked against the run's config.json; nothing else in the folder is read) and writes to
out_dir/run_name/eval/: by_price_bin.csv, learning_curves.png (the SMAPE that judged each epoch),
pred_vs_true.png, smape_by_bin.png.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from core.errors import run_cli  # noqa: E402
from core.io import atomic_save  # noqa: E402
from core.metrics import format_table, price_bin_report, smape  # noqa: E402
from fusion.inference import run_folds  # noqa: E402
from fusion.train import parse_cli  # noqa: E402


def main(cfg) -> pd.DataFrame:
    run_dir = Path(cfg.out_dir) / cfg.run_name
    fold_dirs = [f.dir for f in run_folds(run_dir)]
    preds = pd.concat([pd.read_csv(d / "val_predictions.csv") for d in fold_dirs])
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    report = price_bin_report(preds["price"], preds["pred"])
    atomic_save(lambda tmp: report.to_csv(tmp, index=False), out / "by_price_bin.csv")

    fig, ax = plt.subplots(figsize=(6, 4))
    for d in fold_dirs:
        history = pd.read_csv(d / "history.csv")
        ax.plot(history["epoch"], history["select_smape"], label=f"{d.name}")
    ax.set_xlabel("epoch"), ax.set_ylabel("SMAPE on the epoch-selection rows (%)"), ax.legend(), ax.set_title(cfg.run_name)
    fig.tight_layout(), fig.savefig(out / "learning_curves.png", dpi=100), plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(preds["price"], preds["pred"], s=4, alpha=0.4)
    lo, hi = preds[["price", "pred"]].min().min(), preds[["price", "pred"]].max().max()
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("true price"), ax.set_ylabel("predicted price")
    ax.set_title(f"{cfg.run_name}: SMAPE {smape(preds['price'], preds['pred']):.2f}%")
    fig.tight_layout(), fig.savefig(out / "pred_vs_true.png", dpi=100), plt.close(fig)

    bins = report[report["bin"] != "all"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(bins["bin"], np.nan_to_num(bins["smape"]))
    ax.set_ylabel("SMAPE (%)"), ax.set_title("validation SMAPE by true-price bin")
    fig.tight_layout(), fig.savefig(out / "smape_by_bin.png", dpi=100), plt.close(fig)

    print(format_table(report))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    run_cli(lambda: main(parse_cli()))
