"""bench.scale: every stage after the encoders runs on its synthetic catalogs, its table adds up, its
scoring prices rows as the run's own test_out.csv does, and its memory sampler counts worker processes."""
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from bench import scale

WORDS = "organic dark roast coffee whole bean arabica vanilla almond snack bar protein gluten free pasta olive oil".split()


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    rng = np.random.default_rng(0)
    real = tmp / "real.csv"
    pd.DataFrame({"catalog_content": [" ".join(rng.choice(WORDS, size=12)) for _ in range(50)]}).to_csv(real, index=False)
    table = scale.main(["sizes=250,500", f"work={tmp / 'work'}", "profile=tiny", f"real={real}", "score_rows=40",
                        "heads.n_jobs=1"])
    return tmp / "work", table


def test_every_stage_after_the_encoders_has_a_line_at_every_size(scaled):
    _, table = scaled
    pieces = set(table["piece"])
    for needed in ("prepare (with writing the catalog)", "heads: TF-IDF", "heads: neighbour search, train rows, tfidf",
                   "heads: neighbour search, test rows, qwen_text", "heads: lgbm", "heads: mlp", "heads: the whole stage",
                   "evaluate", "predict", "ensemble", "report", "scoring: price 40 rows (heads, fusion, blend)",
                   "CPU stages: prepare, heads, ensemble, report"):
        assert needed in pieces, needed
    assert any(p.startswith("fusion_all (1 epoch per fold") for p in pieces)
    assert (table.groupby("piece")["rows"].nunique() == 2).all()
    assert (table["seconds"] >= 0).all() and (table["peak_gib"] > 0).all()


def test_the_table_adds_up(scaled):
    _, table = scaled
    for n, rows in table.groupby("rows"):
        seconds = rows.set_index("piece")["seconds"]
        inside = rows[rows["piece"].str.startswith("heads: ") & (rows["piece"] != "heads: the whole stage")]
        # the whole stage holds its pieces and little else
        assert inside["seconds"].sum() <= seconds["heads: the whole stage"] + 0.05
        assert inside["seconds"].sum() >= 0.8 * seconds["heads: the whole stage"]
        cpu = seconds[["prepare (with writing the catalog)", "heads: the whole stage", "ensemble", "report"]].sum()
        assert seconds["CPU stages: prepare, heads, ensemble, report"] == pytest.approx(cpu, abs=0.05)


def test_scoring_prices_the_rows_as_the_runs_own_submission(scaled):
    work, _ = scaled
    for n in (250, 500):
        scored = pd.read_csv(work / f"n{n}" / "scoring" / "prices.csv", dtype={"sample_id": str})
        submitted = pd.read_csv(work / f"n{n}" / "test_out.csv", dtype={"sample_id": str}).set_index("sample_id")
        assert len(scored) == 40
        np.testing.assert_allclose(scored["price"], submitted.loc[scored["sample_id"], "price"], rtol=1e-6)


def test_the_memory_sampler_counts_worker_processes():
    page = os.sysconf("SC_PAGE_SIZE")
    before = scale.tree_rss(page)
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(400 * 2**20); time.sleep(30)"])
    try:
        deadline, grown = time.time() + 20, 0
        while time.time() < deadline and grown < 350 * 2**20:
            time.sleep(0.2)
            grown = scale.tree_rss(page) - before
        assert grown >= 350 * 2**20
    finally:
        child.kill()
        child.wait()
