"""Pricing new rows with a trained root (score.py, routed from `python -m pipeline score=...`): no
training, the root untouched, the run's own prices for its own rows, resume, portability, bad input."""
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pipeline
import score
from core.config import ConfigError
from core.io import read_json, write_json
from data.prepare import DataValidationError

# every model out of fold, so the stored blend needs every kind of model: heads, both fusion runs,
# the text head and the CLIP head (each with one encoder per fold)
TRAIN = ["profile=tiny", "synthetic.n_train=400", "synthetic.n_test=100", "clip.epochs=2", "qwen.epochs=1",
         "all_embeddings.epochs=4", "qwen_clip.epochs=4", "all_embeddings.folds=all", "qwen_clip.folds=all",
         "clip.encoder_folds=all", "qwen.encoder_folds=all"]


_TRAINED: dict[str, Path] = {}


def trained_root(tmp_path_factory) -> Path:
    """One trained root per test session, shared by the scoring test files; each only reads it (a
    test that changes it puts it back)."""
    if "root" not in _TRAINED:
        root = tmp_path_factory.mktemp("trained") / "root"
        pipeline.main([*TRAIN, f"root={root}"])
        _TRAINED["root"] = root
    return _TRAINED["root"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_root(tmp_path_factory)


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def new_rows(root: Path) -> pd.DataFrame:
    """The root's own test rows, with image links that do not depend on the CSV's folder."""
    rows = pd.read_csv(root / "raw" / "test.csv", dtype=str, keep_default_na=False)
    rows["image_link"] = [str(root / "raw" / link) if link and not link.startswith(("http", "/")) else link
                          for link in rows["image_link"]]
    return rows


def write_csv(rows: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(path, index=False)
    return path


def prices(path: Path) -> pd.Series:
    return pd.read_csv(path, dtype={"sample_id": str}).set_index("sample_id")["price"]


def assert_root_prices(out: Path, root: Path) -> None:
    """Every row of `out` has the price the root's test_out.csv gives it. Rows scored without the rest
    of the root's test file reach the text encoder in other batches (other padding, other matrix
    shapes), which moves a price in its fourth digit at most; a lost image moves it by percents."""
    ours = prices(out)
    ratio = ours.to_numpy() / prices(root / "test_out.csv").loc[ours.index].to_numpy()
    assert np.max(np.abs(ratio - 1)) < 1e-3


def test_a_root_prices_its_own_test_rows_as_it_did_and_stays_unchanged(trained, tmp_path, monkeypatch):
    from clip_finetune import train as clip_train
    from fusion import train as fusion_train
    from heads import train as heads_train
    from qwen3_finetune import train as qwen_train

    for module in (clip_train, qwen_train, fusion_train, heads_train):
        monkeypatch.setattr(module, "main", lambda *a, **k: pytest.fail("a training stage ran while scoring"))
    before = tree_digest(trained)
    new_csv = write_csv(new_rows(trained), tmp_path / "new" / "test.csv")
    out = tmp_path / "out" / "prices.csv"  # a folder that does not exist yet is made
    pipeline.main([f"root={trained}", f"score={new_csv}", f"out={out}"])
    assert tree_digest(trained) == before
    ours, theirs = prices(out), prices(trained / "test_out.csv")
    assert list(ours.index) == list(theirs.index)
    # one chunk in the run's order: the same batches through the same code, so the same floats
    assert np.array_equal(ours.to_numpy(), theirs.to_numpy())
    assert not Path(str(out) + score.SCRATCH_SUFFIX).exists()  # nothing worth keeping: the images were local


def test_chunked_scoring_gives_each_row_its_price_and_new_rows_their_own(trained, tmp_path):
    rows = new_rows(trained)
    changed = rows.iloc[:10].copy()
    changed["sample_id"] = "new-" + changed["sample_id"]
    changed["catalog_content"] = changed["catalog_content"].str.replace("Value: ", "Value: 1", n=1)
    new_csv = write_csv(pd.concat([changed, rows], ignore_index=True), tmp_path / "new.csv")
    out = tmp_path / "prices.csv"
    score.score_file(trained, new_csv, out, chunk_rows=30)
    ours, theirs = prices(out), prices(trained / "test_out.csv")
    assert len(ours) == 110
    # other chunks give the text encoder other batches (padding, matrix shapes): its floats move in the
    # last digits, which a tree split near a threshold can turn into a visible change on a rare row
    ratio = np.abs(ours.loc[theirs.index].to_numpy() / theirs.to_numpy() - 1)
    assert np.mean(ratio < 1e-4) >= 0.95 and ratio.max() < 1e-2
    assert (np.abs(ours.loc[changed["sample_id"]].to_numpy() / theirs.iloc[:10].to_numpy() - 1) > 1e-3).mean() > 0.5


def test_a_killed_scoring_resumes_at_its_first_unfinished_chunk_to_the_same_bytes(trained, tmp_path, monkeypatch):
    new_csv = write_csv(new_rows(trained), tmp_path / "new.csv")
    whole = score.score_file(trained, new_csv, tmp_path / "whole.csv", chunk_rows=40)

    calls = []
    price_chunk = score.Scorer.price_chunk

    def counted(dies_on=None):
        def run(self, rows, *args):
            calls.append(rows["sample_id"].iloc[0])
            if len(calls) == dies_on:
                raise KeyboardInterrupt("killed")
            return price_chunk(self, rows, *args)
        return run

    monkeypatch.setattr(score.Scorer, "price_chunk", counted(dies_on=3))
    out = tmp_path / "resumed.csv"
    with pytest.raises(KeyboardInterrupt):
        score.score_file(trained, new_csv, out, chunk_rows=40)
    assert not out.exists()  # no partial output
    calls.clear()
    monkeypatch.setattr(score.Scorer, "price_chunk", counted())
    score.score_file(trained, new_csv, out, chunk_rows=40)
    assert len(calls) == 1  # chunks 1 and 2 were kept; only chunk 3 ran
    assert out.read_bytes() == whole.read_bytes()


def test_a_copied_root_scores_identically_without_the_original(trained, tmp_path, capsys):
    new_csv = write_csv(new_rows(trained), tmp_path / "new.csv")
    first = score.score_file(trained, new_csv, tmp_path / "first.csv")
    copy = tmp_path / "elsewhere" / "root"
    shutil.copytree(trained, copy)
    away = trained.with_name("root_away")
    trained.rename(away)
    try:  # the rows' image links point into the copy
        out = score.score_file(copy, write_csv(new_rows(copy), tmp_path / "copied.csv"), tmp_path / "copy.csv")
    finally:
        away.rename(trained)
    assert out.read_bytes() == first.read_bytes()
    # other package versions than the run was trained with: scored all the same, with one warning
    state = read_json(copy / "pipeline_state.json")
    state["trained_with"]["versions"]["numpy"] = "0.0.1"
    write_json(copy / "pipeline_state.json", state)
    capsys.readouterr()
    score.score_file(copy, tmp_path / "copied.csv", tmp_path / "other_versions.csv")
    warnings = [line for line in capsys.readouterr().out.splitlines() if "other package versions" in line]
    assert len(warnings) == 1 and "numpy 0.0.1 -> " in warnings[0]


def test_a_price_column_is_dropped_before_any_model(trained, tmp_path, capsys):
    rows = new_rows(trained)
    plain = score.score_file(trained, write_csv(rows, tmp_path / "plain.csv"), tmp_path / "plain_out.csv")
    capsys.readouterr()
    priced = score.score_file(trained, write_csv(rows.assign(price="99999"), tmp_path / "priced.csv"),
                              tmp_path / "priced_out.csv")
    assert "has a 'price' column; it is dropped" in capsys.readouterr().out
    assert priced.read_bytes() == plain.read_bytes()


def test_training_rows_are_counted_and_broken_or_outside_images_are_masked(trained, tmp_path, capsys):
    train = pd.read_csv(trained / "raw" / "train.csv", dtype=str, keep_default_na=False).iloc[:7]
    train = train.drop(columns="price").assign(image_link="")
    rows = pd.read_csv(trained / "raw" / "test.csv", dtype=str, keep_default_na=False).iloc[:20].copy()
    images = tmp_path / "images_here"  # image_dir=: the rows' relative links are read from here
    shutil.copytree(trained / "raw" / "images", images / "images")
    (images / "images" / "broken.png").write_bytes(b"not a png")
    rows.loc[rows.index[0], "image_link"] = "images/broken.png"
    rows.loc[rows.index[1], "image_link"] = str(trained / "raw" / rows["image_link"].iloc[1])  # outside image_dir
    out = score.score_file(trained, write_csv(pd.concat([train, rows]), tmp_path / "new.csv"), tmp_path / "out.csv",
                           image_dir=images)
    log = capsys.readouterr().out
    assert "7 of 27 rows of new.csv are training rows" in log
    assert "failed:corrupt" in log and "skipped:no link 7" in log and "refused:outside image root 1" in log
    assert len(prices(out)) == 27


def test_bad_input_is_named_and_leaves_no_output(trained, tmp_path):
    rows = new_rows(trained).iloc[:12]
    out = tmp_path / "out.csv"

    def fails(csv_path, match, error=DataValidationError, **kwargs):
        with pytest.raises(error, match=match):
            score.score_file(kwargs.pop("root", trained), csv_path, kwargs.pop("out", out), **kwargs)
        assert not out.exists() and not Path(str(out) + score.SCRATCH_SUFFIX).exists()

    fails(write_csv(rows.drop(columns="image_link"), tmp_path / "a.csv"), r"missing column\(s\) \['image_link'\]")
    duplicate = pd.concat([rows, rows.iloc[[3]]])
    fails(write_csv(duplicate, tmp_path / "b.csv"), r"b.csv line \d+ \(sample_id .*duplicate of line",
          chunk_rows=5)
    latin = tmp_path / "c.csv"
    write_csv(rows, latin)
    latin.write_bytes(latin.read_bytes().replace(b"Item Name: ", b"Item Name: caf\xe9 ", 1))
    fails(latin, r"c.csv line 2 .*expected UTF-8 text, got byte\(s\) \\xe9")
    good = write_csv(rows, tmp_path / "good.csv")
    fails(good, "lies inside the trained root", score.ScoringError, out=trained / "prices.csv")
    fails(good, "not a trained pipeline root", score.ScoringError, root=tmp_path / "nothing")
    state_path = trained / "pipeline_state.json"
    state = read_json(state_path)
    write_json(state_path, {**state, "heads": {**state["heads"], "complete": False}})
    try:
        fails(good, r"stage 'heads' has not finished.*python -m pipeline profile=tiny root=", score.ScoringError)
    finally:
        write_json(state_path, state)
    with pytest.raises(ConfigError, match="trained with profile=tiny"):
        pipeline.main([f"root={trained}", f"score={good}", f"out={out}", "profile=small"])
    with pytest.raises(ConfigError, match="only placement keys"):
        pipeline.main([f"root={trained}", f"score={good}", f"out={out}", "qwen.lora_r=4"])


def _score_rank(rank, root, new_csv, out, port, record_dir):
    """One torchrun-like process scoring the file; records the cache chunks it encoded."""
    import json
    import os

    import torch

    from core.embedding_cache import EmbeddingCacheWriter

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), PRICE_NO_PROGRESS="1")
    torch.set_num_threads(1)
    written = []
    real_write = EmbeddingCacheWriter.write_chunk

    def write_chunk(self, chunk, vectors, present=None):
        written.append([self.meta["source"], chunk])
        return real_write(self, chunk, vectors, present)

    EmbeddingCacheWriter.write_chunk = write_chunk
    score.score_file(root, new_csv, out, chunk_rows=60, placement=["device=cpu", "chunk_size=16", "num_workers=0"])
    (Path(record_dir) / f"rank{rank}.json").write_text(json.dumps(written))


def test_under_torchrun_the_ranks_share_the_encoding_and_the_prices_are_the_same(trained, tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    new_csv = write_csv(new_rows(trained), tmp_path / "new.csv")
    single = score.score_file(trained, new_csv, tmp_path / "single.csv", chunk_rows=60,
                              placement=["device=cpu", "chunk_size=16", "num_workers=0"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "sharded.csv"
    mp.spawn(_score_rank, args=(trained, new_csv, out, port, tmp_path), nprocs=2, join=True)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, record in enumerate(records):
        qwen_chunks = [chunk for source, chunk in record if source == "qwen_text"]
        assert qwen_chunks and all(chunk % 2 == rank for chunk in qwen_chunks)
    assert out.read_bytes() == single.read_bytes()
