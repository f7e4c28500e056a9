"""SigLIP image and text embeddings. Edit the defaults here or override any field as key=value."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


@dataclass
class SiglipConfig:
    model: str = "ViT-SO400M-14-SigLIP-384"  # open_clip name, or a local folder (core/open_clip_models.py)
    pretrained: str = "webli"  # open_clip pretrained tag; ignored for a local folder
    data_dir: Path = Path("checkpoints/data")  # processed tables from data.prepare
    embeddings_dir: Path = Path("checkpoints/embeddings")  # writes <embeddings_dir>/<source>/<split>/
    split: str = "both"  # train | test | both
    image_source: str = "siglip_image"  # cache names fusion reads
    text_source: str = "siglip_text"
    text_column: str = "text"  # processed-table column the text tower reads (truncated to 64 tokens)
    batch_size: int = 256  # images per forward pass
    text_batch_size: int = 1024
    num_workers: int = 8  # image-decoding worker processes
    chunk_size: int = 4096  # rows per resumable chunk
    storage_dtype: str = "float16"  # float16 halves the cache; fusion reads it as float32
    device: str = "cuda"  # real sizes need a GPU: no CUDA is an error, not days on the CPU; cpu | auto | cuda:N
    precision: str = "auto"  # bf16 autocast on CUDA


CONFIG = SiglipConfig()
PROFILES = {
    "default": CONFIG,
    "small": replace(CONFIG, device="auto"),  # profile=small: the pipeline skips SigLIP; run by hand, any device
    "tiny": replace(CONFIG, model="checkpoints/demo/models/siglip_tiny", data_dir=Path("checkpoints/demo/data"),
                    embeddings_dir=Path("checkpoints/demo/embeddings"), batch_size=64, num_workers=2, chunk_size=512,
                    device="auto"),
}
