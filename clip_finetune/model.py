"""The CLIP image tower with a regression head on log1p(price), freezing, and WiSE-FT."""
from __future__ import annotations


import torch
import torch.nn as nn


def price_head(embed_dim: int, head_hidden: int) -> nn.Sequential:
    """Image vector -> log1p(price)."""
    return nn.Sequential(nn.Linear(embed_dim, head_hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(head_hidden, 1))


class ClipRegressor(nn.Module):
    def __init__(self, visual: nn.Module, embed_dim: int, head_hidden: int):
        super().__init__()
        self.visual = visual
        self.head = price_head(embed_dim, head_hidden)

    def forward(self, pixels):
        return self.head(self.visual(pixels).float()).squeeze(-1)


def tower_blocks(visual: nn.Module) -> list[nn.Module]:
    """Transformer blocks of an open_clip ViT or a timm trunk."""
    if hasattr(visual, "transformer"):
        return list(visual.transformer.resblocks)
    if hasattr(visual, "trunk") and hasattr(visual.trunk, "blocks"):
        return list(visual.trunk.blocks)
    raise ValueError(f"cannot find transformer blocks in {type(visual).__name__}")


def stem_parameters(visual: nn.Module) -> list[nn.Parameter]:
    """Patch embedding, class/position embeddings and pre-norm: what comes before the blocks."""
    if hasattr(visual, "transformer"):
        params = list(visual.conv1.parameters()) + list(visual.ln_pre.parameters())
        owner, names = visual, ("class_embedding", "positional_embedding")
    else:
        params = list(visual.trunk.patch_embed.parameters())
        owner, names = visual.trunk, ("cls_token", "reg_token", "pos_embed")
    return params + [getattr(owner, n) for n in names if isinstance(getattr(owner, n, None), nn.Parameter)]


def freeze(visual: nn.Module, n_blocks: int, norms: bool) -> int:
    """Freeze the stem and the first `n_blocks` blocks, and every LayerNorm if `norms`.
    Returns the number of backbone parameters left trainable."""
    blocks = tower_blocks(visual)
    if n_blocks > len(blocks):
        raise ValueError(f"freeze_blocks={n_blocks} but the image tower has {len(blocks)} blocks")
    for p in visual.parameters():
        p.requires_grad_(True)
    if n_blocks > 0:
        for p in stem_parameters(visual) + [p for b in blocks[:n_blocks] for p in b.parameters()]:
            p.requires_grad_(False)
    if norms:
        for m in visual.modules():
            if isinstance(m, nn.LayerNorm):
                for p in m.parameters():
                    p.requires_grad_(False)
    return sum(p.numel() for p in visual.parameters() if p.requires_grad)


@torch.no_grad()
def wise_ft(base_state: dict, tuned_state: dict, alpha: float) -> dict:
    """Weight-space interpolation: (1 - alpha) * base + alpha * fine-tuned, per tensor."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"wise_alpha must be in [0, 1], got {alpha}")
    out = {}
    for k, tuned in tuned_state.items():
        base = base_state[k]
        out[k] = (base.float() * (1 - alpha) + tuned.float() * alpha).to(tuned.dtype) if tuned.is_floating_point() else tuned
    return out

