"""Extract SigLIP image and text embeddings for the processed tables into the embedding cache.

    python -m siglip_extract.extract                       # so400m at 384 px, train and test
    python -m siglip_extract.extract split=test batch_size=512
    torchrun --nproc_per_node=4 -m siglip_extract.extract  # rows sharded across GPUs by chunk
    python -m siglip_extract.extract profile=tiny          # the demo's tiny SigLIP, CPU

Writes two sources per split, `siglip_image` and `siglip_text`, with the width the model reports.
Images go through open_clip's SigLIP transform (resize, mean/std 0.5) and the attention-pooling
head; text is padded to the 64 tokens the text tower was trained with. Rows without a usable
image (none, or a file that fails to decode: counted and logged with sample_ids and reasons) are
masked. When no train row has an image the image source is marked skipped
(core.embedding_cache.mark_source_skipped) in one log line and only the text source is written.
An interrupted run resumes at the first chunk not on disk.
"""
from __future__ import annotations

from pathlib import Path

import torch

from core.config import parse_args
from core.distributed import barrier, cleanup, init_device
from core.embedding_cache import SKIPPED_FILE, EmbeddingCacheWriter, mark_source_skipped
from core.encode import (DecodeFailures, describe_failures, encode_image_batches, encode_text_batches, fill_cache,
                         image_loader, pending_rows)
from core.errors import run_cli
from core.open_clip_models import image_size_of, load_open_clip
from core.runtime import setup_logging
from core.tables import load_table
from siglip_extract.config import PROFILES, SiglipConfig


def main(cfg: SiglipConfig) -> dict:
    dist, device, dtype = init_device(cfg.device, cfg.precision)
    log = setup_logging("siglip_extract", Path(cfg.embeddings_dir) if dist.is_main else None)
    model, _, transform, tokenizer = load_open_clip(cfg.model, cfg.pretrained, device, setting="siglip.model")
    model.eval()
    size = image_size_of(model.visual)
    with torch.no_grad():
        image_dim = model.encode_image(torch.zeros(1, 3, size, size, device=device)).shape[1]
        text_dim = model.encode_text(tokenizer(["probe"]).to(device)).shape[1]
    context_length = tokenizer(["probe"]).shape[1]
    log.info("model %s: image %d-d at %d px, text %d-d padded to %d tokens, device %s, amp %s",
             cfg.model, image_dim, size, text_dim, context_length, device, dtype)
    cache_config = {"model": cfg.model, "pretrained": cfg.pretrained, "text_column": cfg.text_column,
                    "precision": cfg.precision, "image_size": size, "context_length": context_length}
    train = load_table(cfg.data_dir, "train")
    skip_images = None if train["has_image"].any() else \
        f"no train row has an image (has_image is false for all {len(train)} rows)"
    if skip_images and dist.is_main:
        log.warning("siglip_extract: image source %s skipped, text only: %s", cfg.image_source, skip_images)
        mark_source_skipped(cfg.embeddings_dir, cfg.image_source, skip_images, cache_config)
    elif dist.is_main:  # images now: an earlier run's skip marker must not hide the new cache
        (Path(cfg.embeddings_dir) / cfg.image_source / SKIPPED_FILE).unlink(missing_ok=True)
    written = {}
    for split in (["train", "test"] if cfg.split == "both" else [cfg.split]):
        table = train if split == "train" else load_table(cfg.data_dir, split)
        ids = table["sample_id"].tolist()
        common = dict(model=cfg.model, config=cache_config, dtype=cfg.storage_dtype, chunk_size=cfg.chunk_size,
                      rank=dist.rank, world_size=dist.world_size)
        writers, n = [], 0
        if not skip_images:
            image_writer = EmbeddingCacheWriter(cfg.embeddings_dir, cfg.image_source, split, ids, image_dim, "image", **common)
            barrier(dist)
            rows = pending_rows(image_writer)
            loader = image_loader(table["image_path"].to_numpy()[rows], table["has_image"].to_numpy()[rows], transform,
                                  size, cfg.batch_size, cfg.num_workers, device)
            failures = DecodeFailures()
            n = fill_cache(image_writer, encode_image_batches(model.encode_image, loader, device, dtype, failures),
                           f"siglip image {split}")
            if failures:
                log.warning("siglip %s: %s", split, describe_failures(failures.reasons, table["sample_id"].to_numpy()[rows]))
            writers.append(image_writer)
        text_writer = EmbeddingCacheWriter(cfg.embeddings_dir, cfg.text_source, split, ids, text_dim, "text", **common)
        writers.append(text_writer)
        barrier(dist)
        rows = pending_rows(text_writer)
        texts = table[cfg.text_column].to_numpy()[rows]
        m = fill_cache(text_writer, encode_text_batches(model.encode_text, tokenizer, texts, cfg.text_batch_size,
                                                        device, dtype), f"siglip text {split}")
        barrier(dist)
        if dist.is_main:
            written[split] = [w.finalize() for w in writers]
            log.info("%s: encoded %d images and %d texts now; caches %s", split, n, m, ", ".join(map(str, written[split])))
    barrier(dist)
    cleanup(dist)
    return written


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(SiglipConfig, profiles=PROFILES)))
