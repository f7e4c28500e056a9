"""A fitted heads run prices rows without refitting: a fresh process that loads the saved run writes
the very test predictions the fit wrote (and never reads the train table), a row's price does not
depend on the rows priced with it, and a missing, incomplete or half-saved run is refused clearly."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.embedding_cache import load_embeddings
from core.predictions import read_predictions
from core.tables import load_table
from heads import predict, train
from heads.config import HEADS, profile
from test_heads import planted_tables, write_tables, write_text_cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Every head fitted once on the planted catalog with a text cache (knn in the cache's space)."""
    root = tmp_path_factory.mktemp("heads_run")
    train_df, test_df = planted_tables(n_train=500, n_test=80)
    write_text_cache(root / "embeddings", train_df, test_df)
    cfg = profile("tiny", data_dir=write_tables(root / "data", train_df, test_df), embeddings_dir=root / "embeddings",
                  predictions_dir=root / "predictions", out_dir=root / "run", heads=list(HEADS),
                  embedding_sources=["txt"], knn_space="txt", lgbm_rounds=60)
    train.main(cfg)
    return cfg


def fitted_test_predictions(cfg) -> dict:
    return {head: read_predictions(cfg.predictions_dir, head).test.set_index("sample_id").log_pred for head in cfg.heads}


