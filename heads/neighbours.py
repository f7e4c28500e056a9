"""Nearest neighbours by cosine similarity, batched top-k in torch, and the fold rule that keeps
every row's own price and its scored fold's prices out of its neighbour features.

`nearest` takes dense vectors (torch matmul + top-k on L2-normalised rows, chunked over queries so
memory stays bounded at 75k x 75k; on CUDA when asked) or scipy sparse rows (exact cosine on the full
sparse vectors: kept for small catalogs, as its cost grows with the square of the rows at a large
constant). The heads search the TF-IDF in its dense SVD space (heads.config.tfidf_neighbour_dims).
Candidates are limited by boolean masks, and a query never matches a candidate in its own group (its
own fold), so it never sees itself. The search is exact: every similarity is computed once, and the
masks are applied per block of candidates (one block per fold), never by a pass per mask.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

NO_NEIGHBOUR = -1  # index given where fewer than k candidates are allowed


def l2_normalise(vectors):
    """Rows scaled to unit length (zero rows stay zero); dense or scipy sparse."""
    if sp.issparse(vectors):
        vectors = sp.csr_matrix(vectors, dtype=np.float32)
        norms = np.sqrt(np.asarray(vectors.multiply(vectors).sum(axis=1)).ravel())
        return sp.diags(1.0 / np.maximum(norms, 1e-12)).dot(vectors).tocsr().astype(np.float32)
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def nearest(queries, candidates, k: int, allowed, query_groups=None, candidate_groups=None,
            device: str = "cpu", chunk_size: int = 1024, torch_sparse: bool | None = None):
    """The k most cosine-similar allowed candidates of each query, for each of M candidate masks.

    allowed: bool [n_candidates] or [M, n_candidates]; one similarity pass serves every mask.
    query_groups / candidate_groups: ints; a candidate in the query's own group is never returned
    (use the fold, and -1 for queries outside every group such as test rows).
    Returns (indices int64 [M, n_queries, k], similarities float32 [M, n_queries, k]), best first;
    missing neighbours have index -1 and similarity NaN. A 1-D `allowed` gives [n_queries, k] arrays.
    torch_sparse: sparse rows multiplied in torch (default on CUDA) rather than scipy.

    The candidates are cut into blocks that every mask takes whole or leaves whole (for fold masks:
    one block per fold); each block's top k is found once per query chunk, and each mask's top k is
    the best of its blocks' top k. No pass over the similarities is made per mask.
    """
    allowed = np.asarray(allowed, dtype=bool)
    single = allowed.ndim == 1
    allowed = np.atleast_2d(allowed)
    n_queries, n_candidates = queries.shape[0], candidates.shape[0]
    if allowed.shape[1] != n_candidates:
        raise ValueError(f"allowed has {allowed.shape[1]} columns for {n_candidates} candidates")
    query_groups = np.full(n_queries, -1, np.int64) if query_groups is None else np.asarray(query_groups, np.int64)
    candidate_groups = (np.full(n_candidates, -2, np.int64) if candidate_groups is None
                        else np.asarray(candidate_groups, np.int64))
    blocks = candidate_blocks(allowed, candidate_groups)
    order = np.concatenate([b.members for b in blocks]) if blocks else np.zeros(0, np.int64)
    sparse = sp.issparse(queries)
    queries, candidates = l2_normalise(queries), l2_normalise(candidates[order])
    dev = torch.device(device)
    torch_sparse = sparse and (dev.type == "cuda" if torch_sparse is None else torch_sparse)
    if not sparse:
        candidates_t = torch.from_numpy(candidates).to(dev)
    elif torch_sparse:
        # sparse candidates x dense query chunk on the GPU; the chunk is capped at ~1 GB of dense rows
        candidates_t = _torch_csr(candidates).to(dev)
        chunk_size = max(1, min(chunk_size, 2**28 // max(1, candidates.shape[1])))
    else:
        candidates_t = candidates.T.tocsr()
    order_t = torch.from_numpy(order).to(dev)
    indices = np.full((len(allowed), n_queries, k), NO_NEIGHBOUR, dtype=np.int64)
    sims = np.full((len(allowed), n_queries, k), np.nan, dtype=np.float32)
    # queries go group by group, so a block of the queries' own group is simply passed over
    query_chunks = [rows[i:i + chunk_size] for g in np.unique(query_groups)
                    for rows in [np.flatnonzero(query_groups == g)] for i in range(0, len(rows), chunk_size)]
    for rows in query_chunks if blocks else []:
        if torch_sparse:
            chunk = torch.from_numpy(queries[rows].toarray()).to(dev)
            block = (candidates_t @ chunk.T).T
        elif sparse:
            block = torch.from_numpy((queries[rows] @ candidates_t).toarray()).to(dev)
        else:
            block = torch.from_numpy(queries[rows]).to(dev) @ candidates_t.T
        group = query_groups[rows[0]]
        tops = {}  # block position -> (similarities, positions in `order`) [chunk, <= k]
        for i, b in enumerate(blocks):
            if b.group != group:
                top_sims, top_pos = torch.topk(block[:, b.start:b.stop], min(k, b.stop - b.start), dim=1)
                tops[i] = (top_sims, top_pos + b.start)
        for m in range(len(allowed)):
            taken = [tops[i] for i, b in enumerate(blocks) if b.allowed[m] and i in tops]
            if not taken:
                continue
            all_sims = torch.cat([t[0] for t in taken], dim=1)
            all_pos = torch.cat([t[1] for t in taken], dim=1)
            top_sims, at = torch.topk(all_sims, min(k, all_sims.shape[1]), dim=1)
            top_idx = order_t[all_pos.gather(1, at)]
            valid = torch.isfinite(top_sims)
            take = top_sims.shape[1]
            indices[m, rows, :take] = torch.where(valid, top_idx, NO_NEIGHBOUR).cpu().numpy()
            sims[m, rows, :take] = torch.where(valid, top_sims, float("nan")).cpu().numpy()
    return (indices[0], sims[0]) if single else (indices, sims)


@dataclass
class CandidateBlock:
    """Candidates that every mask takes or leaves together and that share a group; a contiguous slice
    [start, stop) of the reordered candidates."""
    members: np.ndarray  # candidate indices
    allowed: np.ndarray  # [M] whether each mask takes the block
    group: int
    start: int = 0
    stop: int = 0


def candidate_blocks(allowed: np.ndarray, candidate_groups: np.ndarray) -> list[CandidateBlock]:
    """The candidates any mask allows, cut into blocks by (which masks allow them, their group)."""
    keys = np.concatenate([allowed.T.astype(np.int64), candidate_groups[:, None]], axis=1)
    kept = np.flatnonzero(allowed.any(axis=0))
    if not len(kept):
        return []
    unique, inverse = np.unique(keys[kept], axis=0, return_inverse=True)
    blocks, start = [], 0
    for b, key in enumerate(unique):
        members = kept[inverse.ravel() == b]
        blocks.append(CandidateBlock(members, key[:-1].astype(bool), int(key[-1]), start, start + len(members)))
        start += len(members)
    return blocks


def _torch_csr(matrix: sp.csr_matrix):
    matrix = matrix.sorted_indices()  # torch's CSR needs sorted column indices per row
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.from_numpy(matrix.indptr.astype(np.int64)),
                                       torch.from_numpy(matrix.indices.astype(np.int64)),
                                       torch.from_numpy(matrix.data.astype(np.float32)), size=matrix.shape,
                                       check_invariants=True)  # scipy's CSR is valid; checked once, cheap


@dataclass
class FoldNeighbours:
    """Neighbours for the model scored on one fold: train rows of that fold search every other fold;
    train rows of another fold g search the folds other than g and the scored one; test rows search
    every fold but the scored one."""
    fold: int
    train_indices: np.ndarray  # [n_train, k] into the train rows
    train_similarities: np.ndarray
    test_indices: np.ndarray  # [n_test, k]
    test_similarities: np.ndarray


def fold_masks(folds, fold_ids, train_present) -> np.ndarray:
    """[n_folds, n_train]: the train rows the model scored on each fold may take as neighbours."""
    return np.stack([(folds != f) & train_present for f in fold_ids])


def train_neighbours(train_vectors, folds, k: int, train_present=None, device: str = "cpu", chunk_size: int = 1024):
    """Each train row's neighbours for every fold model (indices, similarities [n_folds, n_train, k]):
    never its own fold nor the scored one. A row without a vector has none and is none."""
    folds = np.asarray(folds, dtype=np.int64)
    fold_ids = sorted(np.unique(folds).tolist())
    train_present = np.ones(len(folds), bool) if train_present is None else np.asarray(train_present, bool)
    indices, similarities = nearest(train_vectors, train_vectors, k, fold_masks(folds, fold_ids, train_present),
                                    query_groups=folds, candidate_groups=folds, device=device, chunk_size=chunk_size)
    indices[:, ~train_present], similarities[:, ~train_present] = NO_NEIGHBOUR, np.nan
    return indices, similarities


def row_neighbours(row_vectors, train_vectors, folds, k: int, train_present=None, row_present=None,
                   device: str = "cpu", chunk_size: int = 1024):
    """Neighbours of new rows (not train rows) for every fold model (indices, similarities
    [n_folds, n_rows, k]): the train rows of every fold but the scored one. Each row's result depends
    on that row alone."""
    folds = np.asarray(folds, dtype=np.int64)
    fold_ids = sorted(np.unique(folds).tolist())
    train_present = np.ones(len(folds), bool) if train_present is None else np.asarray(train_present, bool)
    n_rows = row_vectors.shape[0]
    row_present = np.ones(n_rows, bool) if row_present is None else np.asarray(row_present, bool)
    indices, similarities = nearest(row_vectors, train_vectors, k, fold_masks(folds, fold_ids, train_present),
                                    device=device, chunk_size=chunk_size)
    indices[:, ~row_present], similarities[:, ~row_present] = NO_NEIGHBOUR, np.nan
    return indices, similarities


def fold_neighbours(train_vectors, test_vectors, folds, k: int, train_present=None, test_present=None,
                    device: str = "cpu", chunk_size: int = 1024) -> list[FoldNeighbours]:
    """One FoldNeighbours per fold (in sorted fold order). Rows whose vector is missing
    (present=False) are never neighbours, and get no neighbours themselves."""
    fold_ids = sorted(np.unique(np.asarray(folds, dtype=np.int64)).tolist())
    train_idx, train_sim = train_neighbours(train_vectors, folds, k, train_present, device, chunk_size)
    test_idx, test_sim = row_neighbours(test_vectors, train_vectors, folds, k, train_present, test_present, device,
                                        chunk_size)
    return [FoldNeighbours(f, train_idx[m], train_sim[m], test_idx[m], test_sim[m]) for m, f in enumerate(fold_ids)]


def neighbour_price_features(indices: np.ndarray, similarities: np.ndarray, log_price: np.ndarray,
                             eps: float = 0.05) -> dict[str, np.ndarray]:
    """Price summaries of each row's neighbours (NaN where a row has none): the nearest one's log
    price, mean, median, std and distance-weighted mean log price, nearest and mean distance."""
    valid = indices != NO_NEIGHBOUR
    prices = np.where(valid, np.asarray(log_price, dtype=np.float64)[np.where(valid, indices, 0)], np.nan)
    distance = np.where(valid, 1.0 - similarities.astype(np.float64), np.nan)
    weights = np.where(valid, 1.0 / (np.maximum(distance, 0.0) + eps), 0.0)
    has_any = valid.any(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (no neighbour) give NaN on purpose
        weighted = np.where(has_any, np.nansum(weights * np.nan_to_num(prices), axis=1) / weights.sum(axis=1), np.nan)
        return {
            "nn1_log_price": prices[:, 0],
            "mean_log_price": np.nanmean(prices, axis=1),
            "median_log_price": np.nanmedian(prices, axis=1),
            "std_log_price": np.nanstd(prices, axis=1),
            "weighted_log_price": weighted,
            "nearest_distance": distance[:, 0],
            "mean_distance": np.nanmean(distance, axis=1),
        }
