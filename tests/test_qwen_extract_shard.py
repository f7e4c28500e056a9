"""Qwen text extraction under torchrun: chunks are sharded across ranks and merged by rank 0."""
import json
import os
import socket
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from core.embedding_cache import EmbeddingCacheWriter, load_embeddings
from core.tables import STRUCTURAL_FEATURES, load_table
from qwen3_finetune import extract_embeddings
from qwen3_finetune.config import PROFILES
from qwen3_finetune.model import FeatureScaler, PriceRegressor, add_lora, load_backbone, save_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run_cfg(demo_catalog, tiny_models, tmp_path_factory):
    """A saved checkpoint (random adapters and head, as after training) in the run folder extraction reads."""
    out = tmp_path_factory.mktemp("qwen_shard")
    cfg = replace(PROFILES["tiny"], model=str(tiny_models / "qwen3_tiny"), quantization="none", device="cpu",
                  data_dir=demo_catalog / "data", out_dir=out, embeddings_dir=out / "single", chunk_size=128)
    torch.manual_seed(0)
    backbone = add_lora(load_backbone(cfg.model, "none", CPU), cfg)
    for name, p in backbone.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model = PriceRegressor(backbone, backbone.config.hidden_size, cfg.head_hidden, cfg.pooling)
    train = load_table(cfg.data_dir, "train")
    scaler = FeatureScaler().fit(train[STRUCTURAL_FEATURES].to_numpy())
    save_checkpoint(out / cfg.run_name / "best", model, scaler, {"epoch": 0, "val_smape": 50.0})
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, cfg, port, record_dir):
    """One torchrun-like process: records which chunks it wrote and how many rows it encoded."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), PRICE_NO_PROGRESS="1")
    torch.set_num_threads(1)
    record = {"chunks": {"train": [], "test": []}, "rows_encoded": 0}
    real_write, real_run_rows = EmbeddingCacheWriter.write_chunk, extract_embeddings.run_rows

    def write_chunk(self, chunk, vectors, present=None):
        record["chunks"][self.meta["split"]].append(chunk)
        return real_write(self, chunk, vectors, present)

    def run_rows(model, token_ids, *args, **kwargs):
        record["rows_encoded"] += len(token_ids)
        return real_run_rows(model, token_ids, *args, **kwargs)

    EmbeddingCacheWriter.write_chunk = write_chunk
    extract_embeddings.run_rows = run_rows
    extract_embeddings.main(cfg)
    (record_dir / f"rank{rank}.json").write_text(json.dumps(record))


def test_two_ranks_split_the_chunks_and_merge_to_the_single_process_cache(demo_catalog, run_cfg, tmp_path):
    extract_embeddings.main(run_cfg)
    sharded_cfg = replace(run_cfg, embeddings_dir=tmp_path / "sharded")
    mp.start_processes(_rank_main, args=(sharded_cfg, _free_port(), tmp_path), nprocs=2, join=True,
                       start_method="spawn")
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    rows_per_split = {s: len(load_table(demo_catalog / "data", s)) for s in ("train", "test")}
    for rank, record in enumerate(records):
        expected_rows = 0
        for split, n_rows in rows_per_split.items():
            n_chunks = -(-n_rows // 128)
            assert sorted(record["chunks"][split]) == list(range(rank, n_chunks, 2)), (rank, split, record)
            expected_rows += sum(min(128, n_rows - c * 128) for c in range(rank, n_chunks, 2))
        assert record["rows_encoded"] == expected_rows  # no rank encoded another rank's rows
    for split in ("train", "test"):
        single = load_embeddings(run_cfg.embeddings_dir, "qwen_text", split)
        sharded = load_embeddings(tmp_path / "sharded", "qwen_text", split)
        assert sharded.meta["complete"] and sharded.meta["rows"] == rows_per_split[split]
        assert (np.load(tmp_path / "sharded/qwen_text" / split / "sample_ids.npy")
                == np.load(run_cfg.embeddings_dir / "qwen_text" / split / "sample_ids.npy")).all()
        np.testing.assert_allclose(sharded.values, single.values, atol=2e-3)
