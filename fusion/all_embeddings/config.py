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
    "small": small_profile(CONFIG, expert_dims=[256, 128]),
    "tiny": tiny_profile(CONFIG, expert_dims=[128, 64]),
}
