"""The fields every fusion model shares. Each model's own `config.py` (fusion/all_embeddings,
fusion/qwen_clip) holds the instance a user edits, and its tiny profile. Importing this imports no
torch: the pipeline checks every setting before any stage loads a model."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from core.config import ConfigError
from core.metrics import PRICE_BIN_EDGES, TIER_WEIGHTS

MODELS = ("all_embeddings", "qwen_clip")  # each a folder fusion/<model>/ with a config.py
DEFAULT_THRESHOLDS = PRICE_BIN_EDGES  # the loss's price tiers are the report's price bins
DEFAULT_TIER_WEIGHTS = TIER_WEIGHTS


@dataclass
class FusionConfig:
    # where things are
    run_name: str = "all_embeddings"  # run folder: out_dir/run_name
    data_dir: Path = Path("checkpoints/data")  # processed tables from data.prepare (the split lives here)
    embeddings_dir: Path = Path("checkpoints/embeddings")  # caches: embeddings_dir/<source>/<split>/
    out_dir: Path = Path("checkpoints/fusion")
    predictions_dir: Path = Path("checkpoints/predictions")  # shared predictions (core.predictions): <dir>/<run_name>/
    sources: list[str] = field(default_factory=lambda: ["clip_image", "siglip_image", "siglip_text", "qwen_text"])
    # sources written once per fold model as <name>_fold<k> (the heads' out-of-fold target encodings):
    # the model scored on fold k reads its own, so no row's features carry that fold's prices
    fold_sources: list[str] = field(default_factory=list)
    # model: modality and width of each source come from its cache, never from here
    architecture: str = "hierarchical"  # hierarchical (all_embeddings) | block (one block from fusion.blocks)
    block: str = "concat_mlp"  # used when architecture=block
    use_advanced_model: bool = True  # hierarchical: cross-attention + MoE; false: concat + MLP head
    hidden_dim: int = 512  # branch output width
    n_tokens: int = 4  # hierarchical and block=bi_cross_attention: each source vector is split into this many tokens
    n_heads: int = 8
    n_experts: int = 3
    expert_dims: list[int] = field(default_factory=lambda: [1024, 512, 256])
    # MoE router (fusion.blocks.Router): Switch-style balance loss n * sum(routed share * mean gate), 1 when
    # balanced. At the seed's 0.01 the gate collapsed onto one expert on real rows; at 0.1 one expert of the
    # seed's widths (hidden 512) still got no row; 0.3 holds every expert above 10%. 0 turns it off
    load_balance_weight: float = 0.3
    router_z_weight: float = 1e-3  # ST-MoE router z-loss: keeps gate logits small so the softmax never saturates
    router_top_k: int = 0  # 0: every expert weighs in (soft gate); k >= 2: each row uses its top k experts only
    energy_weight: float = 0.1  # energy_aware block: weight of the energy-budget penalty
    energy_budget: float = 1.5  # energy_aware block: expected cost allowed per sample
    dropout: float = 0.25
    # loss, in log1p(price) space
    loss: str = "weighted_smape"  # weighted_smape | smape | focal_smape | huber_smape | l1 | mse
    price_thresholds: list[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS))  # tier edges, $
    tier_weights: list[float] = field(default_factory=lambda: list(DEFAULT_TIER_WEIGHTS))  # one per tier, cheapest first
    l1_warmup_epochs: int = 3  # L1 on log price first: SMAPE's gradient vanishes on large errors
    # optimisation
    batch_size: int = 256
    epochs: int = 1000  # upper bound; early stopping ends runs long before
    lr: float = 1e-3
    weight_decay: float = 1e-4
    plateau_patience: int = 5  # ReduceLROnPlateau on validation SMAPE
    plateau_factor: float = 0.5
    early_stopping_patience: int = 30
    grad_clip: float = 1.0
    folds: str = "holdout"  # holdout: train on the other folds, validate on data's holdout fold; all: k-fold + out-of-fold predictions
    # which rows judge the epochs (early stopping, LR plateau, best checkpoint). inner: a seeded slice of the
    # training folds, so the scored fold is predicted once, at the end; scored_fold: the scored fold itself
    # (optimistic: its score is a best-of-epochs on the rows it is scored on), kept for comparison
    selection: str = "inner"
    selection_fraction: float = 0.1  # inner: share of the training folds' rows held out to judge epochs
    encoder_unseen_folds: list[int] | None = None  # folds no upstream encoder trained on; None: all (frozen encoders)
    seed: int = 42
    device: str = "cuda"  # real sizes want a GPU: no CUDA stops the run before any work; cpu | auto | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA) | fp16 | fp32
    resume: bool = True  # continue an interrupted run with the same config; a finished fold is skipped


def tiny_profile(cfg: FusionConfig, **changes) -> FusionConfig:
    """The demo and test profile of a model: the demo's folders, small widths, few epochs."""
    return replace(cfg, data_dir=Path("checkpoints/demo/data"), embeddings_dir=Path("checkpoints/demo/embeddings"),
                   out_dir=Path("checkpoints/demo/fusion"), predictions_dir=Path("checkpoints/demo/predictions"),
                   hidden_dim=64, n_heads=4, batch_size=128, epochs=60, early_stopping_patience=12, dropout=0.1,
                   device="auto", **changes)


def small_profile(cfg: FusionConfig, **changes) -> FusionConfig:
    """Real rows on a CPU (`profile=small`, ~7k train rows): every fold trained, so the ensemble gets
    out-of-fold predictions; widths sized for thousands of rows, not the seed's 75k; the heads'
    price-free tabular cache (structure, text counts, TF-IDF SVD) as one more source.

    hidden_dim and dropout were chosen by `python -m bench.fusion_small` on the 6,915 real rows
    (frozen MiniLM + text_tabular, concat-MLP, fold 0 scored, epochs chosen on the inner slice):
    SMAPE 60.18 at 256/0.3 against 60.87-62.48 for the other points of 64/128/256 x 0.1/0.3; on all
    five folds, out of fold, 256/0.3 gives 59.02 against 59.87 for the earlier 128/0.2. Epochs are
    chosen per fold by early stopping on the inner slice (best epochs 10-29 there), under a cap of 80."""
    changes.setdefault("sources", [*cfg.sources, "text_tabular"])
    return replace(cfg, data_dir=Path("checkpoints/small/data"), embeddings_dir=Path("checkpoints/small/embeddings"),
                   out_dir=Path("checkpoints/small/fusion"), predictions_dir=Path("checkpoints/small/predictions"),
                   folds="all", hidden_dim=256, n_heads=4, batch_size=128, epochs=80, early_stopping_patience=10,
                   plateau_patience=3, dropout=0.3, device="auto", **changes)


def model_profiles(model: str) -> dict:
    """The profiles of fusion model `model` (fusion/<model>/config.py)."""
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    return importlib.import_module(f"fusion.{model}.config").PROFILES
