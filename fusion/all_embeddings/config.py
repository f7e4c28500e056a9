"""The best model (seeds 000/001): four sources, hierarchical cross-attention, mixture of experts.
Edit these defaults, or override any field: python -m fusion.train model=all_embeddings lr=5e-4"""
from fusion.config import FusionConfig, small_profile, tiny_profile

CONFIG = FusionConfig(
    run_name="all_embeddings",
    sources=["clip_image", "siglip_image", "siglip_text", "qwen_text"],
    architecture="hierarchical",
    hidden_dim=512,
    n_tokens=4,
    n_heads=8,
    n_experts=3,
    expert_dims=[1024, 512, 256],
    loss="weighted_smape",
    batch_size=256,
    lr=1e-3,
    dropout=0.25,
    early_stopping_patience=30,
)

PROFILES = {
    "default": CONFIG,
    # On the real rows (frozen MiniLM + text_tabular, 5 folds, out of fold) the hierarchical model, with
    # its gate fixed (every expert 15-55% of each fold's rows), scores 60.20-60.54 over three settings
    # (128/0.2 with balance weight 0.1 or 0.3, 256/0.3), against 59.87 (128/0.2) and 59.02 (256/0.3)
    # for the concat-MLP block on the same sources. On ~5,500 training rows and two sources the
    # cross-attention and the experts add parameters, not signal: it overfits within a few epochs
    # (best epochs mostly 2-14; concat-MLP's 10-29). So profile=small trains the concat-MLP block
    # here; architecture=hierarchical brings the seed's model back (its experts scaled to [2h, h]).
    "small": small_profile(CONFIG, architecture="block", block="concat_mlp", expert_dims=[512, 256],
                           fold_sources=["text_target_encoding"]),
    "tiny": tiny_profile(CONFIG, expert_dims=[128, 64], fold_sources=["text_target_encoding"]),
}
