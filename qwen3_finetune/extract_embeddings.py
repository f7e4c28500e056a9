"""Write the fine-tuned Qwen text vectors (pooled vector + 3 standardised structural features) to
the embedding cache: 1024 + 3 = 1027 wide for Qwen3-Embedding-0.6B, hidden size + 3 in general.

    python -m qwen3_finetune.extract_embeddings                # train and test
    python -m qwen3_finetune.extract_embeddings split=test
    python -m qwen3_finetune.extract_embeddings profile=tiny

Resumable by chunk; rows keep the processed table's order.
"""
from __future__ import annotations

from core.config import parse_args
from core.embedding_cache import EmbeddingCacheWriter
from core.errors import run_cli
from core.runtime import amp_dtype, pick_device, progress, setup_logging
from core.tables import load_table
from qwen3_finetune.config import PROFILES, QwenConfig
from qwen3_finetune.model import load_run, run_rows, table_inputs


def main(cfg: QwenConfig) -> dict:
    device = pick_device(cfg.device)
    dtype = amp_dtype(device, cfg.precision)
    log = setup_logging("qwen3_extract", None)
    model, scaler, tokenizer, meta = load_run(cfg, device)
    dim = model.head[0].in_features
    cache_config = {"model": cfg.model, "quantization": cfg.quantization, "pooling": model.pooling,
                    "max_length": cfg.max_length, "checkpoint_epoch": meta["epoch"],
                    "checkpoint_val_smape": meta["val_smape"], "run": str(cfg.out_dir / cfg.run_name)}
    written = {}
    for split in (["train", "test"] if cfg.split == "both" else [cfg.split]):
        table = load_table(cfg.data_dir, split)
        writer = EmbeddingCacheWriter(cfg.embeddings_dir, cfg.source_name, split, table["sample_id"].tolist(), dim,
                                      "text", model=cfg.model, config=cache_config, dtype=cfg.storage_dtype,
                                      chunk_size=cfg.chunk_size)
        for chunk, start, stop in progress(writer.pending_chunks(), desc=f"qwen {split} chunks"):
            token_ids, features = table_inputs(table.iloc[start:stop], tokenizer, scaler, cfg.max_length)
            writer.write_chunk(chunk, run_rows(model, token_ids, features, cfg.eval_batch_size,
                                               tokenizer.pad_token_id, device, dtype, want="embed"))
        written[split] = writer.finalize()
        log.info("%s: %d-d text vectors in %s", split, dim, written[split])
    return written


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(QwenConfig, profiles=PROFILES)))
