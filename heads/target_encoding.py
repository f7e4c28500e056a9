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
class FoldEncoding:
    """One field's encoding for the model scored on `fold`."""
    fold: int
    train_mean: np.ndarray  # [n_train] smoothed mean target
    train_count: np.ndarray  # [n_train] rows behind it
    test_mean: np.ndarray  # [n_test]
    test_count: np.ndarray


def fold_target_encoding(train_keys, test_keys, target, folds, m: float) -> list[FoldEncoding]:
    """One FoldEncoding per fold (sorted fold order) under the fold rule in the module docstring.
    Keys that are None get NaN (no encoding) and count 0. Test rows are encoded from the folds other
    than f, the same rows that encode the scored fold's rows, so the model's test features have the
    scored fold's distribution."""
    folds = np.asarray(folds, dtype=np.int64)
    target = np.asarray(target, dtype=np.float64)
    fold_ids = sorted(np.unique(folds).tolist())
    fold_index = np.searchsorted(fold_ids, folds)
    train_keys, test_keys = pd.Series(list(train_keys), dtype=object), pd.Series(list(test_keys), dtype=object)
    codes, uniques = pd.factorize(pd.concat([train_keys, test_keys], ignore_index=True))
    train_codes, test_codes = codes[:len(train_keys)], codes[len(train_keys):]
    n_keys, n_folds = len(uniques) + 1, len(fold_ids)  # last row: missing keys (code -1)
    sums, counts = np.zeros((n_keys, n_folds)), np.zeros((n_keys, n_folds))
    np.add.at(sums, (train_codes, fold_index), target)
    np.add.at(counts, (train_codes, fold_index), 1.0)
    fold_sum = np.bincount(fold_index, weights=target, minlength=n_folds)
    fold_count = np.bincount(fold_index, minlength=n_folds).astype(np.float64)

    def encode(codes, leave_out):
        """Smoothed mean over the folds not in `leave_out` ([n, 2] fold indices per row). The kept folds'
        sums are added (not the left-out ones subtracted), so a left-out price cannot move a bit of it."""
        keep = np.ones((len(codes), n_folds))
        keep[np.arange(len(codes)), leave_out[:, 0]] = 0.0
        keep[np.arange(len(codes)), leave_out[:, 1]] = 0.0
        s, c = (sums[codes] * keep).sum(axis=1), (counts[codes] * keep).sum(axis=1)
        global_mean = (keep * fold_sum).sum(axis=1) / np.maximum((keep * fold_count).sum(axis=1), 1.0)
        weight = c + m
        # m = 0 and no row with the key: the global mean
        mean = np.where(weight > 0, (s + m * global_mean) / np.where(weight > 0, weight, 1.0), global_mean)
        missing = codes == -1
        return np.where(missing, np.nan, mean), np.where(missing, 0.0, c)

    result = []
    for a, f in enumerate(fold_ids):
        train_mean, train_count = encode(train_codes, np.stack([np.full(len(folds), a), fold_index], axis=1))
        test_mean, test_count = encode(test_codes, np.full((len(test_codes), 2), a))
        result.append(FoldEncoding(f, train_mean, train_count, test_mean, test_count))
    return result


def target_encoding_columns(train_keys: pd.DataFrame, test_keys: pd.DataFrame, targets: dict, folds,
                            m: float) -> list[tuple[dict, dict]]:
    """Per fold (sorted order): ({column: train values}, {column: test values}) for every field and
    target; columns are named `te_<field>` (mean), `te_<field>_count` and `<tag>_<field>` per extra target."""
    per_fold = None
    for tag, target in targets.items():
        for field in train_keys.columns:
            encodings = fold_target_encoding(train_keys[field], test_keys[field], target, folds, m)
            if per_fold is None:
                per_fold = [({}, {}) for _ in encodings]
            for (train_cols, test_cols), enc in zip(per_fold, encodings):
                train_cols[f"{tag}_{field}"], test_cols[f"{tag}_{field}"] = enc.train_mean, enc.test_mean
                if tag == "te":  # the count does not depend on the target: one column per field
                    train_cols[f"te_{field}_count"], test_cols[f"te_{field}_count"] = enc.train_count, enc.test_count
    return per_fold or []
