"""The real default encoders, built at full size with random weights (nothing is downloaded) through
the code the stages use, each run forward and backward on two rows on the CPU, and the widths every
downstream stage reads: CLIP image 768, SigLIP image 1152 (and its text width), Qwen text 1024 + 3
structural features = 1027.

These are the slowest tests in the suite (about two minutes on 2 CPU cores, most of it building
the models): they are what shows the real defaults are wired, which the tiny models cannot."""
import gc
import tempfile

import pytest
import torch

from clip_finetune.config import ClipConfig
from clip_finetune.model import ClipRegressor, freeze, tower_blocks
from core.open_clip_models import image_size_of, load_open_clip
from core.tables import STRUCTURAL_FEATURES
from qwen3_finetune.config import QwenConfig
from qwen3_finetune.model import PriceRegressor, add_lora, collate, load_backbone
from siglip_extract.config import SiglipConfig

pytestmark = pytest.mark.slow

# Qwen3-Embedding-0.6B's config.json as published (architecture fields only), read the way a real
# run reads it, so legacy keys such as rope_theta go through transformers' own conversion
QWEN3_EMBEDDING_06B = {
    "model_type": "qwen3", "vocab_size": 151669, "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
    "rope_scaling": None, "tie_word_embeddings": True, "attention_bias": False, "use_sliding_window": False,
    "sliding_window": None, "max_window_layers": 28, "bos_token_id": 151643, "eos_token_id": 151643,
}


def test_clip_vit_l_14_image_tower_trains_and_gives_768():
    cfg = ClipConfig()
    assert (cfg.model, cfg.pretrained) == ("ViT-L-14", "openai")
    import open_clip

    # what pretrained=openai would bring besides the weights: CLIP's mean/std (not SigLIP's 0.5)
    assert open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained)["mean"][0] == pytest.approx(0.4815, abs=1e-4)
    torch.manual_seed(0)
    # the stage's loader, as a real run builds it for the tag (QuickGELU for openai), with random weights
    clip, _, _, _ = load_open_clip(cfg.model, cfg.pretrained, "cpu", load_weights=False)
    visual, size = clip.visual, image_size_of(clip.visual)
    del clip  # the stage keeps only the image tower
    assert size == 224 and len(tower_blocks(visual)) == 24
    assert all(type(block.mlp.gelu).__name__ == "QuickGELU" for block in tower_blocks(visual))
    # the stage's regressor and freezing: patch embedding, first 12 blocks and every norm fixed
    widths = []
    model = ClipRegressor(visual, 768, cfg.head_hidden)
    model.head.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[-1]))
    trainable = freeze(model.visual, cfg.freeze_blocks, cfg.freeze_norms)
    assert 0 < trainable < sum(p.numel() for p in model.visual.parameters())

    pred = model(torch.randn(2, 3, size, size))
    assert widths == [768] and pred.shape == (2,)  # the vector clip_image caches hold
    torch.nn.functional.l1_loss(pred, torch.tensor([2.0, 3.0])).backward()
    blocks = tower_blocks(model.visual)
    assert all(p.grad is None for p in blocks[cfg.freeze_blocks - 1].parameters())
    assert blocks[cfg.freeze_blocks].mlp.c_fc.weight.grad.abs().sum() > 0
    assert model.head[0].weight.grad.abs().sum() > 0


