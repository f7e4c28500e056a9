"""CLIP fine-tuning with a tiny open_clip ViT on the demo catalog's planted image signal."""
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clip_finetune import extract_embeddings, train
from clip_finetune.config import PROFILES
from clip_finetune.model import freeze, wise_ft
from core.embedding_cache import load_embeddings
from core.open_clip_models import load_open_clip
from core.tables import load_table

ROOT = Path(__file__).resolve().parents[1]


def config(demo_catalog, tiny_models, out, **kw):
    return replace(PROFILES["tiny"], model=str(tiny_models / "clip_tiny"), data_dir=demo_catalog / "data",
                   out_dir=out, embeddings_dir=out / "embeddings", num_workers=0, **kw)


@pytest.fixture(scope="module")
def finetuned(demo_catalog, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    cfg = config(demo_catalog, tiny_models, out)
    return cfg, train.main(cfg)


def test_finetuning_beats_the_constant_median_on_the_image_signal(finetuned):
    _, metrics = finetuned
    assert metrics["val_smape"] < metrics["constant_median_val_smape"] - 3.0, metrics


def test_extraction_writes_aligned_masked_vectors_and_head_predictions(demo_catalog, finetuned):
    cfg, _ = finetuned
    extract_embeddings.main(cfg)
    for split in ("train", "test"):
        table = load_table(demo_catalog / "data", split)
        cached = load_embeddings(cfg.embeddings_dir, "clip_image", split, table["sample_id"])
        assert cached.dim == 32 and cached.meta["config"]["use_finetuned"]
        assert (cached.present == table["has_image"].to_numpy()).all()
    preds = pd.read_csv(Path(cfg.out_dir) / cfg.run_name / "test_predictions.csv", dtype={"sample_id": str})
    assert preds["sample_id"].tolist() == load_table(demo_catalog / "data", "test")["sample_id"].tolist()
    assert (preds["price"] > 0).all()


def test_wise_ft_zero_is_the_base_model(demo_catalog, finetuned, tmp_path):
    cfg, _ = finetuned
    base = replace(cfg, use_finetuned=False, embeddings_dir=tmp_path / "base", split="test")
    zero = replace(cfg, wise_alpha=0.0, embeddings_dir=tmp_path / "zero", split="test")
    extract_embeddings.main(base)
    extract_embeddings.main(zero)
    a = load_embeddings(tmp_path / "base", "clip_image", "test").values
    b = load_embeddings(tmp_path / "zero", "clip_image", "test").values
    tuned = load_embeddings(cfg.embeddings_dir, "clip_image", "test").values
    np.testing.assert_allclose(a, b, atol=1e-3)
    assert np.abs(a - tuned).max() > 1e-2
    half = wise_ft({"w": torch.zeros(2)}, {"w": torch.ones(2)}, 0.25)
    assert torch.allclose(half["w"], torch.full((2,), 0.25))


def test_freezing_keeps_stem_early_blocks_and_norms_fixed(tiny_models):
    clip, _, _, _ = load_open_clip(str(tiny_models / "clip_tiny"), None)
    visual = clip.visual
    trainable = freeze(visual, n_blocks=1, norms=True)
    frozen = {n for n, p in visual.named_parameters() if not p.requires_grad}
    assert "conv1.weight" in frozen and "positional_embedding" in frozen
    assert any(n.startswith("transformer.resblocks.0.") for n in frozen)
    assert not any(n.startswith("transformer.resblocks.1.attn") for n in frozen)
    assert "ln_post.weight" in frozen and "transformer.resblocks.1.ln_1.weight" in frozen
    assert 0 < trainable < sum(p.numel() for p in visual.parameters())


def test_resume_gives_the_same_next_epoch_loss(demo_catalog, tiny_models, tmp_path, interrupt):
    ref_cfg = config(demo_catalog, tiny_models, tmp_path / "a", epochs=3, early_stopping_patience=10)
    train.main(ref_cfg)
    reference = pd.read_csv(tmp_path / "a" / "tiny" / "history.csv")
    cfg = config(demo_catalog, tiny_models, tmp_path / "b", epochs=3, early_stopping_patience=10)
    with interrupt(train, "predict_log", on_call=2):  # in the second epoch's validation
        train.main(cfg)
    train.main(cfg)
    resumed = pd.read_csv(tmp_path / "b" / "tiny" / "history.csv")
    np.testing.assert_allclose(resumed["train_loss"], reference["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(resumed["val_smape"], reference["val_smape"], rtol=1e-5)


def test_ddp_on_two_cpu_processes(demo_catalog, tiny_models, tmp_path):
    env = {**os.environ, "PRICE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    common = ["profile=tiny", f"model={tiny_models / 'clip_tiny'}", f"data_dir={demo_catalog / 'data'}",
              f"out_dir={tmp_path}", f"embeddings_dir={tmp_path / 'emb'}", "num_workers=0", "device=cpu"]
    for module, extra in (("clip_finetune.train", ["epochs=2"]), ("clip_finetune.extract_embeddings", ["split=test"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29532", "-m",
               module, *common, *extra]
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    history = pd.read_csv(tmp_path / "tiny" / "history.csv")
    assert len(history) == 2 and np.isfinite(history["val_smape"]).all()
    table = load_table(demo_catalog / "data", "test")
    assert load_embeddings(tmp_path / "emb", "clip_image", "test", table["sample_id"]).values.shape == (len(table), 32)
