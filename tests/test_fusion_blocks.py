"""Each fusion block on one interface, and proof that the seed's defects are fixed."""
from dataclasses import replace

import pytest
import torch

from fusion.blocks import BLOCKS, build_block
from fusion.models import HierarchicalFusionModel, SourceSpec, build_model

MODALITIES = ["image", "image", "text", "text"]


@pytest.mark.parametrize("name", list(BLOCKS))
def test_every_block_maps_tokens_to_one_vector_and_learns(name):
    torch.manual_seed(0)
    block = build_block(name, 16, MODALITIES, dropout=0.0)
    tokens = torch.randn(8, 4, 16, requires_grad=True)
    fused, aux = block(tokens)
    assert fused.shape == (8, 16) and aux.dim() == 0
    (fused.sum() + aux).backward()
    assert tokens.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(BLOCKS))
def test_eval_output_is_deterministic(name):
    torch.manual_seed(1)
    block = build_block(name, 16, MODALITIES, dropout=0.3).eval()
    tokens = torch.randn(32, 4, 16)
    with torch.no_grad():
        first = block(tokens)[0]
        for _ in range(3):
            assert torch.equal(block(tokens)[0], first)


def test_routers_sample_in_training_but_argmax_in_eval():
    torch.manual_seed(2)
    for name in ("shomr", "energy_aware"):
        block = build_block(name, 16, MODALITIES, dropout=0.0)
        tokens = torch.randn(64, 4, 16)
        block.train()
        outs = {tuple(block(tokens)[0][:, 0].round(decimals=5).tolist()) for _ in range(5)}
        assert len(outs) > 1, f"{name}: training routing should be stochastic"


def test_energy_penalty_is_returned_and_trains_the_router():
    torch.manual_seed(3)
    block = build_block("energy_aware", 16, MODALITIES, dropout=0.0, energy_budget=1.0, energy_weight=1.0)
    with torch.no_grad():
        block.router.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))  # prefer the expensive path
    _, aux = block(torch.randn(16, 4, 16))
    assert aux.item() > 0.5
    aux.backward()
    assert block.router.bias.grad[2] > 0  # the penalty pushes the expensive route down
    block.budget = 10.0
    assert block(torch.randn(16, 4, 16))[1].item() == 0.0


def test_modality_embeddings_enter_the_transformer():
    torch.manual_seed(4)
    block = build_block("transformer_concat", 16, MODALITIES, dropout=0.0).eval()
    tokens = torch.randn(4, 4, 16)
    before = block(tokens)[0]
    with torch.no_grad():
        block.modality_embedding.add_(1.0)
    assert not torch.allclose(before, block(tokens)[0])
    block(tokens)[0].sum().backward()
    assert block.modality_embedding.grad.abs().sum() > 0


def test_modality_dropout_masks_per_sample_and_keeps_one_source():
    torch.manual_seed(5)
    block = build_block("modality_dropout", 16, MODALITIES, dropout=0.0, p_drop=0.5).train()
    block(torch.randn(256, 4, 16))
    keep = block.last_keep
    assert keep.any(1).all()  # never every source of a sample
    per_sample = keep.float().mean(0)
    assert ((keep[:, 0] != keep[0, 0]).any())  # differs between samples of one batch
    assert (per_sample > 0.3).all() and (per_sample < 0.8).all()
    block.eval()
    tokens = torch.randn(8, 4, 16)
    assert torch.equal(block(tokens)[0], block(tokens)[0])


def test_cross_attention_weights_differ_between_samples():
    torch.manual_seed(6)
    block = build_block("cross_attention", 16, MODALITIES, dropout=0.0).eval()
    block.record_attention = True
    block(torch.randn(8, 4, 16))
    w = block.last_attention.squeeze(1)  # [B, keys]
    assert w.shape == (8, 4) and torch.allclose(w.sum(1), torch.ones(8))
    assert (w.std(0) > 1e-3).any()


def test_bi_cross_attention_over_two_sources_has_several_keys_and_varies_by_sample():
    # qwen_clip's two sources, one image vector and one text vector: the seed's block had one key per
    # query there, so every attention weight was exactly 1
    from fusion.qwen_clip.config import PROFILES

    torch.manual_seed(9)
    cfg = replace(PROFILES["tiny"], block="bi_cross_attention", n_tokens=8, dropout=0.0)
    specs = [SourceSpec("clip_image", "image", 24), SourceSpec("qwen_text", "text", 19)]
    model = build_model(cfg, specs).eval()
    model.block.record_attention = True
    x = [torch.randn(8, s.dim) for s in specs]
    pred, _ = model(x, [torch.ones(8, dtype=torch.bool)] * 2)
    assert pred.shape == (8,)
    for w in model.block.last_attention:
        assert w.shape == (8, 8, 8)  # n_tokens from the config: 8 queries over 8 keys, per sample
        assert torch.allclose(w.sum(-1), torch.ones(8, 8))
        assert w.max() < 0.999  # not the single-key softmax of 1
        assert (w.std(0) > 1e-3).any()  # weights differ between samples


