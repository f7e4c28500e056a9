"""Settings for the classical heads. Edit the defaults here or override any field as key=value."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

# ridge, knn and lgbm in two target variants: log price, and `<head>_per_qty` (log price per unit of quantity, the
# quantity added back); lgbm_no_te is lgbm without the target encodings, to show what they add; mlp is a network on
# lgbm's columns, trained on SMAPE of the price; mlp_dist the same network predicting a distribution over price bins
HEADS = ("ridge", "ridge_per_qty", "knn", "knn_per_qty", "lgbm", "lgbm_per_qty", "lgbm_no_te", "mlp", "mlp_dist")
DEFAULT_HEADS = ("ridge", "ridge_per_qty", "knn", "knn_per_qty", "lgbm", "lgbm_per_qty", "mlp", "mlp_dist")


@dataclass
class HeadsConfig:
    # where things are
    data_dir: Path = Path("checkpoints/data")  # processed tables from data.prepare (the folds live here)
    embeddings_dir: Path = Path("checkpoints/embeddings")  # caches: embeddings_dir/<source>/<split>/
    predictions_dir: Path = Path("checkpoints/predictions")  # each head writes predictions_dir/<head>/
    out_dir: Path = Path("checkpoints/heads")  # the fitted run (fold models, vectorizers, ...) heads.predict reads
    heads: list[str] = field(default_factory=lambda: list(DEFAULT_HEADS))  # which of HEADS to train
    # caches used as LightGBM inputs and neighbour spaces; a missing or skipped one is left out with a log line
    embedding_sources: list[str] = field(default_factory=lambda: ["qwen_text", "siglip_text", "clip_image", "siglip_image"])
    # sources whose encoder was fine-tuned on the non-holdout folds: their out-of-fold rows there are optimistic
    finetuned_sources: list[str] = field(default_factory=lambda: ["qwen_text", "clip_image"])
    # TF-IDF, fitted on the train rows' text (no prices)
    word_max_features: int = 200_000  # word 1-2-grams
    char_max_features: int = 300_000  # char_wb 2-5-grams
    min_df: int = 2
    # ridge head
    ridge_alpha: float = 1.0
    # knn head: distance-weighted mean log price of the k nearest rows
    knn_k: int = 10
    knn_space: str = "tfidf"  # tfidf (cosine in the TF-IDF's space below) or one of embedding_sources
    # the TF-IDF space of every neighbour search: the first this many components of the TF-IDF's SVD (the tabular
    # cache's fit; dense, exact top-k: 75,000 x 75,000 rows is ~3 TFLOP); 0: exact cosine on the full sparse TF-IDF,
    # which grows with the square of the rows at a large constant (~70 CPU-minutes per pass at 75,000). Real rows,
    # out of fold: knn 61.92 -> 62.26 in the 256-d space (its blend weight was 0), lgbm 54.67 -> 54.70, and the
    # ensemble's nested CV 53.00 -> 53.08 (BENCHMARKS.md)
    tfidf_neighbour_dims: int = 256
    distance_eps: float = 0.05  # neighbour weight is 1 / (cosine distance + eps)
    # LightGBM head features
    tfidf_svd_dims: int = 128  # TruncatedSVD of the TF-IDF, fitted on the train rows only
    embedding_svd_dims: int = 64  # TruncatedSVD of each cache (fitted on train rows); 0 keeps no projection
    neighbour_k: int = 20  # neighbours behind the price features, in TF-IDF space and in each cache
    # ridge predictions as features (inner out-of-fold, same rule as the neighbours): "text" is the ridge head on
    # the whole text (column ridge_log_price); "name" a ridge on the item name's TF-IDF alone (name_ridge_log_price),
    # which the whole text's long bullets dilute (real rows, 5-fold OOF: lgbm 54.96 -> 54.67 with it)
    ridge_features: list[str] = field(default_factory=lambda: ["text", "name"])
    # out-of-fold target encoding (same fold rule as the neighbours) of these fields: brand1 / brand2 (the
    # item name's first one / two words), unit, pack (the pack count the name states); lgbm_no_te has none
    target_encoding_fields: list[str] = field(default_factory=lambda: ["brand1", "brand2", "unit", "pack"])
    target_encoding_m: float = 10.0  # smoothing: (sum + m * global mean) / (count + m)
    # LightGBM head model: fixed rounds, no early stopping on the scored fold. At 75,000 rows: 2,000 rounds at 0.02 and
    # 63 leaves (small keeps 800 at 0.03 and 31 leaves for its 2-core runs of 6,915 rows); ten times the rows carry
    # the larger trees. A fit costs about rows x rounds: ~10 s per fold on the real rows (5,500 fitting rows, 800
    # rounds, one thread), so ~5 CPU-minutes per fold at 60,000 (bench.scale: lgbm_per_qty's five folds took 463 s on
    # 2 cores at 30,000 rows, exponent 0.3-0.6 in the rows); the lgbm heads fit their folds n_jobs at once
    lgbm_objective: str = "l1"  # l1 | huber | regression (L2), on log price; l1 beat huber on the real rows (CV)
    lgbm_huber_delta: float = 1.0  # huber: quadratic within this many log units
    lgbm_rounds: int = 2000
    lgbm_learning_rate: float = 0.02
    lgbm_num_leaves: int = 63
    lgbm_min_child_samples: int = 20
    lgbm_feature_fraction: float = 0.5
    lgbm_bagging_fraction: float = 0.8
    lgbm_lambda_l2: float = 1.0
    # threads per LightGBM fit; 0: the n_jobs cores shared among the folds fitted at once (2 cores: two folds of
    # one thread each; 16: five folds of three). deterministic=True gives the same trees for any thread count
    lgbm_threads: int = 0
    # mlp head: lgbm's columns (quantile-mapped) -> hidden -> hidden / 2 -> log1p price, SiLU, AdamW with a one-cycle
    # learning rate, SMAPE of the price as the loss; fixed epochs, no early stopping; mlp_seeds networks averaged.
    # Settings: the best of about fifteen tried on the real rows (BENCHMARKS.md). At 75,000 rows they stay: no
    # full-size prices to retune on, and the cost is steps (rows / batch x epochs x seeds), linear in the rows; on a
    # GPU the networks train there, on CPU every (fold, seed) network is a task of its own across n_jobs cores
    # (bench.scale: 425 s per network head on 2 cores at 30,000 rows, exponent 0.99; ~18 min each at 75,000)
    mlp_hidden: int = 512
    mlp_dropout: float = 0.3
    mlp_epochs: int = 20
    mlp_batch_size: int = 128
    mlp_learning_rate: float = 3e-3  # the one-cycle peak
    mlp_weight_decay: float = 1e-2
    mlp_seeds: int = 6  # twelve seeds scored the same as six on the real rows; fewer would be the first saving
    # mlp_dist head: the same network and training with one output per bin of log price (bins of equal row counts
    # on the fitting rows), cross-entropy against labels spread over neighbouring bins by a gaussian of width
    # mlp_bin_sigma bins; priced at the median of the predicted distribution
    mlp_bins: int = 40
    mlp_bin_sigma: float = 1.0
    # a cache of the price-free columns (structure, text counts, TF-IDF SVD) for fusion's tabular source;
    # empty: none
    tabular_source: str = "text_tabular"
    tabular_svd_dims: int = 256
    # per fold model k, a cache <name>_fold<k> of the target encodings (te_* means and counts) under the
    # lgbm heads' fold rule, for fusion's `fold_sources`; empty: none (needs an lgbm head with encodings)
    target_encoding_source: str = "text_target_encoding"
    # runtime
    # cores for the folds, ridge fits and network seeds run at once; 0: every core this process has (small once
    # pinned LightGBM to one thread so that 2 cores did not fight; the folds now share the cores instead)
    n_jobs: int = 0
    chunk_size: int = 2048  # query rows per similarity block (memory: chunk_size x n_train floats)
    device: str = "auto"  # auto | cpu | cuda: where the neighbour search runs
    seed: int = 42


PROFILES = {
    "default": HeadsConfig(),
    # real folders, settings for a 2-core CPU: ~7k train rows in a few minutes
    "small": HeadsConfig(heads=list(HEADS), word_max_features=100_000, char_max_features=150_000, lgbm_rounds=800,
                         lgbm_learning_rate=0.03, lgbm_num_leaves=31, chunk_size=1024,
                         out_dir=Path("checkpoints/small/heads")),
    # the demo's folders and tiny settings, for the demo and tests
    "tiny": HeadsConfig(heads=list(HEADS), data_dir=Path("checkpoints/demo/data"), embeddings_dir=Path("checkpoints/demo/embeddings"),
                        tabular_svd_dims=32, tfidf_neighbour_dims=32,
                        predictions_dir=Path("checkpoints/demo/predictions"), out_dir=Path("checkpoints/demo/heads"),
                        word_max_features=20_000,
                        char_max_features=20_000, tfidf_svd_dims=16, embedding_svd_dims=8, knn_k=5, neighbour_k=5,
                        lgbm_rounds=150, lgbm_learning_rate=0.08, lgbm_num_leaves=15, lgbm_min_child_samples=10,
                        mlp_hidden=64, mlp_epochs=10, mlp_seeds=2, chunk_size=512, device="cpu"),
}


def profile(name: str, **changes) -> HeadsConfig:
    return replace(PROFILES[name], **changes)
