"""Train every fusion block and both seed models on the same caches, split and seed; rank them.

    python -m fusion.compare                     # real defaults (the all_embeddings sources)
    python -m fusion.compare profile=tiny epochs=30

Block runs use the all_embeddings config's sources with architecture=block; `qwen_clip` keeps its
own two sources unless `sources=` is given. Every other key=value applies to every run. Prints a
table ranked by validation SMAPE (with SMAPE per price bin, parameters and train time) and saves
it as out_dir/compare/comparison.csv.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pandas as pd

from core.config import parse_args
from core.errors import run_cli
from core.io import atomic_save, read_json
from core.metrics import format_table
from fusion import train
from fusion.blocks import BLOCKS
from fusion.config import FusionConfig


def runs(argv: list[str]) -> list[tuple[str, FusionConfig]]:
    profile = next((a for a in argv if a.startswith("profile=")), "profile=default")
    overrides = [a for a in argv if not a.startswith("profile=")]
    base = parse_args(FusionConfig, [profile, *overrides], train.model_profiles("all_embeddings"))
    qwen_overrides = overrides if any(a.startswith("sources=") for a in overrides) else \
        [a for a in overrides if not a.startswith("sources=")]
    qwen = parse_args(FusionConfig, [profile, *qwen_overrides], train.model_profiles("qwen_clip"))
    out = [("all_embeddings", base), ("qwen_clip", qwen)]
    for name in BLOCKS:
        out.append((f"block:{name}", dataclasses.replace(base, architecture="block", block=name)))
    return [(name, dataclasses.replace(cfg, run_name=f"compare/{name.replace(':', '_')}")) for name, cfg in out]


def main(argv: list[str] | None = None) -> pd.DataFrame:
    argv = list(sys.argv[1:] if argv is None else argv)
    rows = []
    planned = runs(argv)
    for name, cfg in planned:
        summary = train.main(cfg)
        run_dir = Path(cfg.out_dir) / cfg.run_name
        fold = read_json(run_dir / f"fold_{summary['folds'][0]}" / "metrics.json")
        row = {"model": name, "val_smape": summary["val_smape_mean"]}
        row.update({f"smape {b['bin']}": b["smape"] for b in fold["by_price_bin"] if b["bin"] != "all"})
        row.update({"parameters": summary["parameters"], "train_seconds": round(summary["train_seconds"], 1)})
        rows.append(row)
    table = pd.DataFrame(rows).sort_values("val_smape").reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    out = Path(planned[0][1].out_dir) / "compare" / "comparison.csv"
    atomic_save(lambda tmp: table.to_csv(tmp, index=False), out)
    print(format_table(table))
    print(f"wrote {out}")
    return table


if __name__ == "__main__":
    run_cli(main)
