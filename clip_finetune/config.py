"""CLIP fine-tuning on product images (regression head on log price) and image-embedding extraction.
Edit the defaults here or override any field as key=value."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


@dataclass
class ClipConfig:
    model: str = "ViT-L-14"  # open_clip name, or a local folder (core/open_clip_models.py)
    pretrained: str = "openai"  # open_clip pretrained tag; ignored for a local folder
    data_dir: Path = Path("checkpoints/data")
    out_dir: Path = Path("checkpoints/clip_finetune")  # run folder: out_dir/run_name
    run_name: str = "vit_l_14"
    # training
    loss: str = "weighted_smape"  # weighted_smape | huber_smape | l1 | smape | focal_smape | mse (log1p price)
    l1_warmup_epochs: int = 1  # L1 on log price first: SMAPE's gradient vanishes on large errors
    epochs: int = 10
    batch_size: int = 64  # per GPU
    lr_backbone: float = 1e-5  # far below the head's: CLIP features degrade easily
    lr_head: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 500  # linear warmup, then cosine to 0
    freeze_blocks: int = 12  # freeze the patch embedding and the first N transformer blocks (ViT-L-14 has 24)
    freeze_norms: bool = True  # keep every LayerNorm of the image tower fixed
    head_hidden: int = 512
    grad_clip: float = 1.0
    early_stopping_patience: int = 3  # epochs without a better SMAPE on the selection slice
    selection_fraction: float = 0.1  # share of the training folds that chooses the checkpoint; the holdout fold stays unseen
    # holdout: one encoder, trained outside the data stage's holdout fold (fusion and the ensemble then score that
    # fold only). all: one encoder per fold (k fine-tunes, k times the cost): each train row's vector and image-head
    # prediction come from the encoder that never saw its fold, test rows average the k encoders
    encoder_folds: str = "holdout"
    num_workers: int = 8  # image-decoding worker processes
    seed: int = 42
    device: str = "cuda"  # real sizes need a GPU: no CUDA is an error, not days on the CPU; cpu | auto | cuda:N
    precision: str = "auto"  # bf16 autocast on CUDA
    resume: bool = True
    predictions_dir: Path = Path("checkpoints/predictions")  # the head's holdout and test predictions (core.predictions)
    # extraction (python -m clip_finetune.extract_embeddings)
    split: str = "both"  # train | test | both
    use_finetuned: bool = True  # false: the base model's image vectors
    wise_alpha: float = 1.0  # WiSE-FT: backbone = (1 - a) * base + a * fine-tuned
    embeddings_dir: Path = Path("checkpoints/embeddings")
    source_name: str = "clip_image"
    extract_batch_size: int = 256
    chunk_size: int = 4096
    storage_dtype: str = "float16"


CONFIG = ClipConfig()
PROFILES = {
    "default": CONFIG,
    # real rows on a CPU (profile=small): the real model where it runs, on whatever device there is
    "small": replace(CONFIG, device="auto"),
    # random-init tiny ViT on the demo catalog: the whole tower trains at the head's rate, on L1
    "tiny": replace(CONFIG, model="checkpoints/demo/models/clip_tiny", data_dir=Path("checkpoints/demo/data"),
                    out_dir=Path("checkpoints/demo/clip_finetune"), run_name="tiny",
                    embeddings_dir=Path("checkpoints/demo/embeddings"),
                    predictions_dir=Path("checkpoints/demo/predictions"), loss="l1", epochs=25, batch_size=32,
                    lr_backbone=1e-3, lr_head=3e-3, warmup_steps=20, freeze_blocks=0, freeze_norms=False,
                    head_hidden=64, num_workers=2, early_stopping_patience=8, extract_batch_size=128, chunk_size=512,
                    device="auto"),
}
