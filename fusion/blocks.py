"""The fusion block library (seeds 002-004), one interface, chosen by name.

Every block takes `tokens` [B, S, D], one projected vector per source, and returns
(fused [B, D], aux_loss scalar). The sources' modalities are given at construction, so blocks
that treat image and text differently (film, bi_cross_attention, the routers) know which is
which, and any number of sources works. Fixed relative to the seed's code:

- shomr and energy_aware route with a straight-through Gumbel sample in training and argmax in
  eval, so inference is deterministic (the seed sampled at inference).
- energy_aware returns its energy penalty as the aux loss, which the trainer adds (the seed
  computed it and dropped it).
- transformer_concat adds a learned per-source modality embedding to each token (the seed
  overwrote its modality token).
- modality_dropout draws the mask per sample, and never drops every source of a sample (the seed
  dropped a modality for the whole batch).
- bi_cross_attention splits each source into several tokens, so its attention has several keys
  (the seed's one image and one text vector gave one key: a softmax of 1, a linear map).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


def pick_heads(dim: int, wanted: int) -> int:
    heads = max(1, min(wanted, dim))
    while dim % heads:
        heads -= 1
    return heads


class FusionBlock(nn.Module):
    def __init__(self, dim: int, modalities: list[str], dropout: float = 0.1, heads: int = 4):
        super().__init__()
        self.dim, self.n = dim, len(modalities)
        self.heads = pick_heads(dim, heads)
        image = [i for i, m in enumerate(modalities) if m == "image"]
        other = [i for i, m in enumerate(modalities) if m != "image"]
        # with one modality only, both groups are all sources, so every block still works
        self.register_buffer("image_idx", torch.tensor(image or other), persistent=False)
        self.register_buffer("other_idx", torch.tensor(other or image), persistent=False)

    def groups(self, tokens):
        return tokens.index_select(1, self.image_idx), tokens.index_select(1, self.other_idx)

    def zero(self, tokens):
        return tokens.new_zeros(())


def straight_through_route(logits: torch.Tensor, training: bool, tau: float = 1.0) -> torch.Tensor:
    """One-hot route per sample: Gumbel sample (straight-through gradients) when training, argmax in eval."""
    if training:
        return F.gumbel_softmax(logits.float(), tau=tau, hard=True).to(logits.dtype)
    return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)


class Router(nn.Module):
    """Softmax gate over `n_experts` for a mixture of experts, with the standard guards against collapse.

    Why gates collapsed here: the router read the fused features raw. Those are unnormalised residual
    streams with a large offset shared by every row (at width 512, a mean vector of norm ~28 in rows
    of norm ~45), so a small weight step moved every row's logits together; one expert's logit drew
    ~16 above the others for all rows, the softmax saturated, and its gradient (p(1 - p)) vanished.
    The old 0.01 * n * sum(mean_prob^2) balance term acts through that same saturated softmax, so
    nothing pulled the gate back. Fixes, all standard: the ST-MoE router z-loss
    mean(logsumexp(logits)^2), whose gradient on the runaway logit stays ~2 * logit even when the
    softmax is saturated, so logits stay small; the Switch Transformer balance loss n * sum(f_e * P_e)
    (f_e: fraction of rows whose top gate is e, P_e: mean gate probability) at a weight that matters;
    and a LayerNorm on the router input, so its scale no longer grows with the residual streams.

    From the last forward pass: `last_load`, the fraction of rows whose largest gate weight is each
    expert (rows routed); `last_gate`, the mean gate weight per expert; `last_choice`, each row's
    top expert."""

    def __init__(self, in_dim: int, n_experts: int, load_balance_weight: float = 0.3, z_loss_weight: float = 1e-3,
                 top_k: int = 0):
        super().__init__()
        if top_k == 1 or top_k < 0 or top_k > n_experts:
            raise ValueError(f"router top_k must be 0 (every expert) or 2..{n_experts}, got {top_k}")
        self.top_k = top_k
        self.norm = nn.LayerNorm(in_dim)
        self.linear = nn.Linear(in_dim, n_experts)
        self.load_balance_weight, self.z_loss_weight = load_balance_weight, z_loss_weight
        self.last_load, self.last_gate, self.last_choice = None, None, None

    def forward(self, x):
        logits = self.linear(self.norm(x)).float()
        g = torch.softmax(logits, -1)
        n = g.shape[-1]
        choice = g.argmax(-1).detach()
        routed = F.one_hot(choice, n).float().mean(0)  # no gradient: it weights the probabilities
        gate = g.mean(0)
        self.last_load, self.last_gate, self.last_choice = routed, gate.detach(), choice
        balance = n * (routed * gate).sum()  # 1 when balanced, n when every row goes to one expert
        z_loss = torch.logsumexp(logits, -1).pow(2).mean()
        if self.top_k:  # sparse: each row's weight over its top_k experts only, so experts train on their own rows
            kept = logits.topk(self.top_k, -1).indices
            masked = torch.full_like(logits, float("-inf")).scatter(-1, kept, logits.gather(-1, kept))
            g = torch.softmax(masked, -1)
        return g, self.load_balance_weight * balance + self.z_loss_weight * z_loss


class ConcatMLP(FusionBlock):
    def __init__(self, dim, modalities, dropout=0.1, **kw):
        super().__init__(dim, modalities, dropout)
        self.net = mlp(self.n * dim, 2 * dim, dim, dropout)

    def forward(self, tokens):
        return self.net(tokens.flatten(1)), self.zero(tokens)


class Gated(FusionBlock):
    """Per-dimension convex blend of the sources; with two sources this is sigmoid(W[v;t]) gating."""

    def __init__(self, dim, modalities, dropout=0.1, **kw):
        super().__init__(dim, modalities, dropout)
        self.gate = nn.Linear(self.n * dim, self.n * dim)

    def forward(self, tokens):
        b, s, d = tokens.shape
        g = torch.softmax(self.gate(tokens.flatten(1)).view(b, s, d), dim=1)
        return (g * tokens).sum(1), self.zero(tokens)


class FiLM(FusionBlock):
    """Text conditions vision: gamma(t) * v + beta(t). Deliberately asymmetric."""

    def __init__(self, dim, modalities, dropout=0.1, **kw):
        super().__init__(dim, modalities, dropout)
        self.gamma, self.beta = nn.Linear(dim, dim), nn.Linear(dim, dim)
        nn.init.zeros_(self.gamma.weight)
        nn.init.ones_(self.gamma.bias)  # starts as the identity on v

    def forward(self, tokens):
        image, other = self.groups(tokens)
        v, t = image.mean(1), other.mean(1)
        return self.gamma(t) * v + self.beta(t), self.zero(tokens)


class ModalityDropout(FusionBlock):
    """Concat-MLP that, in training, replaces each source of each sample by a learned token with
    probability p, keeping at least one source per sample."""

    def __init__(self, dim, modalities, dropout=0.1, p_drop: float = 0.2, **kw):
        super().__init__(dim, modalities, dropout)
        self.p_drop = p_drop
        self.dropped = nn.Parameter(torch.zeros(self.n, dim))
        self.net = mlp(self.n * dim, 2 * dim, dim, dropout)
        self.last_keep = None

    def forward(self, tokens):
        if self.training and self.p_drop > 0:
            b = tokens.shape[0]
            keep = torch.rand(b, self.n, device=tokens.device) >= self.p_drop
            none_kept = ~keep.any(1)
            rescue = torch.randint(0, self.n, (b,), device=tokens.device)
            keep[none_kept, rescue[none_kept]] = True
            self.last_keep = keep
            tokens = torch.where(keep[..., None], tokens, self.dropped.to(tokens.dtype).expand_as(tokens))
        return self.net(tokens.flatten(1)), self.zero(tokens)


class TransformerConcat(FusionBlock):
    def __init__(self, dim, modalities, dropout=0.1, layers: int = 1, **kw):
        super().__init__(dim, modalities, dropout)
        self.modality_embedding = nn.Parameter(torch.randn(self.n, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, self.heads, 2 * dim, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, tokens):
        return self.encoder(tokens + self.modality_embedding.to(tokens.dtype)).mean(1), self.zero(tokens)


class CrossAttention(FusionBlock):
    """Attention pooling: the mean token queries all source tokens, then an FFN with residual."""

    def __init__(self, dim, modalities, dropout=0.1, **kw):
        super().__init__(dim, modalities, dropout)
        self.norm_q, self.norm_kv, self.norm_out = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, self.heads, dropout=dropout, batch_first=True)
        self.ffn = mlp(dim, 2 * dim, dim, dropout)
        self.record_attention, self.last_attention = False, None

    def forward(self, tokens):
        q = self.norm_q(tokens.mean(1, keepdim=True))
        kv = self.norm_kv(tokens)
        z, w = self.attn(q, kv, kv, need_weights=self.record_attention)
        self.last_attention = w
        z = z.squeeze(1)
        return z + self.ffn(self.norm_out(z)), self.zero(tokens)


class BiCrossAttention(FusionBlock):
    """Seed 004: image attends to text, then text attends to the updated image; pooled and merged.

    Each source vector is split into `n_tokens` tokens (with a learned per-source, per-position
    embedding), as the hierarchical model does, so every query has several keys. The seed attended
    from one image vector to one text vector: a single key, a softmax that is always 1, and a block
    that is only a linear map. A setting that would leave one key per query is refused."""

    def __init__(self, dim, modalities, dropout=0.1, heads: int = 4, n_tokens: int = 4, **kw):
        super().__init__(dim, modalities, dropout, heads)
        if n_tokens < 1 or dim % n_tokens:
            raise ValueError(f"bi_cross_attention: width {dim} must be divisible by n_tokens={n_tokens}")
        n_image, n_text = len(self.image_idx), len(self.other_idx)
        if min(n_image, n_text) * n_tokens < 2:
            raise ValueError(f"bi_cross_attention: with {n_image} image and {n_text} text source(s) and "
                             f"n_tokens={n_tokens}, a query has one key and its attention weight is always 1; "
                             f"set n_tokens >= 2")
        self.n_tokens, token_dim = n_tokens, dim // n_tokens
        token_heads = pick_heads(token_dim, heads)
        self.token_embedding = nn.Parameter(torch.randn(self.n, n_tokens, token_dim) * 0.02)
        self.image_to_text = nn.MultiheadAttention(token_dim, token_heads, dropout=dropout, batch_first=True)
        self.text_to_image = nn.MultiheadAttention(token_dim, token_heads, dropout=dropout, batch_first=True)
        self.norm_image, self.norm_text = nn.LayerNorm(token_dim), nn.LayerNorm(token_dim)
        self.merge = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())
        # when recorded: (image-to-text [B, image tokens, text tokens], text-to-image [B, text tokens, image tokens])
        self.record_attention, self.last_attention = False, None

    def forward(self, tokens):
        b, s, d = tokens.shape
        parts = tokens.view(b, s, self.n_tokens, d // self.n_tokens) + self.token_embedding.to(tokens.dtype)
        image = parts.index_select(1, self.image_idx).flatten(1, 2)  # [B, image sources * n_tokens, d / n_tokens]
        text = parts.index_select(1, self.other_idx).flatten(1, 2)
        u, to_text = self.image_to_text(image, text, text, need_weights=self.record_attention)
        image = self.norm_image(image + u)
        u, to_image = self.text_to_image(text, image, image, need_weights=self.record_attention)
        text = self.norm_text(text + u)
        self.last_attention = (to_text, to_image) if self.record_attention else None
        # tokens back to one vector per source, then the mean over each group's sources
        image, text = image.reshape(b, -1, d).mean(1), text.reshape(b, -1, d).mean(1)
        return self.merge(torch.cat([image, text], -1)), self.zero(tokens)


class _SoftFusion(nn.Module):
    """Confidence-weighted sum of the sources plus self-attention, with an FFN."""

    def __init__(self, dim, n, heads, dropout):
        super().__init__()
        self.confidence = nn.Linear(n * dim, n)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.ffn = mlp(dim, 2 * dim, dim, dropout)

    def forward(self, tokens):
        w = torch.softmax(self.confidence(tokens.flatten(1)), -1)
        base = (w[..., None] * tokens).sum(1)
        a, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        x = self.norm(base + a.mean(1))
        return x + self.ffn(x)


class SHoMR(FusionBlock):
    """Soft-hard modality routing: per sample, route to vision-only, text-only or the soft fusion."""

    def __init__(self, dim, modalities, dropout=0.1, **kw):
        super().__init__(dim, modalities, dropout)
        self.soft = _SoftFusion(dim, self.n, self.heads, dropout)
        self.router = nn.Linear(self.n * dim, 3)
        self.vision, self.text = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.last_route = None

    def forward(self, tokens):
        image, other = self.groups(tokens)
        paths = torch.stack([self.vision(image.mean(1)), self.text(other.mean(1)), self.soft(tokens)], 1)
        route = straight_through_route(self.router(tokens.flatten(1)), self.training)
        self.last_route = route.detach()
        return (route[..., None] * paths).sum(1), self.zero(tokens)


class EnergyAware(FusionBlock):
    """Routes per sample to vision-only, text-only or both (gated + attention), under an energy budget.

    The expected cost of the router's choice above `budget` is returned as the aux loss."""

    def __init__(self, dim, modalities, dropout=0.1, energy_costs=(1.0, 1.0, 3.0), energy_budget: float = 1.5,
                 energy_weight: float = 0.1, **kw):
        super().__init__(dim, modalities, dropout)
        self.router = nn.Linear(self.n * dim, 3)
        self.gated = Gated(dim, modalities, dropout)
        self.attn = nn.MultiheadAttention(dim, self.heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.ffn = mlp(dim, 2 * dim, dim, dropout)
        self.register_buffer("costs", torch.tensor(energy_costs), persistent=False)
        self.budget, self.weight = energy_budget, energy_weight
        self.last_energy = None

    def forward(self, tokens):
        image, other = self.groups(tokens)
        gated, _ = self.gated(tokens)
        a, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        both = self.ffn(self.norm(gated + a.mean(1)))
        paths = torch.stack([image.mean(1), other.mean(1), both], 1)
        logits = self.router(tokens.flatten(1))
        route = straight_through_route(logits, self.training)
        energy = (torch.softmax(logits.float(), -1) * self.costs).sum(-1).mean()
        self.last_energy = energy.detach()
        aux = self.weight * F.relu(energy - self.budget)
        return (route[..., None] * paths).sum(1), aux


class MixtureOfExperts(FusionBlock):
    """Soft gating over expert MLPs through a `Router`, which keeps every expert in use."""

    def __init__(self, dim, modalities, dropout=0.1, n_experts: int = 3, load_balance_weight: float = 0.3,
                 router_z_weight: float = 1e-3, router_top_k: int = 0, **kw):
        super().__init__(dim, modalities, dropout)
        self.router = Router(self.n * dim, n_experts, load_balance_weight, router_z_weight, router_top_k)
        self.experts = nn.ModuleList(mlp(self.n * dim, 2 * dim, dim, dropout) for _ in range(n_experts))

    @property
    def last_load(self):
        return self.router.last_load

    def forward(self, tokens):
        x = tokens.flatten(1)
        g, aux = self.router(x)
        out = sum(g[:, e, None].to(x.dtype) * expert(x) for e, expert in enumerate(self.experts))
        return out, aux


BLOCKS = {
    "concat_mlp": ConcatMLP,
    "gated": Gated,
    "film": FiLM,
    "modality_dropout": ModalityDropout,
    "transformer_concat": TransformerConcat,
    "cross_attention": CrossAttention,
    "bi_cross_attention": BiCrossAttention,
    "shomr": SHoMR,
    "energy_aware": EnergyAware,
    "moe": MixtureOfExperts,
}


def build_block(name: str, dim: int, modalities: list[str], dropout: float = 0.1, **kwargs) -> FusionBlock:
    if name not in BLOCKS:
        raise ValueError(f"unknown fusion block {name!r}; choose from {', '.join(BLOCKS)}")
    return BLOCKS[name](dim, modalities, dropout=dropout, **kwargs)
