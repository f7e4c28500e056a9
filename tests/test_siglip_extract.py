"""SigLIP extraction with a tiny SigLIP on the demo catalog: widths, alignment, masking, padding, resume."""
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from core.embedding_cache import EmbeddingCacheWriter, load_embeddings
from core.open_clip_models import load_open_clip
from core.tables import load_table
from siglip_extract import extract
from siglip_extract.config import PROFILES

ROOT = Path(__file__).resolve().parents[1]


def config(demo_catalog, tiny_models, out, **kw):
    return replace(PROFILES["tiny"], model=str(tiny_models / "siglip_tiny"), data_dir=demo_catalog / "data",
                   embeddings_dir=out, num_workers=0, chunk_size=128, **kw)


@pytest.fixture(scope="module")
def extracted(demo_catalog, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("siglip")
    extract.main(config(demo_catalog, tiny_models, out))
    return out


def test_two_sources_with_the_models_widths_aligned_to_the_table(demo_catalog, extracted):
    for split in ("train", "test"):
        table = load_table(demo_catalog / "data", split)
        image = load_embeddings(extracted, "siglip_image", split, table["sample_id"])
        text = load_embeddings(extracted, "siglip_text", split, table["sample_id"])
        assert image.meta["modality"] == "image" and text.meta["modality"] == "text"
        assert image.dim == 48 and text.dim == 48  # read from the model, not configured
        assert (image.present == table["has_image"].to_numpy()).all()  # a missing image is a masked row
        assert not image.values[~image.present].any() and np.abs(image.values[image.present]).sum(1).min() > 0
        assert text.present.all()


def test_text_is_padded_to_64_and_images_use_siglip_normalisation(tiny_models):
    _, _, transform, tokenizer = load_open_clip(str(tiny_models / "siglip_tiny"), None)
    ids = tokenizer(["short", "a much longer product title " * 20])
    assert ids.shape == (2, 64)  # max_length padding, long text truncated
    normalize = [t for t in transform.transforms if type(t).__name__ == "Normalize"][0]
    assert list(normalize.mean) == [0.5, 0.5, 0.5] and list(normalize.std) == [0.5, 0.5, 0.5]


def test_killed_extraction_resumes_to_the_same_arrays(demo_catalog, tiny_models, extracted, tmp_path, interrupt):
    with interrupt(EmbeddingCacheWriter, "write_chunk", on_call=3):  # two chunks on disk
        extract.main(config(demo_catalog, tiny_models, tmp_path, split="train"))
    extract.main(config(demo_catalog, tiny_models, tmp_path, split="train"))
    for source in ("siglip_image", "siglip_text"):
        a = (extracted / source / "train" / "embeddings.npy").read_bytes()
        b = (tmp_path / source / "train" / "embeddings.npy").read_bytes()
        assert a == b


def test_torchrun_two_processes_shard_and_merge_in_order(demo_catalog, tiny_models, extracted, tmp_path):
    env = {**os.environ, "PRICE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531", "-m",
           "siglip_extract.extract", "profile=tiny", f"model={tiny_models / 'siglip_tiny'}", "split=train",
           f"data_dir={demo_catalog / 'data'}", f"embeddings_dir={tmp_path}", "num_workers=0", "chunk_size=128",
           "device=cpu"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single = np.load(extracted / "siglip_image" / "train" / "embeddings.npy")
    sharded = np.load(tmp_path / "siglip_image" / "train" / "embeddings.npy")
    np.testing.assert_allclose(sharded, single, atol=2e-3)
    assert (np.load(tmp_path / "siglip_image/train/sample_ids.npy") == np.load(extracted / "siglip_image/train/sample_ids.npy")).all()


def test_without_any_image_the_image_source_is_skipped_and_text_still_extracted(demo_catalog, tiny_models, extracted,
                                                                                  tmp_path, capsys):
    import pandas as pd

    from core.embedding_cache import skipped_reason

    data = tmp_path / "data"  # the image CDN unreachable: every has_image false
    data.mkdir()
    (data / "prepare.json").write_bytes((demo_catalog / "data" / "prepare.json").read_bytes())
    for split in ("train", "test"):
        table = pd.read_parquet(demo_catalog / "data" / f"{split}.parquet")
        table.assign(has_image=False, image_path="").to_parquet(data / f"{split}.parquet", index=False)
    out = tmp_path / "emb"
    extract.main(replace(config(demo_catalog, tiny_models, out), data_dir=data))
    log = capsys.readouterr().out
    assert "has_image is false" in skipped_reason(out, "siglip_image")
    assert not (out / "siglip_image" / "train").exists() and not (out / "siglip_image" / "test").exists()
    assert len([ln for ln in log.splitlines() if "skipped" in ln and "siglip_image" in ln]) == 1, log
    for split in ("train", "test"):  # the text half is what it would have been with images
        text = load_embeddings(out, "siglip_text", split)
        np.testing.assert_array_equal(text.values, load_embeddings(extracted, "siglip_text", split).values)
