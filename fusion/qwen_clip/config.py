"""The two-source baseline: CLIP image + Qwen text, a branch each, concatenated, MLP head.
Edit these defaults, or override any field: python -m fusion.train model=qwen_clip block=gated"""
from dataclasses import replace
from pathlib import Path

from fusion.config import FusionConfig

CONFIG = FusionConfig(
    run_name="qwen_clip",
    sources=["clip_image", "qwen_text"],
    architecture="block",
    block="concat_mlp",
    hidden_dim=512,
    loss="weighted_smape",
    batch_size=256,
    lr=1e-3,
    dropout=0.25,
    early_stopping_patience=30,
)

PROFILES = {
    "default": CONFIG,
    "tiny": replace(CONFIG, data_dir=Path("checkpoints/demo/data"), embeddings_dir=Path("checkpoints/demo/embeddings"),
                    out_dir=Path("checkpoints/demo/fusion"), hidden_dim=64, n_heads=4,
                    batch_size=128, epochs=60, early_stopping_patience=12, dropout=0.1),
}