def test_siglip_so400m_gives_1152_image_and_its_text_width(monkeypatch):
    cfg = SiglipConfig()
    assert (cfg.model, cfg.pretrained) == ("ViT-SO400M-14-SigLIP-384", "webli")
    import open_clip

    model_cfg = open_clip.get_model_config(cfg.model)
    context_length = model_cfg["text_cfg"]["context_length"]
    preprocess = open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained)
    # what pretrained=webli brings besides the weights: mean/std 0.5 and squashing to 384 px
    assert preprocess["mean"] == (0.5, 0.5, 0.5) and preprocess["std"] == (0.5, 0.5, 0.5)
    assert preprocess["resize_mode"] == "squash" and context_length == 64
    # SigLIP's tokenizer is a Hugging Face download: stand in for it with ids of the right length
    vocab = model_cfg["text_cfg"]["vocab_size"]
    monkeypatch.setattr(open_clip, "get_tokenizer",
                        lambda *a, **k: lambda texts: torch.randint(0, vocab, (len(texts), context_length)))
    torch.manual_seed(0)
    model, _, _, tokenizer = load_open_clip(cfg.model, cfg.pretrained, "cpu", load_weights=False)  # random weights
    size = image_size_of(model.visual)
    assert size == 384
    assert len(model.visual.trunk.blocks) == 27 and len(model.text.transformer.resblocks) == 27
    # depth sets no width, and 27 blocks at 384 px take minutes on 2 cores: run the real stem, widths,
    # attention-pooling head and projections with two blocks per tower
    model.visual.trunk.blocks = model.visual.trunk.blocks[:2]
    model.text.transformer.resblocks = model.text.transformer.resblocks[:2]

    image = model.encode_image(torch.randn(2, 3, size, size))
    text = model.encode_text(tokenizer(["probe one", "probe two"]))
    assert image.shape == (2, 1152)  # siglip_image
    assert text.shape == (2, model_cfg["embed_dim"]) and text.shape[1] == 1152  # siglip_text, read from the model
    (image.pow(2).mean() + text.pow(2).mean()).backward()
    assert model.visual.trunk.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.visual.trunk.attn_pool.q.weight.grad.abs().sum() > 0  # the attention-pooling head is used
    assert model.text.token_embedding.weight.grad.abs().sum() > 0


def test_qwen3_embedding_06b_with_the_stage_lora_gives_1027():
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModel, Qwen3Config

    cfg = QwenConfig()
    config = Qwen3Config.from_dict(QWEN3_EMBEDDING_06B)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.intermediate_size, config.vocab_size) == (1024, 28, 16, 8, 128, 3072, 151669)
    assert config.tie_word_embeddings and config.max_position_embeddings == 32768
    assert config.rope_parameters["rope_theta"] == 1000000
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        AutoModel.from_config(config).to(torch.bfloat16).save_pretrained(folder)  # bf16 on disk: half the bytes to write
        gc.collect()
        # the stage's loader (fp32 on CPU: 4-bit loading and training of 0.6B add about a minute here) and its LoRA
        backbone = load_backbone(folder, "none", torch.device("cpu"), cfg.gradient_checkpointing)
    assert backbone.config.hidden_size == 1024 and len(backbone.layers) == 28
    linear_names = {name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, torch.nn.Linear)}
    unmatched = set(cfg.lora_targets) - linear_names
    assert not unmatched, f"lora_targets {sorted(unmatched)} match no linear layer of Qwen3 ({sorted(linear_names)})"
    assert linear_names == set(cfg.lora_targets)  # the default adapts every linear layer of the decoder
    backbone = add_lora(backbone, cfg)
    adapted = {name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == set(cfg.lora_targets)
    assert sum(isinstance(m, LoraLayer) for m in backbone.modules()) == 28 * len(cfg.lora_targets)
    model = PriceRegressor(backbone, backbone.config.hidden_size, cfg.head_hidden, cfg.pooling)
    model.train()

    # two rows of different lengths, left-padded as the stage pads them
    ids, mask = collate([list(range(1000, 1012)), [151643, 7, 99, 151000, 42]], [0, 1], 151643, torch.device("cpu"))
    features = torch.randn(2, len(STRUCTURAL_FEATURES))
    vector = model.embed(ids, mask, features)
    assert vector.shape == (2, 1027)  # qwen_text: the pooled 1024-d vector + 3 structural features
    assert torch.equal(vector[:, 1024:], features)
    pred = model.head(vector).squeeze(-1)
    torch.nn.functional.l1_loss(pred, torch.tensor([2.0, 3.0])).backward()
    lora_grads = [p.grad for n, p in backbone.named_parameters() if "lora_B" in n]
    assert len(lora_grads) == 28 * len(cfg.lora_targets) and all(g is not None for g in lora_grads)
    assert sum(float(g.abs().sum()) for g in lora_grads) > 0
    assert all(p.grad is None for n, p in backbone.named_parameters() if "lora_" not in n)  # the base stays frozen
