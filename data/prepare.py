"""Validate the competition CSVs, parse the catalog text, fetch images and write the one split.

    python -m data.prepare raw_dir=DIR out_dir=DIR download_images=true
    python -m data.prepare profile=tiny            # the demo catalog under checkpoints/demo

Reads DIR/train.csv and DIR/test.csv (`sample_id, catalog_content, image_link[, price]`) and
writes out_dir/train.parquet, out_dir/test.parquet, out_dir/parse_report.json and the sidecar
out_dir/prepare.json. Every later stage splits by the `fold` column written here.

Each usable image is decoded here once, into a bounded copy under out_dir/images/ (see
data.images); the tables' `image_path` points at the copy, so no later stage opens the original.
Local image links are read only inside `image_dir` (default: raw_dir); prepare.json records that
folder and each split's share of rows without a usable image, so scoring can resolve new rows'
links the same way and compare.
"""
from __future__ import annotations

import csv
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import parse_args, to_dict
from core.errors import PipelineError, run_cli
from core.io import atomic_save, escaped, read_json, undecodable_bytes, write_json
from core.runtime import progress, setup_logging
from core.tables import META_FILE
from data.catalog import model_text, normalise_unit, parse_catalog, structural_features
from data.config import PREPARE_PROFILES, PrepareConfig
from data.images import fetch_images, reason_of

REQUIRED = ["sample_id", "catalog_content", "image_link"]
NOT_UTF8_HINT = "(the file is not UTF-8: it was probably saved as Latin-1 or Windows-1252; save it as UTF-8)"


class DataValidationError(PipelineError, ValueError):
    pass


def competition_records(path: Path, with_price: bool, problems: list[str], warn_price: bool = True):
    """Yield every valid row of a competition CSV as a record, streaming; each bad row appends to
    `problems` one line naming its line, id and column. A bad header raises at once."""
    path = Path(path)
    if not path.exists():
        raise DataValidationError(f"{path}: file not found")
    csv.field_size_limit(1 << 30)
    needed = REQUIRED + (["price"] if with_price else [])
    first_line: dict[str, int] = {}
    # utf-8-sig reads past the byte-order mark Excel writes. Undecodable bytes are kept as markers
    # so that the error can name their row and column.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        bad = undecodable_bytes("".join(header))
        if bad:
            raise DataValidationError(f"{path}: {path.name} line 1 (the header): expected UTF-8 text, got byte(s) "
                                      f"{bad} {NOT_UTF8_HINT}")
        missing = [c for c in needed if c not in header]
        if missing:
            raise DataValidationError(f"{path}: missing column(s) {missing}; the header has {header}")
        if not with_price and "price" in header and warn_price:
            logging.getLogger("data.prepare").warning(
                "%s has a 'price' column; it is dropped. Test data carries no prices: train.csv and test.csv "
                "may be swapped, or labels lie beside the test data", path.name)
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            sid = row.get("sample_id") or ""
            where = f"{path.name} line {line} (sample_id {escaped(sid.strip()) or '?'})"
            not_utf8 = [c for c in header if isinstance(row.get(c), str) and undecodable_bytes(row[c])]
            if not_utf8:
                shown = undecodable_bytes("".join(row[c] for c in not_utf8))
                problems.append(f"{where}, column {', '.join(map(repr, not_utf8))}: expected UTF-8 text, got byte(s) {shown}")
                continue
            if None in row or any(row.get(c) is None for c in needed):
                problems.append(f"{where}: expected {len(header)} fields, got a different number")
                continue
            if not sid.strip():
                problems.append(f"{where}, column 'sample_id': empty")
                continue
            if sid != sid.strip():  # an id is kept exactly as written, so spaces would make a different id
                problems.append(f"{where}, column 'sample_id': {escaped(sid)!r} has surrounding spaces; "
                                f"remove them (ids are kept exactly as written)")
                continue
            if sid in first_line:
                problems.append(f"{where}, column 'sample_id': duplicate of line {first_line[sid]}")
                continue
            first_line[sid] = line
            record = {"sample_id": sid, "catalog_content": row["catalog_content"],
                      "image_link": (row["image_link"] or "").strip(), "line": line}
            if with_price:
                text = (row["price"] or "").strip()
                try:
                    price = float(text)
                except ValueError:
                    problems.append(f"{where}, column 'price': expected a positive number, got {text!r}")
                    continue
                if not math.isfinite(price) or price <= 0:
                    problems.append(f"{where}, column 'price': expected a positive number, got {text!r}")
                    continue
                record["price"] = price
            yield record


