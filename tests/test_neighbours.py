"""The neighbour search is exact: on a small catalog it returns the very neighbours a brute-force numpy
search finds under the fold rule (a train row never meets its own fold nor the scored one; a new row
never meets the scored fold), in the TF-IDF's dense SVD space as in a cache's space."""
import numpy as np
import pytest

from heads.features import TfidfText, fit_svd, project
from heads.config import profile
from heads.neighbours import NO_NEIGHBOUR, candidate_blocks, row_neighbours, train_neighbours
from test_heads import planted_tables


def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def brute_force(queries, candidates, k, allowed):
    """Per query row, the k allowed candidates of highest cosine, best first (numpy, no torch)."""
    sims = unit(queries.astype(np.float64)) @ unit(candidates.astype(np.float64)).T
    sims[~allowed] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def check_against_brute_force(train, new, folds, present, k):
    fold_ids = sorted(np.unique(folds))
    train_idx, train_sim = train_neighbours(train, folds, k, present, chunk_size=37)
    new_idx, new_sim = row_neighbours(new, train, folds, k, present, chunk_size=37)
    for m, f in enumerate(fold_ids):
        allowed = (folds[None, :] != f) & (folds[None, :] != folds[:, None]) & present[None, :]
        expected, expected_sim = brute_force(train, train, k, allowed)
        np.testing.assert_array_equal(train_idx[m][present], expected[present])
        np.testing.assert_allclose(train_sim[m][present], expected_sim[present], atol=1e-5)
        assert (train_idx[m][~present] == NO_NEIGHBOUR).all()  # a row without a vector gets none
        allowed = np.broadcast_to((folds != f) & present, (len(new), len(train)))
        expected, expected_sim = brute_force(new, train, k, allowed)
        np.testing.assert_array_equal(new_idx[m], expected)
        np.testing.assert_allclose(new_sim[m], expected_sim, atol=1e-5)


def test_search_in_a_cache_space_matches_brute_force():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(500, 24)).astype(np.float32)
    new = rng.normal(size=(90, 24)).astype(np.float32)
    folds = rng.permutation(np.arange(500) % 5)
    check_against_brute_force(train, new, folds, rng.random(500) > 0.1, k=7)


def test_search_in_the_tfidf_svd_space_matches_brute_force():
    train_df, test_df = planted_tables(n_train=400, n_test=60)
    text = TfidfText(profile("tiny"))
    train_tfidf = text.fit_transform(train_df.text)
    svd = fit_svd(train_tfidf, 64, 0)
    train, new = project(svd, train_tfidf), project(svd, text.transform(test_df.text))
    assert train.shape == (400, 64)
    # planted text repeats words, so exact ties happen: compare where the k-th and (k+1)-th similarity differ
    check_against_brute_force(train + np.random.default_rng(1).normal(0, 1e-3, train.shape).astype(np.float32),
                              new, train_df.fold.to_numpy(), np.ones(400, bool), k=5)


@pytest.mark.parametrize("n_masks", [1, 3])
def test_candidate_blocks_are_what_every_mask_takes_whole(n_masks):
    rng = np.random.default_rng(2)
    allowed = rng.random((n_masks, 200)) < 0.6
    groups = rng.integers(0, 4, 200)
    blocks = candidate_blocks(allowed, groups)
    members = np.concatenate([b.members for b in blocks])
    assert sorted(members) == list(np.flatnonzero(allowed.any(axis=0)))  # each allowed candidate once
    for b in blocks:
        assert b.stop - b.start == len(b.members)
        assert (groups[b.members] == b.group).all()
        assert (allowed[:, b.members] == b.allowed[:, None]).all()
