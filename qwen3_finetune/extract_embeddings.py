"""Write the fine-tuned Qwen text vectors (pooled vector + 3 standardised structural features) to
the embedding cache: 1024 + 3 = 1027 wide for Qwen3-Embedding-0.6B, hidden size + 3 in general.

    python -m qwen3_finetune.extract_embeddings                # train and test
    python -m qwen3_finetune.extract_embeddings split=test
    torchrun --nproc_per_node=4 -m qwen3_finetune.extract_embeddings   # chunks sharded across GPUs
    python -m qwen3_finetune.extract_embeddings profile=tiny

Resumable by chunk; rows keep the processed table's order. With one encoder per fold
(`encoder_folds=all`), a train row's vector comes from the encoder that never saw its fold and a
test row's vector is the mean of the k encoders' vectors. Under torchrun chunk i is encoded by
rank i % world_size only, and rank 0 joins the chunks once every rank has written its own.
The cache records the checkpoints it was made with (`vector_identity`), so that qwen_predict can
apply the trained heads to these vectors instead of running the model over the rows again.
"""
from __future__ import annotations

import numpy as np

from core.config import parse_args
from core.distributed import barrier, cleanup, init_device
from core.embedding_cache import EmbeddingCacheWriter
from core.errors import run_cli
from core.runtime import progress, setup_logging
from core.tables import load_table
from qwen3_finetune.config import PROFILES, QwenConfig
from qwen3_finetune.model import encoder_folds, load_run, run_rows, table_inputs, vector_identity


def main(cfg: QwenConfig) -> dict:
    dist, device, dtype = init_device(cfg.device, cfg.precision)
    log = setup_logging("qwen3_extract", None)
    per_fold = cfg.finetune and cfg.encoder_folds == "all"
    encoders = {fold: load_run(cfg, device, fold) for fold in encoder_folds(cfg)} if per_fold else {None: load_run(cfg, device)}
    model, _, tokenizer, meta = next(iter(encoders.values()))
    dim = model.head[0].in_features
    cache_config = {"model": cfg.model, "quantization": cfg.quantization, "pooling": model.pooling,
                    "max_length": cfg.max_length, "encoder_folds": cfg.encoder_folds if cfg.finetune else None,
                    "checkpoint_epoch": {str(k): m[3].get("epoch") for k, m in encoders.items()} if per_fold else meta.get("epoch"),
                    "checkpoint_selection_smape": None if per_fold else meta.get("selection_smape"),
                    "run": str(cfg.out_dir / cfg.run_name),
                    "vectors": vector_identity(cfg)}  # qwen_predict prices these rows from the cache when it matches

    def embed(rows, encoder):
        model, scaler, tokenizer, _ = encoder
        token_ids, features = table_inputs(rows, tokenizer, scaler, cfg.max_length)
        return run_rows(model, token_ids, features, cfg.eval_batch_size, tokenizer.pad_token_id, device, dtype, want="embed")

    def encode(rows, split):
        if not per_fold:
            return embed(rows, encoders[None])
        if split == "test":
            return np.mean([embed(rows, encoder) for encoder in encoders.values()], axis=0)
        out = np.zeros((len(rows), dim), np.float32)
        for fold, encoder in encoders.items():  # each row from the encoder that never saw its fold
            mine = (rows["fold"] == fold).to_numpy()
            if mine.any():
                out[mine] = embed(rows[mine], encoder)
        return out

    written = {}
    for split in (["train", "test"] if cfg.split == "both" else [cfg.split]):
        table = load_table(cfg.data_dir, split)
        writer = EmbeddingCacheWriter(cfg.embeddings_dir, cfg.source_name, split, table["sample_id"].tolist(), dim,
                                      "text", model=cfg.model, config=cache_config, dtype=cfg.storage_dtype,
                                      chunk_size=cfg.chunk_size, rank=dist.rank, world_size=dist.world_size)
        barrier(dist)  # rank 0 has (re)created the cache folder before anyone writes into it
        chunks = writer.pending_chunks()  # this rank's share only
        for chunk, start, stop in progress(chunks, desc=f"qwen {split} chunks", disable=None if dist.is_main else True):
            writer.write_chunk(chunk, encode(table.iloc[start:stop], split))
        if dist.enabled:
            log.info("%s: rank %d of %d encoded %d chunk(s)", split, dist.rank, dist.world_size, len(chunks))
        barrier(dist)  # every rank's chunks are on disk
        if dist.is_main:
            written[split] = writer.finalize()
            log.info("%s: %d-d text vectors in %s", split, dim, written[split])
        barrier(dist)
    cleanup(dist)
    return written


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(QwenConfig, profiles=PROFILES)))