def raise_problems(path: Path, problems: list[str], rows: int, max_listed: int = 20) -> None:
    """One error listing the bad rows (the first `max_listed`), or one for a file without rows."""
    if problems:
        more = f"\n  ... and {len(problems) - max_listed} more" if len(problems) > max_listed else ""
        hint = f"\n  {NOT_UTF8_HINT}" if any("expected UTF-8" in p for p in problems) else ""
        raise DataValidationError(f"{path}: {len(problems)} bad row(s):\n  " + "\n  ".join(problems[:max_listed]) + more + hint)
    if not rows:
        raise DataValidationError(f"{path}: no rows")


def read_competition_csv(path: Path, with_price: bool, max_listed: int = 20) -> pd.DataFrame:
    """Read a competition CSV; any bad row raises one error listing each problem by line, id and column."""
    problems: list[str] = []
    records = list(competition_records(path, with_price, problems))
    raise_problems(path, problems, len(records), max_listed)
    return pd.DataFrame.from_records(records)


def competition_chunks(path: Path, with_price: bool, chunk_rows: int):
    """The valid rows of a CSV as DataFrames of `chunk_rows` rows; validate the file first (its bad
    rows are skipped here, not reported)."""
    batch = []
    for record in competition_records(path, with_price, [], warn_price=False):
        batch.append(record)
        if len(batch) == chunk_rows:
            yield pd.DataFrame.from_records(batch)
            batch = []
    if batch:
        yield pd.DataFrame.from_records(batch)


def parse_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Catalog fields, the normalised unit and the three structural features, one row per sample."""
    rows = []
    for content in progress(df["catalog_content"], desc="parse", unit="row"):
        parsed = parse_catalog(content)
        unit, unit_kind = normalise_unit(parsed.unit_raw)
        quantity, volume, weight = structural_features(parsed.value, unit)
        rows.append({
            "item_name": parsed.item_name,
            "bullets": "\n".join(parsed.bullets),
            "description": parsed.description,
            "text": model_text(parsed, unit),
            "value": np.nan if parsed.value is None else parsed.value,
            "unit_raw": parsed.unit_raw if parsed.unit_raw is not None else "",
            "unit": unit,
            "unit_kind": unit_kind,
            "quantity_value": quantity,
            "unit_volume": volume,
            "unit_weight": weight,
        })
    return pd.concat([df.reset_index(drop=True), pd.DataFrame(rows)], axis=1)


def image_root(cfg: PrepareConfig) -> Path:
    """The folder local image links are read from (and confined to), absolute."""
    return Path(cfg.image_dir or cfg.raw_dir).resolve()


def resolve_images(links, cfg: PrepareConfig, copies_dir: Path, root: Path, reuse_dirs=()) -> tuple[dict, int]:
    """`fetch_images` under the data stage's settings: every link to a bounded copy in `copies_dir`
    (or a reason), local links read inside `root`, copies in `reuse_dirs` used where they lie."""
    return fetch_images(links, copies_dir, root, download=cfg.download_images, workers=cfg.download_workers,
                        timeout_s=cfg.timeout_s, retries=cfg.retries, retry_failed=cfg.retry_failed,
                        max_bytes=cfg.max_image_bytes, allow_private_hosts=cfg.allow_private_image_hosts,
                        side=cfg.image_side, reuse_dirs=reuse_dirs)


def image_summary(df: pd.DataFrame) -> tuple[float, dict[str, int]]:
    """(share of rows without a usable image, {reason: rows}) for one table."""
    unusable = df.loc[~df["has_image"], "image_status"].map(reason_of)
    return (len(unusable) / len(df) if len(df) else 0.0), dict(Counter(unusable).most_common())


def attach_images(df: pd.DataFrame, results: dict) -> None:
    """The image columns every later stage reads, from `fetch_images`' result per link."""
    df["image_path"] = [results[link].path or "" for link in df["image_link"]]
    df["image_status"] = [results[link].status for link in df["image_link"]]
    df["has_image"] = df["image_path"] != ""


