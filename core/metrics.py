"""The competition metric and the per-price-bin report used by every stage."""
from __future__ import annotations

import numpy as np
import pandas as pd

# Upper edges of the report's price bins, in dollars; the last bin is open ($200+).
PRICE_BIN_EDGES = (5.0, 10.0, 30.0, 60.0, 200.0)
# the weighted SMAPE loss's weight per price bin, cheapest first (here, torch-free, for the configs)
TIER_WEIGHTS = (10.0, 8.0, 6.0, 4.0, 2.0, 1.0)


def smape_per_row(y_true, y_pred) -> np.ndarray:
    """Per-row SMAPE in percent, |p - y| / ((|p| + |y|) / 2) * 100.

    A row where both the truth and the prediction are 0 scores 0 (a perfect prediction) rather
    than 0/0; prices here are positive, so this only matters for hand-built inputs.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"smape: shapes differ, y_true {y_true.shape} vs y_pred {y_pred.shape}")
    denom = (np.abs(y_true) + np.abs(y_pred)) / 2.0
    diff = np.abs(y_pred - y_true)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(denom == 0, 0.0, diff / denom) * 100.0
    return out


def smape(y_true, y_pred) -> float:
    """SMAPE in percent, exactly as the competition defines it (0..200)."""
    rows = smape_per_row(y_true, y_pred)
    if rows.size == 0:
        raise ValueError("smape: no rows")
    return float(rows.mean())


def prices_from_log(log_pred, floor: float) -> np.ndarray:
    """log1p predictions back to prices, floored at `floor` (the smallest training price).
    Never clamp at 0: a zero prediction costs 200% SMAPE on its row."""
    return np.maximum(np.expm1(np.asarray(log_pred, dtype=np.float64)), floor)


def price_bin_labels(edges=PRICE_BIN_EDGES) -> list[str]:
    lows = (0.0, *edges)
    labels = [f"${lo:g}-{hi:g}" for lo, hi in zip(lows, edges)]
    return labels + [f"${edges[-1]:g}+"]


def price_bin_index(prices, edges=PRICE_BIN_EDGES) -> np.ndarray:
    """Bin of each price: 0 for [0, 5), 1 for [5, 10), ..., len(edges) for >= the last edge."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(prices, dtype=np.float64), side="right")


def price_bin_report(y_true, y_pred, edges=PRICE_BIN_EDGES) -> pd.DataFrame:
    """Count, SMAPE and median pred/true ratio per true-price bin, plus an `all` row."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    per_row = smape_per_row(y_true, y_pred)
    ratio = np.divide(y_pred, y_true, out=np.full_like(y_pred, np.nan), where=y_true != 0)
    bins = price_bin_index(y_true, edges)
    rows = []
    for i, label in enumerate(price_bin_labels(edges)):
        sel = bins == i
        n = int(sel.sum())
        rows.append({
            "bin": label,
            "count": n,
            "smape": float(per_row[sel].mean()) if n else float("nan"),
            "median_pred_over_true": float(np.nanmedian(ratio[sel])) if n else float("nan"),
        })
    rows.append({"bin": "all", "count": int(len(y_true)), "smape": float(per_row.mean()) if len(y_true) else float("nan"),
                 "median_pred_over_true": float(np.nanmedian(ratio)) if len(y_true) else float("nan")})
    return pd.DataFrame(rows)


def format_table(df: pd.DataFrame, floatfmt: str = "{:.2f}") -> str:
    """A plain fixed-width table for console logs (no extra dependency)."""
    cols = list(df.columns)
    cells = [[c for c in cols]] + [
        [floatfmt.format(v) if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
