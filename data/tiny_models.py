"""Build the tiny models the demo and tests use (random weights, tokenizers trained in-process).

    python -m data.tiny_models out_dir=checkpoints/demo/models data_dir=checkpoints/demo/data

Writes clip_tiny/, siglip_tiny/ (open_clip folders) and qwen3_tiny/ (a Hugging Face Qwen3 folder
with its tokenizer). Each is loaded by the same code a real run uses for a real model folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.config import parse_args
from core.errors import run_cli
from core.io import read_json, write_json
from core.tables import load_table

TINY_QWEN3 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rope_theta=10000.0)


def make_tiny_qwen3(folder: Path, corpus, seed: int = 0) -> Path:
    """A 2-layer Qwen3 with a WordPiece tokenizer trained on `corpus`, padding on the left."""
    import torch
    from transformers import AutoModel, Qwen3Config

    from core.open_clip_models import train_tiny_tokenizer

    folder = Path(folder)
    tokenizer = train_tiny_tokenizer(corpus, vocab_size=2000)
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **TINY_QWEN3)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass
class TinyModelsConfig:
    out_dir: Path = Path("checkpoints/demo/models")
    data_dir: Path = Path("checkpoints/demo/data")  # texts the tokenizers are trained on
    seed: int = 0


def main(cfg: TinyModelsConfig) -> Path:
    from core.open_clip_models import make_tiny_open_clip  # torch: imported only when models are built

    marker = Path(cfg.out_dir) / "tiny_models.json"
    if marker.exists() and read_json(marker) == {"seed": cfg.seed, "data_dir": str(cfg.data_dir)}:
        print(f"{cfg.out_dir}: tiny models already built")
        return Path(cfg.out_dir)
    texts = load_table(cfg.data_dir, "train")["text"].tolist()
    make_tiny_open_clip(Path(cfg.out_dir) / "clip_tiny", "clip", seed=cfg.seed)
    make_tiny_open_clip(Path(cfg.out_dir) / "siglip_tiny", "siglip", corpus=texts, seed=cfg.seed)
    make_tiny_qwen3(Path(cfg.out_dir) / "qwen3_tiny", texts, seed=cfg.seed)
    write_json(marker, {"seed": cfg.seed, "data_dir": str(cfg.data_dir)})
    print(f"wrote tiny models to {cfg.out_dir}")
    return Path(cfg.out_dir)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(TinyModelsConfig)))