def test_a_fresh_process_prices_the_test_rows_as_the_fit_did_without_the_train_table(fitted, tmp_path):
    cfg = fitted
    before = fitted_test_predictions(cfg)
    oof_before = {h: read_predictions(cfg.predictions_dir, h).oof for h in cfg.heads}
    tabular_test = (cfg.embeddings_dir / "text_tabular" / "test" / "embeddings.npy").read_bytes()
    sidecar = json.loads((cfg.out_dir / "run.json").read_text())
    assert sidecar["complete"] and sidecar["heads"] == list(HEADS) and sidecar["folds"] == [0, 1, 2, 3, 4]
    assert {"scikit-learn", "lightgbm"} <= set(sidecar["versions"])
    assert "txt_nb_weighted_log_price" in sidecar["features"]["lgbm"][0] and len(sidecar["features"]["lgbm"]) == 5
    assert len(list((cfg.out_dir / "lgbm" / "lgbm_per_qty").glob("fold_*.txt"))) == 5

    # the train table changes after the fit (prices shuffled): a predict step that read it would move
    train_path = cfg.data_dir / "train.parquet"
    original = train_path.read_bytes()
    shuffled = pd.read_parquet(train_path)
    shuffled["price"] = np.random.default_rng(0).permutation(shuffled["price"].to_numpy())
    shuffled["log_price"] = np.log1p(shuffled["price"])
    try:
        shuffled.to_parquet(train_path, index=False)
        (cfg.embeddings_dir / "text_tabular" / "test").rename(tmp_path / "tabular_test")  # the predict step rewrites it
        done = subprocess.run(
            [sys.executable, "-m", "heads.predict", "profile=tiny", f"data_dir={cfg.data_dir}",
             f"embeddings_dir={cfg.embeddings_dir}", f"predictions_dir={cfg.predictions_dir}", f"out_dir={cfg.out_dir}"],
            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PRICE_NO_PROGRESS": "1"}, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        train_path.write_bytes(original)
    after = fitted_test_predictions(cfg)
    for head in cfg.heads:
        assert list(after[head].index) == list(before[head].index)
        np.testing.assert_allclose(after[head].to_numpy(), before[head].to_numpy(), rtol=0, atol=1e-6, err_msg=head)
        pd.testing.assert_frame_equal(read_predictions(cfg.predictions_dir, head).oof, oof_before[head])
    assert (cfg.embeddings_dir / "text_tabular" / "test" / "embeddings.npy").read_bytes() == tabular_test

    # control: the run's saved train prices do drive the prices (shuffling them moves knn by far more)
    run = predict.load_run(cfg.out_dir)
    table = load_table(cfg.data_dir, "test")
    vectors = predict.load_row_vectors(run, cfg.embeddings_dir, "test", table.sample_id)
    run.targets["log1p"] = np.random.default_rng(0).permutation(run.targets["log1p"])
    moved = predict.predict_rows(run, table, vectors)["knn"]
    assert np.abs(moved - before["knn"].to_numpy()).mean() > 0.2


def test_a_row_gets_the_same_price_alone_in_a_chunk_or_in_the_whole_table(fitted):
    cfg = fitted
    run = predict.load_run(cfg.out_dir)
    table = load_table(cfg.data_dir, "test").reset_index(drop=True)
    ids = table.sample_id.astype(str).to_numpy()
    cached = load_embeddings(cfg.embeddings_dir, "txt", "test", ids)
    assert not cached.present.all()  # rows without a vector are priced too
    vectors = {"txt": (cached.values, cached.present)}
    whole = predict.predict_rows(run, table, vectors)
    written = fitted_test_predictions(cfg)
    for head in cfg.heads:
        np.testing.assert_allclose(whole[head], written[head].loc[ids].to_numpy(), rtol=0, atol=1e-6, err_msg=head)

    some = slice(10, 30)
    part = predict.predict_rows(run, table.iloc[some], {"txt": (cached.values[some], cached.present[some])})
    order = np.random.default_rng(1).permutation(len(table))  # the same rows in another order
    shuffled = predict.predict_rows(run, table.iloc[order], {"txt": (cached.values[order], cached.present[order])})
    chunked, _ = predict.price_table(run, table, vectors, rows_per_chunk=7)
    alone = predict.predict_rows(run, table.iloc[[13]], {"txt": (cached.values[[13]], cached.present[[13]])})
    for head in cfg.heads:
        np.testing.assert_allclose(part[head], whole[head][some], rtol=0, atol=1e-6, err_msg=head)
        np.testing.assert_allclose(shuffled[head], whole[head][order], rtol=0, atol=1e-6, err_msg=head)
        np.testing.assert_allclose(chunked[head], whole[head], rtol=0, atol=1e-6, err_msg=head)
        np.testing.assert_allclose(alone[head], whole[head][[13]], rtol=0, atol=1e-6, err_msg=head)
    # the heads differ from one another: the comparison is not between constants
    assert np.std(whole["lgbm"]) > 0.3 and np.abs(whole["lgbm"] - whole["knn"]).mean() > 0.01


def test_a_missing_or_incomplete_run_is_refused_with_the_command_that_makes_it(fitted, tmp_path):
    missing = tmp_path / "never_fitted"
    with pytest.raises(predict.RunError, match=f"{missing}.*python -m heads.train out_dir={missing}"):
        predict.load_run(missing)

    partial = tmp_path / "partial"
    shutil.copytree(fitted.out_dir, partial)
    (partial / "lgbm" / "lgbm" / "fold_3.txt").unlink()
    with pytest.raises(predict.RunError, match=r"partial.*incomplete.*lgbm/lgbm/fold_3.txt.*python -m heads.train"):
        predict.load_run(partial)

    meta = json.loads((partial / "run.json").read_text())
    (partial / "run.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(predict.RunError, match="incomplete"):
        predict.load_run(partial)

    # the script says the same through its error line
    cfg = profile("tiny", data_dir=fitted.data_dir, embeddings_dir=fitted.embeddings_dir,
                  predictions_dir=fitted.predictions_dir, out_dir=missing)
    with pytest.raises(predict.RunError, match="python -m heads.train"):
        predict.main(cfg)


def test_a_crash_while_saving_leaves_the_earlier_run_whole(fitted, tmp_path, interrupt):
    out = tmp_path / "run"
    shutil.copytree(fitted.out_dir, out)
    run = predict.load_run(out)
    saved_fallback = run.knn_fallback["log1p"][0]
    run.knn_fallback["log1p"][0] = 123.0
    with interrupt(predict, "write_json", on_call=1):  # the last file of a save
        predict.save_run(run, out)
    assert predict.load_run(out).knn_fallback["log1p"][0] == saved_fallback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no half-saved folder beside it
    predict.save_run(run, out)
    assert predict.load_run(out).knn_fallback["log1p"][0] == 123.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_rows_need_every_cache_the_run_reads(fitted):
    run = predict.load_run(fitted.out_dir)
    table = load_table(fitted.data_dir, "test").iloc[:5]
    with pytest.raises(predict.RunError, match="'txt' cache"):
        predict.predict_rows(run, table, {})
    with pytest.raises(predict.RunError, match="dim 16"):
        predict.predict_rows(run, table, {"txt": (np.zeros((5, 8)), np.ones(5, bool))})


def test_loading_a_run_refits_the_sparse_tfidf_only_for_the_sparse_neighbour_space(fitted, tmp_path, monkeypatch):
    from heads.features import TfidfText

    refits = []
    real_refit = TfidfText.train_matrix
    monkeypatch.setattr(TfidfText, "train_matrix", lambda self, text: refits.append(len(text)) or real_refit(self, text))
    table = load_table(fitted.data_dir, "test")

    # the default: the TF-IDF neighbour space is its SVD's, saved with the run; nothing is refitted
    run = predict.load_run(fitted.out_dir)
    prices = predict.predict_rows(run, table, predict.load_row_vectors(run, fitted.embeddings_dir, "test",
                                                                      table.sample_id))
    assert refits == [] and run.train_tfidf is None
    written = fitted_test_predictions(fitted)
    for head in ("lgbm", "knn"):  # lgbm reads the TF-IDF neighbours' columns
        np.testing.assert_allclose(prices[head], written[head].loc[table.sample_id.astype(str)].to_numpy(),
                                   rtol=0, atol=1e-6, err_msg=head)

    # tfidf_neighbour_dims=0: knn searches the sparse TF-IDF, refitted once on first use, as the fit priced
    cfg = profile("tiny", data_dir=fitted.data_dir, embeddings_dir=fitted.embeddings_dir,
                  predictions_dir=tmp_path / "predictions", out_dir=tmp_path / "run", heads=["knn"],
                  embedding_sources=[], knn_space="tfidf", tfidf_neighbour_dims=0)
    train.main(cfg)
    refits.clear()
    run = predict.load_run(cfg.out_dir)
    assert refits == [] and run.tfidf_vectors is None
    sparse = predict.predict_rows(run, table, {})["knn"]
    assert refits == [len(run.train_ids)]
    written = read_predictions(cfg.predictions_dir, "knn").test.set_index("sample_id").log_pred
    np.testing.assert_allclose(sparse, written.loc[table.sample_id.astype(str)].to_numpy(), rtol=0, atol=1e-6)