def test_bi_cross_attention_refuses_a_single_key():
    with pytest.raises(ValueError, match="one key"):
        build_block("bi_cross_attention", 16, ["image", "text"], n_tokens=1)
    build_block("bi_cross_attention", 16, ["image", "image", "text", "text"], n_tokens=1)  # two keys: allowed
    with pytest.raises(ValueError, match="divisible"):
        build_block("bi_cross_attention", 16, ["image", "text"], n_tokens=3)


def test_hierarchical_attention_has_several_keys_and_varies_by_sample():
    torch.manual_seed(7)
    specs = [SourceSpec("clip", "image", 12), SourceSpec("siglip_img", "image", 10),
             SourceSpec("siglip_txt", "text", 9), SourceSpec("qwen", "text", 11)]
    model = HierarchicalFusionModel(specs, hidden_dim=32, n_tokens=4, heads=2, expert_dims=(16,), dropout=0.0).eval()
    for stage in model.attention_stages():
        stage.record_attention = True
    x = [torch.randn(6, s.dim) for s in specs]
    present = [torch.ones(6, dtype=torch.bool) for _ in specs]
    pred, aux = model(x, present)
    assert pred.shape == (6,)
    image_w = model.image_stage.last_attention
    assert image_w.shape == (6, 4, 8)  # 4 CLIP query tokens over 8 image keys
    assert model.cross_stage.last_attention.shape == (6, 4, 4)
    for stage in model.attention_stages():
        w = stage.last_attention
        assert w.max() < 0.999  # not the single-key softmax of 1
        assert (w.std(0) > 1e-4).any()  # weights differ between samples


def test_missing_input_uses_the_learned_token_not_zero():
    torch.manual_seed(8)
    specs = [SourceSpec("img", "image", 5), SourceSpec("txt", "text", 7)]
    model = HierarchicalFusionModel(specs, hidden_dim=16, n_tokens=2, heads=2, expert_dims=(8,), dropout=0.0).eval()
    x = [torch.randn(3, 5), torch.randn(3, 7)]
    absent = [torch.tensor([False, True, True]), torch.ones(3, dtype=torch.bool)]
    pred = model(x, absent)[0]
    x_changed = [x[0].clone(), x[1]]
    x_changed[0][0] = 100.0  # the masked row's input must not matter
    assert torch.allclose(pred, model(x_changed, absent)[0])
    with torch.no_grad():
        model.branches[0].missing.add_(1.0)
    pred2 = model(x, absent)[0]
    assert not torch.isclose(pred[0], pred2[0]) and torch.allclose(pred[1:], pred2[1:])


@pytest.mark.parametrize("n_sources", [2, 4, 5])
def test_hierarchical_model_takes_any_number_of_sources(n_sources):
    mods = ["image", "text", "image", "text", "tabular"][:n_sources]
    specs = [SourceSpec(f"s{i}", m, 4 + i) for i, m in enumerate(mods)]
    for advanced in (True, False):
        model = HierarchicalFusionModel(specs, hidden_dim=16, n_tokens=4, heads=2, expert_dims=(8,),
                                        use_advanced_model=advanced)
        pred, _ = model([torch.randn(3, s.dim) for s in specs], [torch.ones(3, dtype=torch.bool)] * n_sources)
        assert pred.shape == (3,)


def test_router_balance_term_is_one_when_balanced_and_n_when_collapsed_and_top_k_is_sparse():
    from fusion.blocks import Router

    router = Router(4, 3, load_balance_weight=1.0, z_loss_weight=0.0)
    with torch.no_grad():
        router.linear.weight.zero_()
        router.linear.bias.copy_(torch.tensor([0.0, 0.0, 30.0]))  # every row on expert 2, probability ~1
    _, aux = router(torch.randn(64, 4))
    assert aux.item() == pytest.approx(3.0, abs=1e-3) and router.last_load.tolist() == [0.0, 0.0, 1.0]
    with torch.no_grad():
        router.linear.weight.copy_(torch.eye(3, 4) * 50.0)
        router.linear.bias.zero_()
    x = torch.eye(3, 4).repeat(20, 1)  # a third of the rows certain of each expert
    _, aux = router(x)
    assert aux.item() == pytest.approx(1.0, abs=1e-3) and router.last_load.tolist() == pytest.approx([1 / 3] * 3)
    sparse = Router(4, 3, top_k=2)
    g, _ = sparse(torch.randn(16, 4))
    assert ((g == 0).sum(1) == 1).all() and torch.allclose(g.sum(1), torch.ones(16))
    with pytest.raises(ValueError, match="top_k"):
        Router(4, 3, top_k=1)
