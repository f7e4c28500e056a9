"""Fusion regressors over cached embeddings. Both predict log1p(price) and return (pred, aux_loss).

- `BlockFusionModel`: a branch per source, one block from `fusion.blocks`, an MLP head. The
  `qwen_clip` baseline and the block comparison use it. `bi_cross_attention` splits each source
  into `n_tokens` tokens, like the hierarchical model.
- `HierarchicalFusionModel` (`all_embeddings`, seeds 000/001): a branch per source, then
  image-image, text-text and image-text cross-attention, the feature-preserving concatenation and
  a mixture-of-experts head. Each branch output is split into several tokens (with a learned
  per-source, per-position embedding), so every attention has several keys; the seed attended
  over one key, where the softmax is always 1.

Sources are a list of (name, modality, dim) from the embedding caches: 2, 4 or more work. A row
whose input was missing (the cache's `present` mask) gets a learned per-source token in place of
its projection.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from fusion.blocks import Router, build_block, mlp, pick_heads


@dataclass
class SourceSpec:
    name: str
    modality: str  # image | text | tabular
    dim: int


class SourceBranch(nn.Module):
    """Single-layer projection, LayerNorm and a learnable scale (the seed's branch), plus a missing token."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.scale = nn.Parameter(torch.ones(()))
        self.missing = nn.Parameter(torch.randn(out_dim) * 0.02)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, present):
        h = self.scale * self.norm(self.proj(x))
        h = torch.where(present[:, None], h, self.missing.to(h.dtype))
        return self.dropout(h)


class BlockFusionModel(nn.Module):
    def __init__(self, sources: list[SourceSpec], block: str = "concat_mlp", hidden_dim: int = 256,
                 dropout: float = 0.25, heads: int = 4, **block_kwargs):
        super().__init__()
        self.sources = sources
        self.branches = nn.ModuleList(SourceBranch(s.dim, hidden_dim, dropout) for s in sources)
        self.block = build_block(block, hidden_dim, [s.modality for s in sources], dropout=dropout / 2,
                                 heads=heads, **block_kwargs)
        self.head = mlp(hidden_dim, hidden_dim, 1, dropout)

    def forward(self, inputs: list[torch.Tensor], present: list[torch.Tensor]):
        tokens = torch.stack([b(x, m) for b, x, m in zip(self.branches, inputs, present)], 1)
        fused, aux = self.block(tokens)
        return self.head(fused).squeeze(-1), aux


class TokenCrossAttention(nn.Module):
    """Pre-norm cross-attention over token sets with residual and FFN; can record its weights."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = mlp(dim, 2 * dim, dim, dropout)
        self.record_attention, self.last_attention = False, None

    def forward(self, q, kv):
        kv = self.norm_kv(kv)
        a, w = self.attn(self.norm_q(q), kv, kv, need_weights=self.record_attention, average_attn_weights=True)
        self.last_attention = w  # [B, queries, keys] when recorded
        x = q + a
        return x + self.ffn(self.norm_ffn(x))


class MoEHead(nn.Module):
    """A `Router` (fusion.blocks) over expert MLPs (in -> expert_dims... -> 1); records the experts' load."""

    def __init__(self, in_dim: int, n_experts: int, expert_dims: list[int], dropout: float, load_balance_weight: float,
                 router_z_weight: float = 1e-3, router_top_k: int = 0):
        super().__init__()
        self.router = Router(in_dim, n_experts, load_balance_weight, router_z_weight, router_top_k)
        self.experts = nn.ModuleList()
        for _ in range(n_experts):
            layers, d = [], in_dim
            for h in expert_dims:
                layers += [nn.Linear(d, h), nn.GELU(), nn.Dropout(dropout)]
                d = h
            layers.append(nn.Linear(d, 1))
            self.experts.append(nn.Sequential(*layers))

    @property
    def last_load(self):
        return self.router.last_load

    def forward(self, x):
        g, aux = self.router(x)
        out = torch.cat([e(x) for e in self.experts], -1).float()
        return (g * out).sum(-1), aux


