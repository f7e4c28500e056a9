"""The embedding cache contract: chunked writes, resume to the same bytes, loud failures on read."""
import json
import subprocess
import sys

import numpy as np
import pytest

from core.embedding_cache import CacheError, EmbeddingCacheWriter, load_embeddings


def encode(ids):
    """A deterministic stand-in encoder: row i of id s is a function of s."""
    return np.stack([np.random.default_rng(int(s)).normal(size=6) for s in ids]).astype(np.float32)


def extract(root, ids, present=None, stop_after=None, **kw):
    writer = EmbeddingCacheWriter(root, "src", "train", ids, dim=6, modality="image", model="m", chunk_size=4, **kw)
    done = 0
    for chunk, start, stop in writer.pending_chunks():
        if stop_after is not None and done == stop_after:
            raise KeyboardInterrupt  # simulated crash mid-extraction
        writer.write_chunk(chunk, encode(ids[start:stop]), None if present is None else present[start:stop])
        done += 1
    writer.finalize()
    return writer


IDS = [str(1000 + i) for i in range(10)]


def test_interrupted_extraction_resumes_to_the_same_bytes(tmp_path):
    extract(tmp_path / "a", IDS)
    with pytest.raises(KeyboardInterrupt):
        extract(tmp_path / "b", IDS, stop_after=2)
    with pytest.raises(CacheError, match="incomplete"):
        load_embeddings(tmp_path / "b", "src", "train")
    calls = []
    writer = EmbeddingCacheWriter(tmp_path / "b", "src", "train", IDS, dim=6, modality="image", model="m", chunk_size=4)
    pending = writer.pending_chunks()
    assert [c for c, _, _ in pending] == [2]  # only the chunk that was never written
    for chunk, start, stop in pending:
        calls.append(chunk)
        writer.write_chunk(chunk, encode(IDS[start:stop]))
    writer.finalize()
    a = (tmp_path / "a/src/train/embeddings.npy").read_bytes()
    b = (tmp_path / "b/src/train/embeddings.npy").read_bytes()
    assert a == b and calls == [2]
    meta = json.loads((tmp_path / "b/src/train/meta.json").read_text())
    assert meta["complete"] and meta["dim"] == 6 and meta["modality"] == "image"


def test_complete_cache_is_not_recomputed_but_new_config_is(tmp_path):
    extract(tmp_path, IDS, config={"a": 1})
    again = EmbeddingCacheWriter(tmp_path, "src", "train", IDS, dim=6, modality="image", model="m", chunk_size=4, config={"a": 1})
    assert again.complete and again.pending_chunks() == []
    changed = EmbeddingCacheWriter(tmp_path, "src", "train", IDS, dim=6, modality="image", model="m", chunk_size=4, config={"a": 2})
    assert not changed.complete and len(changed.pending_chunks()) == 3


def test_read_aligns_by_id_and_marks_missing_inputs(tmp_path):
    present = np.ones(10, bool)
    present[3] = False
    extract(tmp_path, IDS, present=present)
    wanted = ["1007", "1003", "1000"]
    cached = load_embeddings(tmp_path, "src", "train", wanted, expected_dim=6)
    assert cached.values.dtype == np.float32 and cached.values.shape == (3, 6)
    np.testing.assert_allclose(cached.values[0], encode(["1007"])[0], atol=1e-2)  # float16 storage
    assert cached.present.tolist() == [True, False, True]
    assert not cached.values[1].any()


def test_read_failures_are_loud(tmp_path):
    extract(tmp_path, IDS)
    with pytest.raises(CacheError, match="not in the cache"):
        load_embeddings(tmp_path, "src", "train", ["1000", "9999"])
    with pytest.raises(CacheError, match="asked for twice"):
        load_embeddings(tmp_path, "src", "train", ["1000", "1000"])
    with pytest.raises(CacheError, match="dimension 6, expected 8"):
        load_embeddings(tmp_path, "src", "train", expected_dim=8)
    with pytest.raises(CacheError, match="run its extraction"):
        load_embeddings(tmp_path, "other", "train")
    values = np.load(tmp_path / "src/train/embeddings.npy")
    values[5, 2] = np.nan
    np.save(tmp_path / "src/train/embeddings.npy", values)
    with pytest.raises(CacheError, match="NaN or Inf.*1005"):
        load_embeddings(tmp_path, "src", "train")


def test_duplicate_ids_and_bad_chunks_are_refused(tmp_path):
    with pytest.raises(CacheError, match="duplicate"):
        EmbeddingCacheWriter(tmp_path, "s", "train", ["1", "1"], dim=2, modality="text", model="m")
    writer = EmbeddingCacheWriter(tmp_path, "s", "train", ["1", "2"], dim=2, modality="text", model="m")
    with pytest.raises(CacheError, match="shape"):
        writer.write_chunk(0, np.zeros((2, 3)))
    with pytest.raises(CacheError, match="non-finite.*sample_id 2"):
        writer.write_chunk(0, np.array([[0, 0], [np.inf, 0]]))


def test_sharded_writers_merge_in_order(tmp_path):
    writers = [EmbeddingCacheWriter(tmp_path, "src", "train", IDS, dim=6, modality="image", model="m", chunk_size=4,
                                    rank=r, world_size=2) for r in (0, 1)]
    assert [c for c, _, _ in writers[0].pending_chunks()] == [0, 2]
    assert [c for c, _, _ in writers[1].pending_chunks()] == [1]
    for w in reversed(writers):
        for chunk, start, stop in w.pending_chunks():
            w.write_chunk(chunk, encode(IDS[start:stop]))
    writers[0].finalize()
    cached = load_embeddings(tmp_path, "src", "train")
    np.testing.assert_allclose(cached.values, encode(IDS), atol=1e-2)


def test_a_dead_writers_temporary_file_is_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        writer = EmbeddingCacheWriter(tmp_path, "src", "train", IDS, dim=6, modality="image", model="m", chunk_size=4)
        for chunk, start, stop in writer.pending_chunks():
            writer.write_chunk(chunk, encode(IDS[start:stop]))
        stale = writer.dir / f".embeddings.npy.{dead.pid}-k2j4x9q1.tmp.npy"  # an extraction killed while finalizing
        busy = writer.dir / f".embeddings.npy.{live.pid}-p0z8m3n5.tmp.npy"  # another writer, still at work
        stale.write_bytes(b"half an array")
        busy.write_bytes(b"half an array")
        writer.finalize()
        assert not stale.exists() and busy.exists()
    finally:
        live.kill()
        live.wait()
    np.testing.assert_array_equal(load_embeddings(tmp_path, "src", "train").values, encode(IDS).astype(np.float16))
    assert sorted(p.name for p in writer.dir.iterdir() if p != busy) == ["embeddings.npy", "meta.json", "present.npy",
                                                                         "sample_ids.npy"]
