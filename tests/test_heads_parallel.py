"""The heads on several cores give the very bytes one core gives: folds, ridge fits, LightGBM fits and
network seeds run at once, each seeded on its own and on one thread, so the order they run in and the
number of workers move nothing."""
import numpy as np
import pandas as pd

from core.predictions import read_predictions
from heads import train
from heads.config import profile
from test_heads import planted_tables, write_tables, write_text_cache


def fitted_predictions(root, train_df, test_df, n_jobs):
    write_text_cache(root / "embeddings", train_df, test_df)
    cfg = profile("tiny", data_dir=write_tables(root / "data", train_df, test_df), embeddings_dir=root / "embeddings",
                  predictions_dir=root / "predictions", out_dir=root / "run", embedding_sources=["txt"],
                  heads=["ridge", "knn", "lgbm", "mlp"], lgbm_rounds=20, mlp_epochs=3, n_jobs=n_jobs)
    train.main(cfg)
    return {head: read_predictions(cfg.predictions_dir, head) for head in cfg.heads}


def test_one_and_two_workers_write_identical_predictions(tmp_path):
    train_df, test_df = planted_tables(n_train=250, n_test=40)
    serial = fitted_predictions(tmp_path / "serial", train_df, test_df, n_jobs=1)
    parallel = fitted_predictions(tmp_path / "parallel", train_df, test_df, n_jobs=2)
    for head in serial:
        for half in ("oof", "test"):
            a, b = getattr(serial[head], half), getattr(parallel[head], half)
            pd.testing.assert_frame_equal(a, b, check_exact=True, obj=f"{head} {half}")
            assert a.log_pred.to_numpy().tobytes() == b.log_pred.to_numpy().tobytes()
    for head in serial:  # not constants compared
        assert np.std(serial[head].oof.log_pred) > 0.01, head


def test_lightgbm_trees_do_not_depend_on_its_thread_count():
    rng = np.random.default_rng(0)
    x = pd.DataFrame(rng.normal(size=(2000, 30)))
    y = x[0] + np.sin(x[1]) + rng.normal(0, 0.3, 2000)
    cfg = profile("tiny", lgbm_rounds=50)
    one, two = (train.fit_lgbm_fold(x, y, cfg, threads) for threads in (1, 2))
    assert one.predict(x).tobytes() == two.predict(x).tobytes()


def test_the_cores_are_shared_among_the_lightgbm_folds():
    assert train.lgbm_layout(profile("tiny"), 2, 5) == (2, 1)
    assert train.lgbm_layout(profile("tiny"), 16, 5) == (5, 3)
    assert train.lgbm_layout(profile("tiny", lgbm_threads=4), 16, 5) == (4, 4)