class HierarchicalFusionModel(nn.Module):
    def __init__(self, sources: list[SourceSpec], hidden_dim: int = 512, n_tokens: int = 4, heads: int = 8,
                 n_experts: int = 3, expert_dims: tuple = (1024, 512, 256), dropout: float = 0.25,
                 use_advanced_model: bool = True, load_balance_weight: float = 0.3,
                 router_z_weight: float = 1e-3, router_top_k: int = 0):
        super().__init__()
        if hidden_dim % n_tokens:
            raise ValueError(f"hidden_dim {hidden_dim} must be divisible by n_tokens {n_tokens}")
        self.sources, self.n_tokens, self.hidden_dim = sources, n_tokens, hidden_dim
        self.use_advanced_model = use_advanced_model
        self.branches = nn.ModuleList(SourceBranch(s.dim, hidden_dim, dropout) for s in sources)
        image = [i for i, s in enumerate(sources) if s.modality == "image"]
        text = [i for i, s in enumerate(sources) if s.modality != "image"]
        self.image_idx, self.text_idx = image or text, text or image  # one modality only: both groups are it
        n = len(sources)
        if use_advanced_model:
            d_tok = hidden_dim // n_tokens
            h = pick_heads(d_tok, heads)
            self.token_embedding = nn.Parameter(torch.randn(n, n_tokens, d_tok) * 0.02)
            self.image_stage = TokenCrossAttention(d_tok, h, dropout / 2)
            self.text_stage = TokenCrossAttention(d_tok, h, dropout / 2)
            self.cross_stage = TokenCrossAttention(d_tok, h, dropout / 2)
            self.head = MoEHead(4 * hidden_dim, n_experts, list(expert_dims), dropout, load_balance_weight,
                                router_z_weight, router_top_k)
        else:
            self.head_simple = nn.Sequential(nn.Linear(n * hidden_dim, expert_dims[0]), nn.GELU(), nn.Dropout(dropout),
                                             nn.Linear(expert_dims[0], expert_dims[-1]), nn.GELU(), nn.Dropout(dropout),
                                             nn.Linear(expert_dims[-1], 1))

    def attention_stages(self):
        return [self.image_stage, self.text_stage, self.cross_stage] if self.use_advanced_model else []

    def forward(self, inputs: list[torch.Tensor], present: list[torch.Tensor]):
        projected = [b(x, m) for b, x, m in zip(self.branches, inputs, present)]
        if not self.use_advanced_model:
            return self.head_simple(torch.cat(projected, -1)).squeeze(-1), projected[0].new_zeros(())
        b = projected[0].shape[0]
        tokens = [p.view(b, self.n_tokens, -1) + self.token_embedding[i].to(p.dtype) for i, p in enumerate(projected)]
        # stage 1: the first image source queries every image source's tokens; stage 2: same for text
        image = self.image_stage(tokens[self.image_idx[0]], torch.cat([tokens[i] for i in self.image_idx], 1))
        text = self.text_stage(tokens[self.text_idx[0]], torch.cat([tokens[i] for i in self.text_idx], 1))
        # stage 3: fused image tokens query fused text tokens
        multimodal = self.cross_stage(image, text)
        features = torch.cat([multimodal.flatten(1), image.flatten(1), text.flatten(1), projected[0]], -1)
        return self.head(features)


def build_model(cfg, sources: list[SourceSpec]) -> nn.Module:
    if cfg.architecture == "hierarchical":
        return HierarchicalFusionModel(sources, hidden_dim=cfg.hidden_dim, n_tokens=cfg.n_tokens, heads=cfg.n_heads,
                                       n_experts=cfg.n_experts, expert_dims=tuple(cfg.expert_dims), dropout=cfg.dropout,
                                       use_advanced_model=cfg.use_advanced_model,
                                       load_balance_weight=cfg.load_balance_weight,
                                       router_z_weight=cfg.router_z_weight, router_top_k=cfg.router_top_k)
    if cfg.architecture == "block":
        extra = {"moe": {"load_balance_weight": cfg.load_balance_weight, "n_experts": cfg.n_experts,
                         "router_z_weight": cfg.router_z_weight, "router_top_k": cfg.router_top_k},
                 "energy_aware": {"energy_weight": cfg.energy_weight, "energy_budget": cfg.energy_budget},
                 "bi_cross_attention": {"n_tokens": cfg.n_tokens}}.get(cfg.block, {})
        return BlockFusionModel(sources, block=cfg.block, hidden_dim=cfg.hidden_dim, dropout=cfg.dropout,
                                heads=cfg.n_heads, **extra)
    raise ValueError(f"architecture must be 'hierarchical' or 'block', got {cfg.architecture!r}")


def specs_to_dicts(sources: list[SourceSpec]) -> list[dict]:
    return [asdict(s) for s in sources]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
