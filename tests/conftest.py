import contextlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PRICE_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_catalog(tmp_path_factory):
    """A small synthetic catalog and its processed tables, shared by the tests of every stage."""
    from data import prepare, synthetic
    from data.config import PrepareConfig, SyntheticConfig

    root = tmp_path_factory.mktemp("demo")
    raw = synthetic.main(SyntheticConfig(out_dir=root / "raw", n_train=600, n_test=150, seed=3, image_size=32))
    prepare.main(PrepareConfig(raw_dir=raw, out_dir=root / "data", download_workers=4))
    return root


def write_planted_caches(embeddings_dir, data_dir, raw_dir, seed=0, sources=None):
    """Caches whose vectors carry log price so that every signal source is needed: 'img' sees half of
    it plus a per-row nuisance, 'txt' the other half minus that nuisance, so either alone is weak and
    the two together recover it; 'noise' carries none. Missing images are masked as a real
    extraction would mask them."""
    import numpy as np
    import pandas as pd

    from core.embedding_cache import EmbeddingCacheWriter
    from core.tables import load_table

    sources = sources or {"img": ("image", 16, 0.35), "txt": ("text", 24, 0.35), "noise": ("text", 8, None)}
    labels = pd.read_csv(Path(raw_dir) / "test_labels.csv", dtype={"sample_id": str}).set_index("sample_id")["price"]
    for split in ("train", "test"):
        table = load_table(data_dir, split)
        ids = table["sample_id"].astype(str).tolist()
        log_price = np.log1p(table["price"].to_numpy() if split == "train" else labels.loc[ids].to_numpy())
        nuisance = np.random.default_rng(seed * 100 + 50 + (7 if split == "test" else 0)).normal(0, 0.8, len(ids))
        for k, (name, (modality, dim, noise)) in enumerate(sources.items()):
            rng = np.random.default_rng(seed * 100 + k)
            direction = rng.normal(size=(2, dim))
            rng_rows = np.random.default_rng(seed * 100 + k + (7 if split == "test" else 0))
            if noise is None:
                vectors = rng_rows.normal(size=(len(ids), dim))
            else:
                share = 0.5 * (log_price - 2.6) + (nuisance if modality == "image" else -nuisance)
                signal = share + rng_rows.normal(0, noise * 0.5, len(ids))
                vectors = np.outer(signal, direction[0]) + np.outer(np.tanh(signal), direction[1])
                vectors += rng_rows.normal(0, 0.3, vectors.shape)
            present = table["has_image"].to_numpy() if modality == "image" else np.ones(len(ids), bool)
            writer = EmbeddingCacheWriter(embeddings_dir, name, split, ids, dim=dim, modality=modality,
                                          model=f"planted-{name}", chunk_size=256, dtype="float32")
            for chunk, start, stop in writer.pending_chunks():
                writer.write_chunk(chunk, vectors[start:stop], present[start:stop])
            writer.finalize()
    return embeddings_dir


@pytest.fixture(scope="session")
def planted(demo_catalog):
    """The demo catalog plus planted-signal caches for three sources."""
    write_planted_caches(demo_catalog / "embeddings", demo_catalog / "data", demo_catalog / "raw")
    return demo_catalog


@pytest.fixture(scope="session")
def tiny_models(demo_catalog):
    """Tiny CLIP, SigLIP and Qwen3 folders (random weights, tokenizers trained on the demo texts)."""
    from data.tiny_models import TinyModelsConfig, main

    return main(TinyModelsConfig(out_dir=demo_catalog / "models", data_dir=demo_catalog / "data"))


@pytest.fixture
def interrupt(monkeypatch):
    """`with interrupt(owner, "name", on_call=n): run()` makes owner.name raise KeyboardInterrupt on
    its n-th call (a crash mid-run), checks the run was stopped by it, then restores owner.name."""

    @contextlib.contextmanager
    def on_call(owner, name, on_call):
        real, calls = getattr(owner, name), []

        def crashing(*args, **kwargs):
            calls.append(1)
            if len(calls) == on_call:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, crashing)
        with pytest.raises(KeyboardInterrupt):
            yield
        monkeypatch.setattr(owner, name, real)

    return on_call
