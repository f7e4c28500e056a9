"""The mixture of experts keeps every expert in use and routes planted price regimes apart; its load is
written where the ensemble and the report read it."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from core.embedding_cache import EmbeddingCacheWriter
from core.io import read_json
from core.predictions import read_predictions
from core.tables import load_table
from fusion import inference, predict_test, train


def write_regimes(root, n_train=1200, n_test=150, seed=0):
    """Three price regimes, each with its own linear rule in one variable `x`: log price =
    a_r + b_r * x, with slopes of opposite sign, so one rule fitted to all rows explains little.
    Source `kind` (tabular) carries the regime (a noisy one-hot), source `size` (text) carries x."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    regime, x = rng.integers(0, 3, n), rng.normal(size=n)
    intercept, slope = np.array([1.5, 3.0, 4.5]), np.array([0.8, -0.8, 0.4])
    log_price = intercept[regime] + slope[regime] * x + rng.normal(0, 0.05, n)
    ids = [f"r{i}" for i in range(n)]
    rows = pd.DataFrame({"sample_id": ids, "item_name": "", "text": "", "value": 1.0, "unit": "Count",
                         "quantity_value": 1.0, "unit_volume": 0.0, "unit_weight": 0.0, "image_path": "",
                         "has_image": False})
    data = root / "data"
    data.mkdir(parents=True)
    rows.iloc[:n_train].assign(price=np.expm1(log_price[:n_train]), log_price=log_price[:n_train],
                               fold=rng.integers(0, 5, n_train)).to_parquet(data / "train.parquet", index=False)
    rows.iloc[n_train:].to_parquet(data / "test.parquet", index=False)
    (data / "prepare.json").write_text(json.dumps({"complete": True, "config": {
        "holdout_fold": 0, "n_folds": 5, "raw_dir": str(root / "raw")}}))
    kind = np.eye(3)[regime] + rng.normal(0, 0.1, (n, 3))
    size = np.outer(x, rng.normal(size=8)) + rng.normal(0, 0.05, (n, 8))
    for name, modality, values in (("kind", "tabular", kind), ("size", "text", size)):
        for split, part in (("train", slice(0, n_train)), ("test", slice(n_train, n))):
            writer = EmbeddingCacheWriter(root / "embeddings", name, split, ids[part], dim=values.shape[1],
                                          modality=modality, model="planted", dtype="float32", chunk_size=4096)
            for chunk, start, stop in writer.pending_chunks():
                writer.write_chunk(chunk, values[part][start:stop], np.ones(stop - start, bool))
            writer.finalize()
    return regime[:n_train]


@pytest.fixture(scope="module")
def single_thread():
    # these small models train several times faster on one thread than on two contended ones
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def regimes_run(tmp_path_factory, single_thread):
    root = tmp_path_factory.mktemp("regimes")
    regime = write_regimes(root)
    # small experts, each row on its top 2 of 3: one expert cannot fit all three rules, so routing by regime pays
    cfg = train.parse_cli(["model=all_embeddings", "profile=tiny", f"data_dir={root / 'data'}",
                           f"embeddings_dir={root / 'embeddings'}", f"out_dir={root / 'fusion'}",
                           f"predictions_dir={root / 'predictions'}", "sources=kind,size", "expert_dims=16",
                           "router_top_k=2", "epochs=40"])
    return cfg, train.main(cfg), regime


def test_every_expert_carries_load_and_each_regime_has_its_own_expert(regimes_run):
    cfg, summary, regime = regimes_run
    table = load_table(cfg.data_dir, "train")
    scored = np.flatnonzero(table["fold"].to_numpy() == 0)
    model, _ = inference.load_checkpoint(cfg.out_dir / cfg.run_name / "fold_0" / "best.pt")
    inputs = inference.load_inputs(cfg, "train", table["sample_id"].tolist(), torch.device("cpu"))
    _, load = inference.predict_with_load(model, inputs, torch.from_numpy(scored), 4096, torch.device("cpu"), None)
    choice = model.head.router.last_choice.numpy()
    assert min(load) >= 0.10, load
    assert summary["expert_load"] == pytest.approx(load, abs=1e-3)  # the run's metrics.json says the same
    shares = np.zeros((3, 3))
    np.add.at(shares, (regime[scored], choice), 1)
    shares /= shares.sum(1, keepdims=True)  # row r: where regime r's rows went
    main_expert = shares.argmax(1)
    assert len(set(main_expert.tolist())) == 3, shares  # a different expert for each regime
    assert (shares.max(1) > 0.6).all(), shares  # each regime mostly to it
    assert summary["val_smape_mean"] < 30, summary  # and the model fits the rules (constant median: ~100)


def test_expert_load_is_written_to_the_predictions_meta_and_the_run_sidecar(regimes_run, tmp_path):
    cfg, summary, _ = regimes_run
    predict_test.main(cfg, tmp_path / "test_out.csv")
    meta = read_predictions(cfg.predictions_dir, cfg.run_name).meta
    load = meta["expert_load"]
    assert isinstance(load, list) and len(load) == cfg.n_experts and sum(load) == pytest.approx(1.0, abs=1e-3)
    assert load == pytest.approx(summary["expert_load"], abs=1e-3)
    assert "fraction of the scored rows" in meta["expert_load_note"]
    run_metrics = read_json(cfg.out_dir / cfg.run_name / "metrics.json")
    assert run_metrics["expert_load"] == load and run_metrics["expert_load_note"] == meta["expert_load_note"]
