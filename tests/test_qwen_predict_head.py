"""qwen_predict prices rows by applying the trained head to the vectors qwen_extract cached, not by
running the model over the rows again; on the tiny Qwen3 the two agree to float tolerance."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from core.io import read_json, write_json
from core.predictions import read_predictions
from core.tables import holdout_fold, load_table
from qwen3_finetune import extract_embeddings, predict, train
from qwen3_finetune.config import PROFILES
from qwen3_finetune.model import load_run

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def extracted(demo_catalog, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen_head")
    cfg = replace(PROFILES["tiny"], model=str(tiny_models / "qwen3_tiny"), data_dir=demo_catalog / "data",
                  out_dir=out, embeddings_dir=out / "embeddings", predictions_dir=out / "predictions",
                  quantization="none", epochs=1, device="cpu", storage_dtype="float32")
    train.main(cfg)
    extract_embeddings.main(cfg)
    return cfg


def model_pass(cfg):
    """The text head's log predictions from a full model pass: test rows and the holdout fold's train rows."""
    test = load_table(cfg.data_dir, "test")
    scored = load_table(cfg.data_dir, "train")
    scored = scored[scored["fold"] == holdout_fold(cfg.data_dir)].reset_index(drop=True)
    encoder = load_run(cfg, CPU)
    return (dict(zip(test["sample_id"], predict.head_log(cfg, encoder, test, CPU, None))),
            dict(zip(scored["sample_id"], predict.head_log(cfg, encoder, scored, CPU, None))))


def written(cfg):
    preds = read_predictions(cfg.predictions_dir, "text_head")
    return (dict(zip(preds.test["sample_id"], preds.test["log_pred"])),
            dict(zip(preds.oof["sample_id"], preds.oof["log_pred"])))


def assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    ids = sorted(want)
    np.testing.assert_allclose([got[i] for i in ids], [want[i] for i in ids], atol=1e-5, rtol=0)


def test_predictions_from_the_cache_equal_a_model_pass(extracted, monkeypatch):
    cfg = extracted
    want_test, want_oof = model_pass(cfg)

    def no_model(*args, **kwargs):
        raise AssertionError("qwen_predict ran the model although the cache holds every row")

    monkeypatch.setattr(predict, "load_run", no_model)
    monkeypatch.setattr(predict, "run_rows", no_model)
    predict.main(cfg)
    got_test, got_oof = written(cfg)
    assert_same(got_test, want_test)
    assert_same(got_oof, want_oof)


def test_a_cache_from_other_checkpoints_is_not_read(extracted, tmp_path, monkeypatch):
    cfg = replace(extracted, predictions_dir=tmp_path / "predictions")
    # the test cache says another checkpoint made it (a retrain since): those rows go through the model
    meta_path = cfg.embeddings_dir / cfg.source_name / "test" / "meta.json"
    original = read_json(meta_path)
    vectors = original["config"]["vectors"]
    assert vectors["checkpoints"] and vectors["model"] == cfg.model
    write_json(meta_path, {**original, "config": {**original["config"],
                                                  "vectors": {**vectors, "checkpoints": {"0": "retrained"}}}})
    runs = []
    real = predict.load_run
    monkeypatch.setattr(predict, "load_run", lambda *a, **k: runs.append(a) or real(*a, **k))
    try:
        predict.main(cfg)
    finally:
        write_json(meta_path, original)
    assert len(runs) == 1  # the test rows only; the train cache still matches the run's checkpoint
    want_test, want_oof = model_pass(cfg)
    got_test, got_oof = written(cfg)
    assert_same(got_test, want_test)
    assert_same(got_oof, want_oof)
