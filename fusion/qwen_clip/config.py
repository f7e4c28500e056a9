"""The two-source baseline: CLIP image + Qwen text, a branch each, concatenated, MLP head.
Edit these defaults, or override any field: python -m fusion.train model=qwen_clip block=gated"""
from fusion.config import FusionConfig, small_profile, tiny_profile

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
    # its own two sources only (no text_tabular): all_embeddings already trains this block on the vectors
    # plus the tabular source, so in profile=small (no images) this is the text encoder's vectors alone
    "small": small_profile(CONFIG, sources=list(CONFIG.sources)),
    "tiny": tiny_profile(CONFIG),
}
