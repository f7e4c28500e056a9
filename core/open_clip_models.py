"""Loading open_clip models (CLIP and SigLIP) by name or from a local folder, and tiny ones for tests.

A real run names a model and a pretrained tag (`ViT-L-14` + `openai`, `ViT-SO400M-14-SigLIP-384`
+ `webli`); open_clip fetches the weights into its cache. Without the internet, pass a folder
instead: it holds `open_clip_config.json` ({"model_cfg": ..., "preprocess_cfg": ...}), the
weights as `open_clip_model.safetensors` and, for models with a Hugging Face tokenizer, its
files. `save_open_clip_folder` writes such a folder; the tiny test models go through it and are
loaded by the same `load_open_clip` a real run uses.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_VISION = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32}
TINY_CONFIGS = {
    # a CLIP: native ViT image tower, CLIP's bundled BPE tokenizer
    "clip": ({"embed_dim": 32, "vision_cfg": TINY_VISION,
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
             {"mean": [0.4815, 0.4578, 0.4082], "std": [0.2686, 0.2613, 0.2758]}),
    # a SigLIP: sigmoid-loss model, text padded to 64 tokens, last-token pooling, mean/std 0.5
    "siglip": ({"embed_dim": 48, "init_logit_bias": -10, "custom_text": True, "vision_cfg": TINY_VISION,
                "text_cfg": {"context_length": 64, "vocab_size": 0, "hf_tokenizer_name": "local",
                             "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 32, "heads": 2, "layers": 1,
                             "no_causal_mask": True, "proj_bias": True, "pool_type": "last"}},
               {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "squash"}),
}


def model_id(model: str) -> str:
    """A folder becomes open_clip's `local-dir:` identifier; anything else is a built-in name."""
    return f"local-dir:{Path(model).resolve()}" if Path(model).is_dir() else model


def image_size_of(visual) -> int:
    """Input side length of an open_clip image tower (native ViT or timm)."""
    size = getattr(visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def load_open_clip(model: str, pretrained: str | None, device="cpu"):
    """(model, train transform, eval transform, tokenizer) for a name + tag or a local folder."""
    import open_clip

    ident = model_id(model)
    tag = None if ident.startswith("local-dir:") else (pretrained or None)
    clip, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(ident, pretrained=tag, device=device)
    return clip, preprocess_train, preprocess_eval, open_clip.get_tokenizer(ident)


def save_open_clip_folder(model: torch.nn.Module, model_cfg: dict, preprocess_cfg: dict, folder: Path,
                          hf_tokenizer=None) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
    if hf_tokenizer is not None:
        hf_tokenizer.save_pretrained(folder)
    return folder


def train_tiny_tokenizer(corpus, vocab_size: int = 2000):
    """A small WordPiece tokenizer built in-process from `corpus` (no downloads). The vocabulary is
    chosen here, not by the library's trainer, so the same corpus gives the same ids in every process:
    special tokens, every character and its continuation form, then whole words by frequency."""
    import re
    import unicodedata
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    counts = Counter(w for text in corpus for w in re.findall(r"\w+|[^\w\s]", unicodedata.normalize("NFKC", text).lower()))
    chars = sorted({c for word in counts for c in word})
    vocab = specials + chars + [f"##{c}" for c in chars]
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    vocab += words[: max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")


def make_tiny_open_clip(folder: Path, kind: str, corpus=None, seed: int = 0) -> Path:
    """Build a tiny `kind` ('clip' or 'siglip') model with random weights and save it as a folder."""
    import open_clip

    model_cfg, preprocess_cfg = json.loads(json.dumps(TINY_CONFIGS[kind]))
    preprocess_cfg["size"] = model_cfg["vision_cfg"]["image_size"]
    tokenizer = None
    if kind == "siglip":
        tokenizer = train_tiny_tokenizer(corpus or ["a tiny corpus"], vocab_size=1000)
        model_cfg["text_cfg"]["vocab_size"] = len(tokenizer)
        model_cfg["text_cfg"]["pad_id"] = tokenizer.pad_token_id
    torch.manual_seed(seed)
    if kind == "siglip":
        model = open_clip.CustomTextCLIP(**{k: v for k, v in model_cfg.items() if k != "custom_text"})
    else:
        model = open_clip.CLIP(**model_cfg)
    return save_open_clip_folder(model, model_cfg, preprocess_cfg, folder, tokenizer)
