"""Loading open_clip models (CLIP and SigLIP) by name or from a local folder, and tiny ones for tests.

A real run names a model and a pretrained tag (`ViT-L-14` + `openai`, `ViT-SO400M-14-SigLIP-384`
+ `webli`); open_clip fetches the weights into its cache, and the model is built with what the
tag was trained with (QuickGELU for OpenAI's weights, the tag's mean/std, interpolation and
resize mode). Without the internet, pass a folder instead: it holds `open_clip_config.json`
({"model_cfg": ..., "preprocess_cfg": ...}; `model_cfg` says `"quick_gelu": true` for weights
trained with QuickGELU), the weights as `open_clip_model.safetensors` and, for models with a
Hugging Face tokenizer, its files. `save_open_clip_folder` writes such a folder and records the
activation the model was built with; the tiny test models go through it and are loaded by the
same `load_open_clip` a real run uses.
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


def trained_settings(model: str, pretrained: str) -> dict:
    """What the weights of (model, tag) were trained with, from open_clip's pretrained table: the
    activation (`quick_gelu`), mean/std, interpolation and resize mode. open_clip's model configs
    leave QuickGELU out (`ViT-L-14`), so building by name alone puts GELU under OpenAI's weights."""
    import open_clip

    tag = open_clip.get_pretrained_cfg(model, pretrained)
    if not tag:
        return {}
    return {"quick_gelu": bool(tag.get("quick_gelu", False)), "mean": tuple(tag["mean"]), "std": tuple(tag["std"]),
            "interpolation": tag["interpolation"], "resize_mode": tag["resize_mode"]}


def builds_quick_gelu(model: torch.nn.Module) -> bool:
    """Whether an open_clip model's transformer blocks use QuickGELU."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


def load_open_clip(model: str, pretrained: str | None, device="cpu", load_weights: bool = True,
                   setting: str = "clip.model"):
    """(model, train transform, eval transform, tokenizer) for a name + tag or a local folder.

    A name + tag is built with the activation and preprocessing the tag's weights were trained with
    (`trained_settings`); a model whose config contradicts its tag is refused. `load_weights=False`
    builds the same model and transforms with random weights (tests). A failed download is a
    PipelineError naming the model, the tag and `setting`, the key that takes a local folder instead."""
    import open_clip

    from core.errors import PipelineError

    ident = model_id(model)
    if ident.startswith("local-dir:"):
        clip, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(ident, device=device)
        return clip, preprocess_train, preprocess_eval, open_clip.get_tokenizer(ident)
    offline = f"give {setting}=/path/to/folder (model= for the stage's own script), a local folder saved as " \
              f"core/open_clip_models.py describes"
    model_cfg = open_clip.get_model_config(model)
    if model_cfg is None:
        raise PipelineError(f"{setting}={model!r} is neither an open_clip model name nor a folder; {offline}")
    if not pretrained:  # random weights in the model config's own architecture
        clip, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(model, device=device)
        return clip, preprocess_train, preprocess_eval, _tokenizer(model, pretrained, offline)
    settings = trained_settings(model, pretrained)
    if not settings:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise PipelineError(f"open_clip model {model!r} has no pretrained tag {pretrained!r} (its tags: {tags}); {offline}")
    if model_cfg.get("quick_gelu", False) and not settings["quick_gelu"]:
        raise PipelineError(f"open_clip model {model!r} builds QuickGELU but its tag {pretrained!r} was trained with "
                            f"GELU; name the model without '-quickgelu'")
    checkpoint = None
    if load_weights:
        try:
            checkpoint = open_clip.pretrained.download_pretrained(open_clip.get_pretrained_cfg(model, pretrained))
        except Exception as exc:  # no network, hub errors, a bad cache: all end the same way for the user
            raise PipelineError(f"cannot download open_clip weights {model!r} tag {pretrained!r} "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {offline}") from None
        if not checkpoint:
            raise PipelineError(f"open_clip has no download for {model!r} tag {pretrained!r}; {offline}")
    # the downloaded file, not the tag, goes to open_clip: the tag's settings are applied here, once
    clip, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(
        model, pretrained=checkpoint, device=device, force_quick_gelu=settings["quick_gelu"],
        image_mean=settings["mean"], image_std=settings["std"], image_interpolation=settings["interpolation"],
        image_resize_mode=settings["resize_mode"])
    return clip, preprocess_train, preprocess_eval, _tokenizer(model, pretrained, offline)


def _tokenizer(model: str, pretrained: str | None, offline: str):
    """open_clip's tokenizer for a built-in name; SigLIP's is a Hugging Face download."""
    import open_clip

    from core.errors import PipelineError

    try:
        return open_clip.get_tokenizer(model)
    except OSError as exc:
        raise PipelineError(f"cannot download the tokenizer of open_clip model {model!r} tag {pretrained!r} "
                            f"({type(exc).__name__}); {offline}") from None


def save_open_clip_folder(model: torch.nn.Module, model_cfg: dict, preprocess_cfg: dict, folder: Path,
                          hf_tokenizer=None) -> Path:
    """Save `model` as a local folder. The activation it was built with is recorded in the config
    (`quick_gelu`), so the folder loads back into the same computation."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    model_cfg = {**model_cfg, "quick_gelu": builds_quick_gelu(model)}
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