def assign_folds(prices: np.ndarray, n_folds: int, n_bins: int, seed: int) -> np.ndarray:
    """Fold per row, stratified on price-quantile bins: each bin is shuffled and dealt round-robin."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    n = len(prices)
    n_bins = max(1, min(n_bins, n // n_folds))
    ranks = pd.Series(prices).rank(method="first").to_numpy()
    bins = np.minimum(((ranks - 1) * n_bins / n).astype(int), n_bins - 1)
    rng = np.random.default_rng(seed)
    folds = np.empty(n, dtype=np.int64)
    offset = 0
    for b in range(n_bins):
        members = rng.permutation(np.flatnonzero(bins == b))
        folds[members] = (np.arange(len(members)) + offset) % n_folds
        offset += len(members)  # carry on the deal so small folds even out across bins
    return folds


def _fingerprint(path: Path) -> dict:
    """A raw file by its bytes, not its time: touching or copying it is no change."""
    from core.fingerprints import file_digest

    return {"file": Path(path).name, "sha1": file_digest(path)}


def empty_texts(df: pd.DataFrame) -> int:
    return int(df["catalog_content"].fillna("").str.strip().eq("").sum())


def parse_report(train: pd.DataFrame, test: pd.DataFrame) -> dict:
    report = {}
    for name, df in (("train", train), ("test", test)):
        unknown = df.loc[df["unit_kind"] == "unknown", "unit"]
        report[name] = {
            "rows": int(len(df)),
            "rows_per_unit": dict(Counter(df["unit"]).most_common()),
            "rows_per_unit_as_written": dict(Counter(df["unit_raw"]).most_common(30)),
            "rows_without_value": int(df["value"].isna().sum()),
            "empty_catalog_content": empty_texts(df),
            "rows_without_unit": int((df["unit"] == "none").sum()),
            "unknown_units": dict(Counter(unknown).most_common()),
            "images_missing": int((~df["has_image"]).sum()),
            "image_failures": dict(Counter(df.loc[~df["has_image"], "image_status"]).most_common(10)),
        }
    return report


def main(cfg: PrepareConfig) -> dict:
    out_dir = Path(cfg.out_dir)
    log = setup_logging("data.prepare", out_dir)
    train_csv, test_csv = Path(cfg.raw_dir) / "train.csv", Path(cfg.raw_dir) / "test.csv"
    inputs = [_fingerprint(p) for p in (train_csv, test_csv) if p.exists()]
    meta_path = out_dir / META_FILE
    copies_dir = Path(cfg.image_cache_dir) if cfg.image_cache_dir else out_dir / "images"
    if meta_path.exists() and not cfg.force:
        meta = read_json(meta_path)
        if (meta.get("complete") and meta.get("config") == to_dict(cfg) and meta.get("inputs") == inputs
                and copies_dir.is_dir()):  # the tables point into the copies: without them, make them again
            log.info("%s is complete for this config and these inputs; nothing to do (force=true reruns)", out_dir)
            return meta
    if cfg.n_folds < 2 or not 0 <= cfg.holdout_fold < cfg.n_folds:
        raise DataValidationError(f"need n_folds >= 2 and 0 <= holdout_fold < n_folds, got {cfg.n_folds}, {cfg.holdout_fold}")
    if cfg.image_side < 1 or cfg.max_image_bytes < 1:
        raise DataValidationError(f"need image_side >= 1 and max_image_bytes >= 1, "
                                  f"got {cfg.image_side}, {cfg.max_image_bytes}")
    root = image_root(cfg)
    if cfg.image_dir is not None and not root.is_dir():
        raise DataValidationError(f"image_dir={cfg.image_dir}: not a folder (local image links are read from it)")

    for path in (train_csv, test_csv):
        if not path.exists():
            raise DataValidationError(f"{path}: not found. Put the competition's train.csv and test.csv in one folder "
                                      f"and pass raw_dir=FOLDER (or run profile=tiny for the demo catalog)")
    train = read_competition_csv(train_csv, with_price=True)
    test = read_competition_csv(test_csv, with_price=False)
    overlap = set(train["sample_id"]) & set(test["sample_id"])
    if overlap:
        raise DataValidationError(f"{len(overlap)} sample_id(s) appear in both train.csv and test.csv, e.g. {sorted(overlap)[:5]}")
    log.info("read %d train and %d test rows from %s", len(train), len(test), cfg.raw_dir)
    # Only now, with the new CSVs valid, is the old output replaced; a run on bad files leaves it usable.
    write_json(meta_path, {"config": to_dict(cfg), "complete": False})

    train, test = parse_rows(train), parse_rows(test)

    links = pd.concat([train["image_link"], test["image_link"]]).tolist()
    results, downloaded = resolve_images(links, cfg, copies_dir, root)
    for df in (train, test):
        attach_images(df, results)
    images = {name: image_summary(df) for name, df in (("train", train), ("test", test))}
    log.info("images: %d downloaded now, %d usable, %d unusable; local links read inside %s", downloaded,
             int(train["has_image"].sum() + test["has_image"].sum()),
             int((~train["has_image"]).sum() + (~test["has_image"]).sum()), root)
    for name, (share, reasons) in images.items():
        if reasons:
            log.info("%s images unusable: %.1f%% of rows, by reason %s", name, 100 * share, reasons)
    empty = {"train": empty_texts(train), "test": empty_texts(test)}
    if any(empty.values()):
        log.warning("rows with an empty catalog_content: %d in train, %d in test (they keep only their image)",
                    empty["train"], empty["test"])

    train["log_price"] = np.log1p(train["price"])
    train["fold"] = assign_folds(train["price"].to_numpy(), cfg.n_folds, cfg.n_price_bins, cfg.seed)
    train["split"] = np.where(train["fold"] == cfg.holdout_fold, "val", "train")

    for name, df in (("train", train), ("test", test)):
        atomic_save(lambda tmp, df=df: df.to_parquet(tmp, index=False), out_dir / f"{name}.parquet")
    report = parse_report(train, test)
    report["images_downloaded_this_run"] = downloaded
    write_json(out_dir / "parse_report.json", report)
    for name in ("train", "test"):
        r = report[name]
        log.info("%s: %d rows, units %s, %d without Value, %d without Unit, %d unknown-unit rows, %d images missing",
                 name, r["rows"], dict(list(r["rows_per_unit"].items())[:8]), r["rows_without_value"],
                 r["rows_without_unit"], sum(r["unknown_units"].values()), r["images_missing"])
    meta = {"config": to_dict(cfg), "complete": True, "inputs": inputs,
            "rows": {"train": len(train), "test": len(test)},
            "fold_sizes": {str(k): int(v) for k, v in train["fold"].value_counts().sort_index().items()},
            "image_dir": str(root),
            "image_unusable_share": {name: share for name, (share, _) in images.items()},
            "image_unusable_reasons": {name: reasons for name, (_, reasons) in images.items()},
            "empty_catalog_content": empty}
    write_json(meta_path, meta)
    log.info("wrote %s", out_dir)
    return meta


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(PrepareConfig, profiles=PREPARE_PROFILES)))
