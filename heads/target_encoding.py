"""Out-of-fold target encoding of the catalog's categorical fields: the brand (the leading words of
the item name), the unit and the pack size.

A field's encoding is the smoothed mean target of the rows that share the row's key,
(sum + m * global_mean) / (count + m), and the count is a second column. It follows the neighbour
features' fold rule: for the model scored on fold f, a training row of fold g is encoded from the
rows of the folds other than f and g (never its own price, never the scored fold's), and the scored
fold's rows from the folds other than f. The global mean is taken over the same rows, so a key no
such row shares gets exactly that mean.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from heads.features import pack_count

# brand1 / brand2: the first one / two words of the item name ("Bob's Red Mill ..." -> "bobs", "bobs red");
# on the real rows 78% of rows share their first word with another row, 45% their first two words
FIELDS = ("brand1", "brand2", "unit", "pack")

_APOSTROPHES = re.compile(r"['’`]")
_NOT_WORD = re.compile(r"[^\w]+")


def name_words(name: str) -> list[str]:
    """Lowercase words of a name with punctuation stripped; apostrophes join ("Joe's" -> "joes")."""
    return _NOT_WORD.sub(" ", _APOSTROPHES.sub("", str(name or "").lower())).split()


def category_keys(table: pd.DataFrame, fields=FIELDS) -> pd.DataFrame:
    """One string key per row and field; None where the catalog gives nothing (an empty name)."""
    unknown = [f for f in fields if f not in FIELDS]
    if unknown:
        raise ValueError(f"target encoding fields {unknown}: use any of {', '.join(FIELDS)}")
    names = table["item_name"].fillna("").astype(str)
    words = [name_words(n) for n in names]
    out = pd.DataFrame(index=range(len(table)))
    for field in fields:
        if field.startswith("brand"):
            n = int(field[len("brand"):])
            out[field] = pd.Series([" ".join(w[:n]) if len(w) >= n else None for w in words], dtype=object)
        elif field == "unit":
            out[field] = table["unit"].astype(str).to_numpy()
        else:  # pack
            out[field] = [str(int(pack_count(n))) for n in names]
    return out


@dataclass
class KeyStatistics:
    """One field's target sums and counts per key and fold over the train rows: all that encoding any
    row needs, a train row (under the fold rule) or a new one."""
    fold_ids: list[int]
    key_rows: dict  # key -> row of sums / counts
    sums: np.ndarray  # [n_keys + 1, n_folds]; the last row (all zeros) serves keys no train row has
    counts: np.ndarray
    fold_sum: np.ndarray  # [n_folds] the target summed over each fold's rows
    fold_count: np.ndarray

    def codes(self, keys) -> np.ndarray:
        """Row of each key in `sums`; the zero row for an unseen key, -1 for None (no key)."""
        unseen = len(self.sums) - 1
        return np.array([-1 if k is None or k != k else self.key_rows.get(k, unseen) for k in keys], dtype=np.int64)


def key_statistics(train_keys, target, folds) -> KeyStatistics:
    folds = np.asarray(folds, dtype=np.int64)
    target = np.asarray(target, dtype=np.float64)
    fold_ids = sorted(np.unique(folds).tolist())
    fold_index = np.searchsorted(fold_ids, folds)
    train_keys = pd.Series(list(train_keys), dtype=object)
    codes, uniques = pd.factorize(train_keys)
    n_keys, n_folds = len(uniques) + 1, len(fold_ids)
    keyed = codes >= 0
    sums, counts = np.zeros((n_keys, n_folds)), np.zeros((n_keys, n_folds))
    np.add.at(sums, (codes[keyed], fold_index[keyed]), target[keyed])
    np.add.at(counts, (codes[keyed], fold_index[keyed]), 1.0)
    fold_sum = np.bincount(fold_index, weights=target, minlength=n_folds)
    fold_count = np.bincount(fold_index, minlength=n_folds).astype(np.float64)
    return KeyStatistics(fold_ids, {k: i for i, k in enumerate(uniques.tolist())}, sums, counts, fold_sum, fold_count)


def encode(stats: KeyStatistics, codes: np.ndarray, leave_out: np.ndarray, m: float):
    """(smoothed mean, count) over the folds not in `leave_out` ([n, 2] fold positions per row). The
    kept folds' sums are added (not the left-out ones subtracted), so a left-out price cannot move a bit
    of it; NaN and 0 where a row has no key."""
    n_folds = len(stats.fold_ids)
    keep = np.ones((len(codes), n_folds))
    keep[np.arange(len(codes)), leave_out[:, 0]] = 0.0
    keep[np.arange(len(codes)), leave_out[:, 1]] = 0.0
    missing = codes == -1
    rows = np.where(missing, len(stats.sums) - 1, codes)
    s, c = (stats.sums[rows] * keep).sum(axis=1), (stats.counts[rows] * keep).sum(axis=1)
    global_mean = (keep * stats.fold_sum).sum(axis=1) / np.maximum((keep * stats.fold_count).sum(axis=1), 1.0)
    weight = c + m
    # m = 0 and no row with the key: the global mean
    mean = np.where(weight > 0, (s + m * global_mean) / np.where(weight > 0, weight, 1.0), global_mean)
    return np.where(missing, np.nan, mean), np.where(missing, 0.0, c)


def encode_train_rows(stats: KeyStatistics, train_keys, folds, fold_position: int, m: float):
    """The train rows' encoding for the model scored on fold `fold_ids[fold_position]`: each row from the
    folds other than that one and its own."""
    fold_index = np.searchsorted(stats.fold_ids, np.asarray(folds, dtype=np.int64))
    leave_out = np.stack([np.full(len(fold_index), fold_position), fold_index], axis=1)
    return encode(stats, stats.codes(train_keys), leave_out, m)


def encode_new_rows(stats: KeyStatistics, keys, fold_position: int, m: float):
    """New rows' encoding for the model scored on fold `fold_ids[fold_position]`: from every other fold,
    the rows that encode the scored fold's rows, so the model sees the distribution it was scored on."""
    codes = stats.codes(keys)
    return encode(stats, codes, np.full((len(codes), 2), fold_position), m)


def fit_statistics(train_keys: pd.DataFrame, targets: dict, folds) -> dict:
    """{tag: {field: KeyStatistics}} for every target ({tag: train values}) and field (column of keys)."""
    return {tag: {field: key_statistics(list(train_keys[field]), target, folds) for field in train_keys.columns}
            for tag, target in targets.items()}


def encoding_columns(statistics: dict, keys: pd.DataFrame, m: float, folds=None) -> list[dict]:
    """Per fold (sorted order): {column: values} for every target and field; columns are named
    `te_<field>` (mean), `te_<field>_count` and `<tag>_<field>` per extra target. `folds` given: the rows
    are the train rows (each also leaves its own fold out); None: new rows."""
    per_fold = None
    for tag, by_field in statistics.items():
        for field, stats in by_field.items():
            field_keys = list(keys[field])
            if per_fold is None:
                per_fold = [{} for _ in stats.fold_ids]
            for a, columns in enumerate(per_fold):
                if folds is None:
                    mean, count = encode_new_rows(stats, field_keys, a, m)
                else:
                    mean, count = encode_train_rows(stats, field_keys, folds, a, m)
                columns[f"{tag}_{field}"] = mean
                if tag == "te":  # the count does not depend on the target: one column per field
                    columns[f"te_{field}_count"] = count
    return per_fold or []
