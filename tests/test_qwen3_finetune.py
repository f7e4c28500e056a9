"""QLoRA fine-tuning of a tiny Qwen3 (built from Qwen3Config, tokenizer trained locally) on the demo catalog."""
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.embedding_cache import EmbeddingCacheWriter, load_embeddings
from core.io import read_json
from core.submission import check_submission
from core.tables import STRUCTURAL_FEATURES, encoder_rows, load_table
from qwen3_finetune import evaluate, extract_embeddings, predict, train
from qwen3_finetune.config import PROFILES
from qwen3_finetune.model import (FeatureScaler, PriceRegressor, add_lora, collate, length_batches, load_backbone,
                                  load_checkpoint, load_tokenizer, pool, qwen_input_text, run_rows, save_checkpoint,
                                  tokenize)

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def config(demo_catalog, tiny_models, out, **kw):
    return replace(PROFILES["tiny"], model=str(tiny_models / "qwen3_tiny"), data_dir=demo_catalog / "data",
                   out_dir=out, embeddings_dir=out / "embeddings", predictions_dir=out / "predictions", **kw)


@pytest.fixture(scope="module")
def trained(demo_catalog, tiny_models, tmp_path_factory):
    cfg = config(demo_catalog, tiny_models, tmp_path_factory.mktemp("qwen"))
    return cfg, train.main(cfg)


def test_qlora_beats_the_constant_median_on_the_text_signal(trained):
    cfg, metrics = trained
    assert cfg.quantization == "4bit"
    assert metrics["val_smape"] < metrics["constant_median_val_smape"] - 15, metrics


