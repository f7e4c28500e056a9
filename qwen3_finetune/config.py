"""QLoRA fine-tuning of Qwen3-Embedding as a price regressor with three structural features.
Edit the defaults here or override any field as key=value."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass
class QwenConfig:
    model: str = "Qwen/Qwen3-Embedding-0.6B"  # Hugging Face name, or a local folder
    finetune: bool = True  # false: keep the encoder frozen; training steps aside, extraction reads the base model
    data_dir: Path = Path("checkpoints/data")
    out_dir: Path = Path("checkpoints/qwen3_finetune")  # run folder: out_dir/run_name
    run_name: str = "qwen3_embedding_0.6b"
    # input and pooling
    max_length: int = 512  # tokens; batches are padded only to their longest row
    pooling: str = "last"  # last (what Qwen3-Embedding was trained for, with left padding) | mean
    # adapters
    # 4bit: QLoRA, NF4 + double quantisation, bf16 compute: for a card of under ~24 GB. none: plain LoRA on the
    # bf16 model. On a card with >= 40 GB choose none: 0.6B parameters in bf16 are ~1.2 GB, so 4-bit saves
    # nothing that matters there, while every 4-bit layer dequantises its weights at each matmul (slower)
    # and k-bit preparation can even use more memory. Take the freed memory as speed too, with the same 64
    # rows per optimizer step and no recompute:
    #   qwen.quantization=none qwen.gradient_checkpointing=false qwen.batch_size=64 qwen.grad_accum=1
    # (no `qwen.` prefix for python -m qwen3_finetune.train). `python -m bench.qwen_train` measures both
    # modes' tokens/s and memory on the card at hand (BENCHMARKS.md).
    quantization: str = "4bit"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"])
    gradient_checkpointing: bool = True  # recompute activations in backward: less memory, ~30% more compute
    head_hidden: int = 256  # regression head on [pooled vector, 3 standardised structural features]
    # loss, in log1p(price) space
    loss: str = "huber_smape"  # the seed's Huber + SMAPE; or weighted_smape | smape | l1 | mse | focal_smape
    l1_warmup_epochs: int = 0
    # optimisation
    epochs: int = 3
    batch_size: int = 16  # per GPU, per step; 64 with grad_accum=1 on a large card (see quantization)
    grad_accum: int = 4  # optimizer step every grad_accum batches
    lr: float = 2e-4  # LoRA adapters
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05  # of all optimizer steps, then cosine to 0
    grad_clip: float = 1.0
    early_stopping_patience: int = 2  # epochs without a better selection-slice SMAPE
    selection_fraction: float = 0.1  # share of the training folds that chooses the checkpoint; the holdout fold stays unseen
    # holdout: one encoder, trained outside the data stage's holdout fold (fusion and the ensemble then score that
    # fold only). all: one encoder per fold (k fine-tunes, k times the cost): each train row's vector and text-head
    # prediction come from the encoder that never saw its fold, test rows average the k encoders
    encoder_folds: str = "holdout"
    eval_batch_size: int = 64
    seed: int = 42
    device: str = "cuda"  # real sizes need a GPU: no CUDA is an error, not days on the CPU; cpu | auto | cuda:N
    precision: str = "auto"  # bf16 autocast on CUDA
    resume: bool = True
    predictions_dir: Path = Path("checkpoints/predictions")  # the text head's predictions (core.predictions)
    # extraction (python -m qwen3_finetune.extract_embeddings)
    split: str = "both"  # train | test | both
    embeddings_dir: Path = Path("checkpoints/embeddings")
    source_name: str = "qwen_text"
    chunk_size: int = 4096
    storage_dtype: str = "float16"


CONFIG = QwenConfig()
PROFILES = {
    "default": CONFIG,
    # a tiny Qwen3 with a locally trained tokenizer on the demo catalog; 4-bit runs on CPU too
    "tiny": replace(CONFIG, model="checkpoints/demo/models/qwen3_tiny", data_dir=Path("checkpoints/demo/data"),
                    out_dir=Path("checkpoints/demo/qwen3_finetune"), run_name="tiny",
                    embeddings_dir=Path("checkpoints/demo/embeddings"), predictions_dir=Path("checkpoints/demo/predictions"),
                    max_length=128, lora_r=8, lora_alpha=16,
                    gradient_checkpointing=False, head_hidden=64, epochs=6, batch_size=32, grad_accum=1,
                    lr=3e-3, head_lr=3e-3, warmup_ratio=0.1, early_stopping_patience=3, chunk_size=512,
                    device="auto"),
    # real pretrained weights on a CPU: all-MiniLM-L6-v2 (384-d, mean pooling, BERT module names), frozen by
    # default (fine-tuning it costs about 16 minutes an epoch on 2 cores; finetune=true switches it on)
    "small": replace(CONFIG, model="sentence-transformers/all-MiniLM-L6-v2", finetune=False, pooling="mean",
                     quantization="none", lora_targets=["query", "key", "value", "dense"], max_length=256, lora_dropout=0.0,
                     gradient_checkpointing=False, head_hidden=128, epochs=1, batch_size=32, grad_accum=1,
                     lr=5e-4, head_lr=1e-3, eval_batch_size=64, early_stopping_patience=1, chunk_size=2048,
                     run_name="minilm_l6", data_dir=Path("checkpoints/small/data"),
                     out_dir=Path("checkpoints/small/qwen3_finetune"), embeddings_dir=Path("checkpoints/small/embeddings"),
                     predictions_dir=Path("checkpoints/small/predictions"), device="auto"),
}
