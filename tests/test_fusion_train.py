"""The one fusion trainer on planted-signal caches: learning, reload, resume, k-fold, predict, compare."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.metrics import prices_from_log, smape
from core.submission import check_submission
from core.tables import load_table
from fusion import compare, evaluate_by_groups, predict_test, train
from fusion.blocks import BLOCKS

ROOT = Path(__file__).resolve().parents[1]


def cli(planted, out, *extra):
    return [f"data_dir={planted / 'data'}", f"embeddings_dir={planted / 'embeddings'}", f"out_dir={out}",
            "sources=img,txt,noise", "profile=tiny", *extra]


def constant_median_smape(planted):
    table = load_table(planted / "data", "train")
    val = table["fold"] == 0
    median = table.loc[~val, "price"].median()
    return smape(table.loc[val, "price"], np.full(val.sum(), median))


@pytest.fixture(scope="module")
def trained(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("fusion")
    cfg = train.parse_cli(["model=all_embeddings", *cli(planted, out, "epochs=40")])
    return cfg, train.main(cfg)


def test_all_embeddings_beats_the_constant_median_by_a_wide_margin(planted, trained):
    cfg, summary = trained
    baseline = constant_median_smape(planted)
    assert baseline > 60
    assert summary["val_smape_mean"] < 0.6 * baseline, (summary, baseline)


def test_a_noise_only_source_does_not_learn_the_price(planted, tmp_path):
    cfg = train.parse_cli(["model=qwen_clip", *cli(planted, tmp_path, "sources=noise", "epochs=15")])
    assert train.main(cfg)["val_smape_mean"] > 0.85 * constant_median_smape(planted)


def test_reloaded_checkpoint_predicts_identically(planted, trained):
    cfg, _ = trained
    fold_dir = Path(cfg.out_dir) / cfg.run_name / "fold_0"
    saved = pd.read_csv(fold_dir / "val_predictions.csv", dtype={"sample_id": str})
    model, ckpt = train.load_checkpoint(fold_dir / "best.pt")
    table = load_table(cfg.data_dir, "train")
    inputs = train.load_inputs(cfg, "train", saved["sample_id"].tolist(), torch.device("cpu"))
    log_pred = train.predict_log(model, inputs, torch.arange(len(saved)), 256, torch.device("cpu"), None)
    np.testing.assert_allclose(prices_from_log(log_pred, ckpt["price_floor"]), saved["pred"], rtol=1e-6)
    assert ckpt["price_floor"] == table.loc[table["fold"] != 0, "price"].min()
    history = pd.read_csv(fold_dir / "history.csv")
    assert history["val_smape"].min() == pytest.approx(ckpt["val_smape"])
    assert history["loss"].iloc[0] == "l1_warmup" and history["loss"].iloc[-1] == "weighted_smape"
    assert history["expert_load"].notna().all()  # the MoE head's load is logged each epoch


def test_predict_test_writes_a_checked_submission_that_beats_the_baseline(planted, trained, tmp_path):
    cfg, _ = trained
    out = predict_test.main(cfg, tmp_path / "test_out.csv")
    assert check_submission(out, planted / "raw" / "test.csv") == []
    pred = pd.read_csv(out, dtype={"sample_id": str}).set_index("sample_id")["price"]
    labels = pd.read_csv(planted / "raw" / "test_labels.csv", dtype={"sample_id": str}).set_index("sample_id")["price"]
    train_median = load_table(planted / "data", "train")["price"].median()
    assert (pred > 0).all()
    assert smape(labels, pred.loc[labels.index]) < 0.6 * smape(labels, np.full(len(labels), train_median))


def test_evaluate_by_groups_writes_table_and_plots(trained):
    cfg, _ = trained
    report = evaluate_by_groups.main(cfg)
    assert report["bin"].tolist()[-1] == "all"
    out = Path(cfg.out_dir) / cfg.run_name / "eval"
    for name in ("by_price_bin.csv", "learning_curves.png", "pred_vs_true.png", "smape_by_bin.png"):
        assert (out / name).stat().st_size > 0


def test_interrupted_training_resumes_to_the_same_history(planted, tmp_path, interrupt):
    args = ["model=qwen_clip", *cli(planted, tmp_path / "a", "epochs=6", "l1_warmup_epochs=2")]
    train.main(train.parse_cli(args))
    reference = pd.read_csv(tmp_path / "a/qwen_clip/fold_0/history.csv")

    args_b = ["model=qwen_clip", *cli(planted, tmp_path / "b", "epochs=6", "l1_warmup_epochs=2")]
    with interrupt(train, "predict_log", on_call=4):  # in the fourth epoch's validation
        train.main(train.parse_cli(args_b))
    assert len(pd.read_csv(tmp_path / "b/qwen_clip/fold_0/history.csv")) == 3
    train.main(train.parse_cli(args_b))
    resumed = pd.read_csv(tmp_path / "b/qwen_clip/fold_0/history.csv")
    np.testing.assert_allclose(resumed["train_loss"], reference["train_loss"], rtol=1e-6)
    np.testing.assert_allclose(resumed["val_smape"], reference["val_smape"], rtol=1e-6)
    with pytest.raises(train.ConfigError, match="another config"):
        train.main(train.parse_cli(args_b[:-1] + ["l1_warmup_epochs=1"]))


def test_kfold_writes_out_of_fold_predictions_and_predict_averages_folds(planted, tmp_path):
    cfg = train.parse_cli(["model=qwen_clip", *cli(planted, tmp_path, "folds=all", "epochs=4")])
    summary = train.main(cfg)
    assert summary["folds"] == [0, 1, 2, 3, 4] and len(summary["val_smape_per_fold"]) == 5
    oof = pd.read_csv(tmp_path / "qwen_clip" / "oof_predictions.csv", dtype={"sample_id": str})
    table = load_table(planted / "data", "train")
    assert oof["sample_id"].tolist() == table["sample_id"].tolist()
    assert (oof["fold"].to_numpy() == table["fold"].to_numpy()).all() and (oof["pred"] > 0).all()
    out = predict_test.main(cfg, tmp_path / "sub.csv")
    assert check_submission(out, planted / "raw" / "test.csv") == []


def test_compare_lists_every_block_and_both_models(planted, tmp_path):
    table = compare.main(cli(planted, tmp_path, "epochs=2", "l1_warmup_epochs=1"))
    assert set(table["model"]) == {"all_embeddings", "qwen_clip", *(f"block:{b}" for b in BLOCKS)}
    assert table["val_smape"].is_monotonic_increasing and table["rank"].tolist() == list(range(1, len(table) + 1))
    saved = pd.read_csv(tmp_path / "compare" / "comparison.csv")
    assert len(saved) == len(BLOCKS) + 2 and "smape $0-5" in saved.columns and "parameters" in saved.columns


def test_command_line_entry_points(planted, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", *a], cwd=ROOT, capture_output=True, text=True,
                                    env={"PRICE_NO_PROGRESS": "1", "PATH": "/usr/bin:/bin"})
    result = run("fusion.all_embeddings.train", *cli(planted, tmp_path, "epochs=2"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "all_embeddings" / "fold_0" / "best.pt").exists()
    bad = run("fusion.train", "model=all_embeddings", "learning_rate=1")
    assert bad.returncode != 0 and "Valid keys" in bad.stderr and "lr" in bad.stderr


def test_trainer_adds_the_energy_penalty_to_the_loss(planted, tmp_path):
    energies = {}
    for weight in (0.0, 5.0):
        args = cli(planted, tmp_path / str(weight), "architecture=block", "block=energy_aware", "epochs=8",
                   f"energy_weight={weight}", "energy_budget=1.0", "l1_warmup_epochs=0", "early_stopping_patience=100")
        cfg = train.parse_cli(["model=qwen_clip", *args])
        train.main(cfg)
        model, _ = train.load_checkpoint(tmp_path / str(weight) / "qwen_clip" / "fold_0" / "best.pt")
        inputs = train.load_inputs(cfg, "train", load_table(planted / "data", "train")["sample_id"], torch.device("cpu"))
        train.predict_log(model, inputs, torch.arange(200), 256, torch.device("cpu"), None)
        energies[weight] = float(model.block.last_energy)
    assert energies[5.0] < energies[0.0] - 0.1, energies  # the penalty moved the router to cheaper paths
