"""5-fold CV on real catalog rows through the real stages (`profile=small`), in one table.

    python -m bench.real_data                                  # ../shared/real/train.csv, 2,000 test rows
    python -m bench.real_data train=PATH root=/tmp/real_bench test_rows=2000 [key=value ...]

Builds a raw folder from `train` (competition format, with price) and a test file of `test_rows`
rows (the competition's 100-row sample test, topped up with catalog texts drawn from the train
file under new ids, so the run has the 7k/2k shape of a real job; test prices are not scored),
runs `python -m pipeline profile=small` on it (images are not downloaded unless
`download_images=true`: the competition's CDN is often out of reach), and prints: each model's SMAPE and what the figure is
(out of fold on every train row, holdout fold only, or the blend's nested CV) and, for mixture-of-experts
models, the mean gate load per expert; the blend's nested CV without and with its stack model and its price
calibration, and whether the submission uses the calibration; the blend's SMAPE per price decile; and
seconds per stage. Further `key=value` tokens go to the pipeline.
"""
from __future__ import annotations

import platform
import sys
import time
from datetime import date
from pathlib import Path

import pandas as pd

from bench import split_options

SHARED = Path(__file__).resolve().parents[2] / "shared"


def make_raw(train_csv: Path, raw_dir: Path, test_rows: int, seed: int = 0) -> Path:
    raw_dir.mkdir(parents=True, exist_ok=True)
    train = pd.read_csv(train_csv, dtype={"sample_id": str})
    train.to_csv(raw_dir / "train.csv", index=False)
    sample = SHARED / "competition" / "sample_test.csv"
    test = pd.read_csv(sample, dtype={"sample_id": str}) if sample.exists() else train.iloc[:0]
    test = test[["sample_id", "catalog_content", "image_link"]].head(test_rows)
    extra = test_rows - len(test)
    if extra > 0:
        drawn = train.sample(n=extra, replace=extra > len(train), random_state=seed)
        drawn = drawn[["catalog_content", "image_link"]].assign(sample_id=[f"bench{i}" for i in range(extra)])
        test = pd.concat([test, drawn[["sample_id", "catalog_content", "image_link"]]], ignore_index=True)
    test.to_csv(raw_dir / "test.csv", index=False)
    return raw_dir


def expert_load_text(meta: dict) -> str:
    """A model's expert load (share of its scored rows whose top gate is each expert, pooled over folds) with
    the smallest share any expert got in any one fold: "0.44/0.36/0.20 (min 0.09)"; "" without experts."""
    from pipeline import expert_load_text as pooled_text

    load = meta.get("expert_load")
    if not load:
        return ""
    per_fold = meta.get("expert_load_per_fold") or (load if isinstance(load, dict) else {"all": load})
    return pooled_text(load) + f" (min {min(min(v) for v in per_fold.values()):.2f})"


def main(argv: list[str] | None = None) -> pd.DataFrame:
    import pipeline
    from core.io import read_json
    from core.metrics import format_table

    argv = list(sys.argv[1:] if argv is None else argv)
    opts, rest = split_options(argv, {"train": str(SHARED / "real" / "train.csv"), "root": "/tmp/real_bench",
                                      "test_rows": "2000"})
    root = Path(opts["root"])
    raw = make_raw(Path(opts["train"]), root / "raw", int(opts["test_rows"]))
    t0 = time.time()
    # the image links point to a CDN this machine may not reach: `download_images=true` tries them
    download = "download_images=true" in rest
    rest = [t for t in rest if t != "download_images=true"]
    timings = pipeline.main(["profile=small", f"raw_dir={raw}", f"root={root}",
                             f"prepare.download_images={str(download).lower()}", *rest])
    total = time.time() - t0
    state = read_json(root / "pipeline_state.json")
    seconds = {name: s.get("seconds") for name, s in state.items()}

    report = pd.read_csv(root / "report.csv")
    ensemble = read_json(root / "predictions" / "ensemble" / "ensemble.json")
    deciles = pd.DataFrame(ensemble["nested_cv_smape_by_decile"])
    order = ["decile", "price_from", "price_to", "count", "smape", "smape_calibrated", "median_pred_over_true",
             "median_pred_over_true_calibrated"]
    deciles = deciles[[c for c in order if c in deciles.columns]]
    n_train = len(pd.read_csv(raw / "train.csv", usecols=["sample_id"]))
    print(f"\n{date.today()}, {platform.processor() or platform.machine()}, {n_train:,} train rows, "
          f"{opts['test_rows']} test rows, profile=small; whole run {total:.0f} s "
          f"({'fresh' if len(timings) > 3 else 'mostly skipped: rerun in a new root for timings'})")
    print("\nSMAPE by model (figure: out_of_fold = every train row, predicted by a model that never saw it; "
          "holdout = the holdout fold only; nested CV = blend weights, scale and calibration fitted on the other "
          "folds; expert_load = mean gate load per expert over folds, and the smallest share in any fold)")
    metas = [root / "predictions" / m / "meta.json" for m in report["model"]]
    report["expert_load"] = [expert_load_text(read_json(path)) if path.exists() else "" for path in metas]
    print(format_table(report[["model", "figure", "rows", "smape", "expert_load", "how"]]))
    best_single = report[(report["model"] != "ensemble") & (report["figure"] == "out_of_fold")]["smape"].min()
    print(f"\nblend nested CV {ensemble['nested_cv_smape']:.2f} (+/- {ensemble['nested_cv_smape_std']:.2f} over folds); "
          f"in-sample {ensemble['in_sample_smape']:.2f} (optimistic); best single out-of-fold model {best_single:.2f}; "
          f"weights {', '.join(f'{k} {v:.3f}' for k, v in ensemble['weights'].items())}; scale {ensemble['scale']:.3f}")
    if ensemble.get("nested_cv_smape_stacked") is not None:
        print(f"stack model (share {ensemble['stack_share']:g} of the log price, before the price calibration): "
              f"nested CV {ensemble['nested_cv_smape_linear']:.2f} with the weights and scale alone, "
              f"{ensemble['nested_cv_smape_stacked']:.2f} with it; {ensemble['stack_decision']}")
    if ensemble.get("nested_cv_smape_calibrated") is not None:
        print(f"price calibration ({ensemble['calibration']['shape']}): nested CV "
              f"{ensemble['nested_cv_smape_uncalibrated']:.2f} without, {ensemble['nested_cv_smape_calibrated']:.2f} "
              f"with; {ensemble['calibration_decision']}")
    print("\nblend nested CV SMAPE by decile of the true price (smape: without the price calibration, "
          "smape_calibrated: with it)")
    print(format_table(deciles))
    print("\nseconds per stage: " + ", ".join(f"{k} {v}" for k, v in seconds.items() if v is not None))
    return report


if __name__ == "__main__":
    from core.errors import run_cli

    run_cli(main)