def test_training_scalars_reach_tensorboard_in_the_run_folder(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, metrics = trained
    run_dir = Path(cfg.out_dir) / cfg.run_name
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/samples_per_s", "select/smape"} <= set(events.Tags()["scalars"])
    history = pd.read_csv(run_dir / "history.csv")
    np.testing.assert_allclose([s.value for s in events.Scalars("select/smape")], history["selection_smape"], rtol=1e-6)
    np.testing.assert_allclose([s.value for s in events.Scalars("epoch/train_loss")], history["train_loss"], rtol=1e-6)


def test_backbone_is_really_4bit(tiny_models):
    import bitsandbytes as bnb

    backbone = add_lora(load_backbone(str(tiny_models / "qwen3_tiny"), "4bit", CPU), PROFILES["tiny"])
    layers = [m for m in backbone.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and layers[0].weight.quant_state.quant_type == "nf4"
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_reloaded_checkpoint_evaluates_to_the_training_score(trained):
    cfg, metrics = trained
    evaluate.main(cfg)
    assert read_json(Path(cfg.out_dir) / cfg.run_name / "eval.json")["val_smape"] == pytest.approx(metrics["val_smape"], rel=1e-9)


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_adapter_head_and_scaler_round_trip_to_identical_predictions(tiny_models, tmp_path, quantization):
    cfg = replace(PROFILES["tiny"], model=str(tiny_models / "qwen3_tiny"), quantization=quantization)
    torch.manual_seed(0)
    backbone = add_lora(load_backbone(cfg.model, quantization, CPU), cfg)
    for name, p in backbone.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # adapters that change the output, as after training
    model = PriceRegressor(backbone, 64, cfg.head_hidden, "last")
    scaler = FeatureScaler().fit(np.random.default_rng(0).uniform(0, 500, (50, 3)))
    ids = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    feats = scaler.transform(np.array([[12, 0, 340], [1, 355, 0], [3, 0, 0]], float))
    before = run_rows(model, ids, feats, 2, 0, CPU, None)
    save_checkpoint(tmp_path / "ck", model, scaler, {"epoch": 0})
    reloaded, scaler2 = load_checkpoint(tmp_path / "ck", cfg, CPU)
    np.testing.assert_array_equal(run_rows(reloaded, ids, scaler2.transform(np.array([[12, 0, 340], [1, 355, 0], [3, 0, 0]], float)), 2, 0, CPU, None), before)


def test_last_token_pooling_picks_the_last_real_token_under_left_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(pool(hidden, left, "last"), hidden[:, 3])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(pool(hidden, right, "last"), torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.allclose(pool(hidden, left, "mean")[0], hidden[0, 2:].mean(0))
    ids, mask = collate([[7, 8], [1, 2, 3, 4]], [0, 1], pad_id=0, device=CPU)
    assert ids.tolist() == [[0, 0, 7, 8], [1, 2, 3, 4]] and mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_batches_group_similar_lengths_and_pad_only_to_the_longest():
    lengths = np.random.default_rng(0).integers(5, 500, 400)
    batches = length_batches(lengths, 16, shuffle=True, seed=1)
    assert sorted(np.concatenate(batches).tolist()) == list(range(400))
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread < 40  # vs ~450 for random batches
    shards = [length_batches(lengths, 16, True, 1, rank=r, world=2) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])


def test_structural_features_reach_the_head(tiny_models):
    cfg = replace(PROFILES["tiny"], model=str(tiny_models / "qwen3_tiny"), quantization="none")
    model = PriceRegressor(add_lora(load_backbone(cfg.model, "none", CPU), cfg), 64, 16, "last")
    ids = [[5, 6, 7]]
    a = run_rows(model, ids, np.array([[0.0, 0.0, 0.0]], np.float32), 1, 0, CPU, None)
    b = run_rows(model, ids, np.array([[2.0, -1.0, 0.5]], np.float32), 1, 0, CPU, None)
    assert abs(float(a[0]) - float(b[0])) > 1e-4
    emb = run_rows(model, ids, np.array([[2.0, -1.0, 0.5]], np.float32), 1, 0, CPU, None, want="embed")
    assert emb.shape == (1, 64 + 3) and np.allclose(emb[0, -3:], [2.0, -1.0, 0.5])


def test_extraction_width_alignment_and_resume(demo_catalog, trained, tmp_path, interrupt):
    cfg, _ = trained
    cfg = replace(cfg, chunk_size=128)
    extract_embeddings.main(replace(cfg, embeddings_dir=tmp_path / "full"))
    with interrupt(EmbeddingCacheWriter, "write_chunk", on_call=3):  # two chunks on disk
        extract_embeddings.main(replace(cfg, embeddings_dir=tmp_path / "resumed"))
    extract_embeddings.main(replace(cfg, embeddings_dir=tmp_path / "resumed"))
    for split in ("train", "test"):
        table = load_table(demo_catalog / "data", split)
        full = load_embeddings(tmp_path / "full", "qwen_text", split, table["sample_id"])
        assert full.dim == 64 + 3 and full.meta["modality"] == "text"
        assert (tmp_path / "full/qwen_text" / split / "embeddings.npy").read_bytes() == \
            (tmp_path / "resumed/qwen_text" / split / "embeddings.npy").read_bytes()
    table = load_table(demo_catalog / "data", "train")
    fit, _ = encoder_rows(table, 0, cfg.selection_fraction, cfg.seed)
    scaled = FeatureScaler().fit(table.loc[fit, STRUCTURAL_FEATURES].to_numpy())
    np.testing.assert_allclose(load_embeddings(tmp_path / "full", "qwen_text", "train").values[:, -3:],
                               scaled.transform(table[STRUCTURAL_FEATURES].to_numpy()), atol=2e-2)


def test_predict_writes_a_checked_baseline_submission(demo_catalog, trained):
    cfg, _ = trained
    out = predict.main(cfg)
    assert check_submission(out, demo_catalog / "raw" / "test.csv") == []


def test_ddp_on_two_cpu_processes(demo_catalog, tiny_models, tmp_path):
    env = {**os.environ, "PRICE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "-m",
           "qwen3_finetune.train", "profile=tiny", f"model={tiny_models / 'qwen3_tiny'}", "quantization=none",
           f"data_dir={demo_catalog / 'data'}", f"out_dir={tmp_path}", "epochs=2", "device=cpu"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_json(tmp_path / "tiny" / "metrics.json")
    assert metrics["epochs_run"] == 2 and np.isfinite(metrics["val_smape"])
    assert (tmp_path / "tiny" / "best" / "adapter").is_dir()


@pytest.mark.parametrize("quantization", ["4bit", "none"])
def test_resume_gives_the_same_next_epoch_loss(demo_catalog, tiny_models, tmp_path, interrupt, quantization):
    train.main(config(demo_catalog, tiny_models, tmp_path / "a", epochs=3, early_stopping_patience=10, quantization=quantization))
    reference = pd.read_csv(tmp_path / "a" / "tiny" / "history.csv")
    cfg = config(demo_catalog, tiny_models, tmp_path / "b", epochs=3, early_stopping_patience=10, quantization=quantization)
    with interrupt(train, "run_rows", on_call=2):  # in the second epoch's validation
        train.main(cfg)
    train.main(cfg)
    resumed = pd.read_csv(tmp_path / "b" / "tiny" / "history.csv")
    np.testing.assert_allclose(resumed["train_loss"], reference["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(resumed["selection_smape"], reference["selection_smape"], rtol=1e-5)


def test_checkpoint_is_chosen_without_the_holdout_fold(demo_catalog, tiny_models, tmp_path, monkeypatch):
    """Every row that judges an epoch comes from the training folds; the holdout fold is scored once, at the end."""
    judged = []
    real = train.run_rows

    def spy(model, token_ids, *args, **kwargs):
        judged.append([tuple(t) for t in token_ids])
        return real(model, token_ids, *args, **kwargs)

    monkeypatch.setattr(train, "run_rows", spy)
    cfg = config(demo_catalog, tiny_models, tmp_path, epochs=2, quantization="none")
    metrics = train.main(cfg)
    table = load_table(demo_catalog / "data", "train")
    tokenizer = load_tokenizer(cfg.model)
    holdout = table[table["fold"] == 0]
    holdout_ids = {tuple(t) for t in tokenize(tokenizer, [qwen_input_text(n, c) for n, c in
                                                         zip(holdout["item_name"], holdout["catalog_content"])], cfg.max_length)}
    assert len(judged) == 3  # two epochs judged on the selection slice, then one holdout pass
    for epoch_rows in judged[:2]:
        assert not holdout_ids & set(epoch_rows)
    assert set(judged[2]) <= holdout_ids
    assert "holdout fold is unseen" in metrics["selection"]


def test_frozen_encoder_steps_aside_in_training_and_extracts_base_vectors(demo_catalog, tiny_models, tmp_path):
    cfg = config(demo_catalog, tiny_models, tmp_path, finetune=False, pooling="mean", quantization="none")
    metrics = train.main(cfg)
    assert metrics["skipped"] and not (tmp_path / "tiny" / "best").exists()
    assert predict.main(cfg) is None
    extract_embeddings.main(cfg)
    # the vectors are the published encoder's mean-pooled output, not a fine-tuned one
    table = load_table(demo_catalog / "data", "train").iloc[:5]
    backbone = load_backbone(cfg.model, "none", CPU)
    tokenizer = load_tokenizer(cfg.model)
    ids, mask = collate(tokenize(tokenizer, [qwen_input_text(n, c) for n, c in zip(table["item_name"], table["catalog_content"])],
                                 cfg.max_length), range(5), tokenizer.pad_token_id, CPU, left=False)
    with torch.no_grad():
        expected = pool(backbone(input_ids=ids, attention_mask=mask).last_hidden_state, mask, "mean")
    cached = load_embeddings(tmp_path / "embeddings", "qwen_text", "train", table["sample_id"])
    np.testing.assert_allclose(cached.values[:, :-3], expected.numpy(), atol=2e-2)


def test_mean_pooling_pads_on_the_right_so_positions_do_not_shift(tiny_models):
    """A BERT-style encoder adds absolute position embeddings: left padding would change a row's vector."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32)).eval()
    model = PriceRegressor(bert, 16, 8, "mean")
    rows = [[1, 5, 7, 2], [1, 9, 9, 9, 9, 9, 2]]
    feats = np.zeros((2, 3), np.float32)
    together = run_rows(model, rows, feats, 2, 0, CPU, None, want="embed")
    alone = run_rows(model, rows[:1], feats[:1], 1, 0, CPU, None, want="embed")
    np.testing.assert_allclose(together[0], alone[0], atol=1e-5)


def test_packaged_minilm_resolves_offline_and_its_lora_targets_match():
    from qwen3_finetune.config import PROFILES as P
    from qwen3_finetune.model import resolve_model

    small = P["small"]
    folder = Path(resolve_model(small.model))
    assert (folder / "config.json").exists()
    backbone = add_lora(load_backbone(small.model, "none", CPU), small)
    assert backbone.config.hidden_size == 384 and backbone.config.attention_probs_dropout_prob == 0.0
    adapted = {n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(small.lora_targets)


def test_one_encoder_per_fold_gives_every_row_a_vector_from_an_encoder_that_never_saw_it(demo_catalog, tiny_models,
                                                                                        tmp_path, monkeypatch):
    from core.predictions import read_predictions

    seen = {}  # scored fold -> folds of the rows its encoder trained on or chose a checkpoint with
    real_rows = train.encoder_rows

    def spy(table, scored_fold, *args):
        fit, select = real_rows(table, scored_fold, *args)
        seen[scored_fold] = set(table.loc[fit | select, "fold"])
        return fit, select

    monkeypatch.setattr(train, "encoder_rows", spy)
    cfg = config(demo_catalog, tiny_models, tmp_path, epochs=1, quantization="none", encoder_folds="all")
    metrics = train.main(cfg)
    folds = sorted(load_table(demo_catalog / "data", "train")["fold"].unique().tolist())
    assert sorted(seen) == folds and all(k not in used for k, used in seen.items())
    assert sorted(map(int, metrics["val_smape_by_fold"])) == folds

    extract_embeddings.main(cfg)
    table = load_table(demo_catalog / "data", "train")
    cached = load_embeddings(tmp_path / "embeddings", "qwen_text", "train", table["sample_id"]).values
    rows = [table.index[table["fold"] == k][0] for k in folds]  # one row of every fold
    from qwen3_finetune.model import load_run, table_inputs

    by_encoder = {}
    for k in folds:
        model, scaler, tokenizer, _ = load_run(cfg, CPU, k)
        ids, feats = table_inputs(table.loc[rows], tokenizer, scaler, cfg.max_length)
        by_encoder[k] = run_rows(model, ids, feats, 8, tokenizer.pad_token_id, CPU, None, want="embed")
    for j, (k, row) in enumerate(zip(folds, rows)):
        np.testing.assert_allclose(cached[row], by_encoder[k][j], atol=2e-2)  # from the encoder blind to fold k
        assert np.abs(cached[row] - by_encoder[(k + 1) % len(folds)][j]).max() > 1e-3  # not from another one

    predict.main(cfg)
    preds = read_predictions(tmp_path / "predictions", "text_head")
    assert preds.meta["oof_kind"] == "out_of_fold" and preds.meta["encoder_unseen_folds"] == folds
    assert sorted(preds.oof["sample_id"]) == sorted(table["sample_id"])
    merged = preds.oof.merge(table[["sample_id", "fold"]], on="sample_id", suffixes=("", "_table"))
    assert (merged["fold"] == merged["fold_table"]).all()


def test_text_head_prices_a_row_alone_as_in_the_whole_test_table(demo_catalog, trained, tmp_path):
    from core.predictions import read_predictions

    cfg, _ = trained
    cfg = replace(cfg, predictions_dir=tmp_path / "predictions")
    predict.main(cfg)
    written = read_predictions(tmp_path / "predictions", "text_head").test.set_index("sample_id")["log_pred"]
    test = load_table(demo_catalog / "data", "test")
    rows = test.iloc[[11, 2, 30]].reset_index(drop=True)
    alone = predict.fold_mean_log(cfg, rows, CPU, None)
    np.testing.assert_allclose(alone, written.loc[rows["sample_id"]].to_numpy(), atol=1e-5)
