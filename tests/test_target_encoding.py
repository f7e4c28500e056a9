"""Out-of-fold target encoding: the values match a brute-force count under the fold rule, a row's
features never move with its own price nor the scored fold's prices, and a key seen once encodes
to the global mean of the rows allowed to feed it."""
from collections import namedtuple

import numpy as np
import pandas as pd
import pytest

from heads.target_encoding import (category_keys, encode_new_rows, encode_train_rows, encoding_columns, fit_statistics,
                                   key_statistics, name_words)


FoldEncoding = namedtuple("FoldEncoding", "fold train_mean train_count test_mean test_count")


def fold_target_encoding(train_keys, test_keys, target, folds, m):
    """Per fold model (sorted folds): (fold, train means, train counts, test means, test counts)."""
    stats = key_statistics(list(train_keys), target, folds)
    return [FoldEncoding(f, *encode_train_rows(stats, list(train_keys), folds, a, m),
                         *encode_new_rows(stats, list(test_keys), a, m)) for a, f in enumerate(stats.fold_ids)]


def keyed_rows(n=300, n_keys=12, seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.choice([f"k{i}" for i in range(n_keys)], n).astype(object)
    keys[::17] = None  # rows without a key (an empty item name)
    target = rng.normal(3.0, 1.0, n)
    folds = rng.permutation(np.arange(n) % 5)
    test_keys = np.array(["k0", "k3", "never_seen", None, "k11"], dtype=object)
    return keys, test_keys, target, folds


def brute_force(keys, target, allowed_rows, key, m):
    """Smoothed mean of `key` over the allowed rows, the global mean taken over the same rows (and the
    global mean itself where no row holds the key and m is 0)."""
    global_mean = target[allowed_rows].mean()
    same = allowed_rows & (keys == key)
    if same.sum() + m == 0:
        return global_mean, 0
    return (target[same].sum() + m * global_mean) / (same.sum() + m), same.sum()


def test_name_words_and_keys_normalise_the_brand():
    assert name_words("Trader Joe's Dark-Chocolate, 14 oz.") == ["trader", "joes", "dark", "chocolate", "14", "oz"]
    assert name_words("BOB’S RED MILL") == ["bobs", "red", "mill"]
    table = pd.DataFrame({"item_name": ["Bob's Red Mill Oats (Pack of 4)", "bobs red mill flour", "", "Goya"],
                          "unit": ["ounce", "ounce", "none", "count"]})
    keys = category_keys(table)
    assert keys["brand1"].tolist() == ["bobs", "bobs", None, "goya"]
    assert keys["brand2"].tolist() == ["bobs red", "bobs red", None, None]
    assert keys["unit"].tolist() == ["ounce", "ounce", "none", "count"]
    assert keys["pack"].tolist() == ["4", "1", "1", "1"]
    with pytest.raises(ValueError, match="brand3"):
        category_keys(table, ["brand3"])


@pytest.mark.parametrize("m", [0.0, 5.0])
def test_encoding_equals_a_brute_force_count_under_the_fold_rule(m):
    keys, test_keys, target, folds = keyed_rows()
    encodings = fold_target_encoding(keys, test_keys, target, folds, m)
    assert [e.fold for e in encodings] == [0, 1, 2, 3, 4]
    for enc in encodings:
        f = enc.fold
        for i in range(0, len(keys), 7):
            if keys[i] is None:
                assert np.isnan(enc.train_mean[i]) and enc.train_count[i] == 0
                continue
            # the scored fold's rows read the other folds; a training row of fold g also loses fold g
            allowed = (folds != f) & (folds != folds[i])
            mean, count = brute_force(keys, target, allowed, keys[i], m)
            assert enc.train_mean[i] == pytest.approx(mean) and enc.train_count[i] == count
        for j, key in enumerate(test_keys):
            if key is None:
                assert np.isnan(enc.test_mean[j])
                continue
            # test rows read exactly the rows the scored fold reads
            mean, count = brute_force(keys, target, folds != f, key, m)
            assert enc.test_mean[j] == pytest.approx(mean) and enc.test_count[j] == count


def test_a_row_never_reads_its_own_price_nor_the_scored_fold():
    keys, test_keys, target, folds = keyed_rows()
    before = fold_target_encoding(keys, test_keys, target, folds, 3.0)
    for enc in before:
        f = enc.fold
        for g in range(5):
            # prices of folds f and g moved wildly: model f's features of fold g's rows must not move
            moved = target.copy()
            moved[(folds == f) | (folds == g)] += np.random.default_rng(g).normal(0, 50, ((folds == f) | (folds == g)).sum())
            after = fold_target_encoding(keys, test_keys, moved, folds, 3.0)[f]
            rows = folds == g
            np.testing.assert_array_equal(after.train_mean[rows], enc.train_mean[rows])
            if g == f:
                np.testing.assert_array_equal(after.test_mean, enc.test_mean)
            else:
                # control: the same change does reach the rows of the other folds (the test has teeth)
                others = ~((folds == f) | (folds == g)) & pd.notna(keys)
                assert not np.allclose(after.train_mean[others], enc.train_mean[others])


def test_a_key_seen_once_encodes_to_the_global_mean_of_the_other_rows():
    rng = np.random.default_rng(3)
    n = 200
    keys = np.array([f"brand{i}" for i in range(n)], dtype=object)  # every key once
    target = rng.uniform(0, 6, n)
    folds = np.arange(n) % 5
    m = 10.0
    for enc in fold_target_encoding(keys, keys[:10], target, folds, m):
        f = enc.fold
        for i in range(n):
            others = (folds != f) & (folds != folds[i])
            assert enc.train_mean[i] == pytest.approx(target[others].mean())
            assert enc.train_count[i] == 0
        # the one test key that matches a train row outside fold f sees that row's price, smoothed
        for j in range(10):
            if folds[j] == f:
                assert enc.test_mean[j] == pytest.approx(target[folds != f].mean())
            else:
                expected = (target[j] + m * target[folds != f].mean()) / (1 + m)
                assert enc.test_mean[j] == pytest.approx(expected) and enc.test_count[j] == 1


def test_columns_hold_every_field_and_target_with_one_count_each():
    keys, test_keys, target, folds = keyed_rows(n=100)
    train_keys = pd.DataFrame({"brand1": keys, "unit": "ounce"})
    test_frame = pd.DataFrame({"brand1": test_keys, "unit": "ounce"})
    statistics = fit_statistics(train_keys, {"te": target, "teq": target - 1.0}, folds)
    per_fold = encoding_columns(statistics, train_keys, 2.0, folds)
    assert len(per_fold) == 5
    train_cols, test_cols = per_fold[0], encoding_columns(statistics, test_frame, 2.0)[0]
    assert sorted(train_cols) == sorted(test_cols) == sorted(
        ["te_brand1", "te_brand1_count", "teq_brand1", "te_unit", "te_unit_count", "teq_unit"])
    # shifting the target by a constant shifts the encoding by the same constant
    np.testing.assert_allclose(train_cols["teq_brand1"], train_cols["te_brand1"] - 1.0)
