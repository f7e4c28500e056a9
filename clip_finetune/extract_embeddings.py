"""Write CLIP image embeddings (the fine-tuned tower, or the base one) into the embedding cache.

    python -m clip_finetune.extract_embeddings                   # train and test, fine-tuned ViT-L-14
    python -m clip_finetune.extract_embeddings split=test wise_alpha=0.5
    python -m clip_finetune.extract_embeddings use_finetuned=false
    torchrun --nproc_per_node=4 -m clip_finetune.extract_embeddings
    python -m clip_finetune.extract_embeddings profile=tiny

Reads out_dir/run_name/best.pt from clip_finetune.train. With `wise_alpha` below 1 the backbone is
the weight-space interpolation (WiSE-FT) of the base and fine-tuned towers. Writes the source
`clip_image` (the tower's output width: 768 for ViT-L-14); rows without a usable image are masked.
Also writes the regression head's test-split price predictions, computed from the cached
vectors, to out_dir/run_name/test_predictions.csv.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from clip_finetune.config import PROFILES, ClipConfig
from clip_finetune.model import price_head, wise_ft
from core.config import parse_args
from core.distributed import barrier, cleanup, init_device
from core.embedding_cache import EmbeddingCacheWriter, load_embeddings
from core.encode import encode_image_batches, fill_cache, image_loader, pending_rows
from core.errors import PipelineError, run_cli
from core.io import atomic_save
from core.metrics import prices_from_log
from core.open_clip_models import image_size_of, load_open_clip
from core.runtime import setup_logging
from core.tables import load_table


def main(cfg: ClipConfig) -> dict:
    dist, device, dtype = init_device(cfg.device, cfg.precision)
    run_dir = Path(cfg.out_dir) / cfg.run_name
    log = setup_logging("clip_extract", run_dir if dist.is_main else None)
    clip, _, transform, _ = load_open_clip(cfg.model, cfg.pretrained, "cpu")
    visual, size = clip.visual, image_size_of(clip.visual)
    del clip
    cache_config = {"model": cfg.model, "pretrained": cfg.pretrained, "use_finetuned": cfg.use_finetuned,
                    "wise_alpha": cfg.wise_alpha, "precision": cfg.precision}
    head = None
    if cfg.use_finetuned:
        best = run_dir / "best.pt"
        if not best.exists():
            raise PipelineError(f"no {best}; run `python -m clip_finetune.train` first, or use_finetuned=false")
        ckpt = torch.load(best, map_location="cpu", weights_only=False)
        visual.load_state_dict(wise_ft(visual.state_dict(), ckpt["visual"], cfg.wise_alpha))
        cache_config.update(checkpoint=str(best), checkpoint_epoch=ckpt["epoch"], checkpoint_val_smape=ckpt["val_smape"])
        if cfg.wise_alpha == 1.0:  # the head was trained on the fine-tuned tower's vectors only
            head = price_head(ckpt["embed_dim"], cfg.head_hidden)
            head.load_state_dict(ckpt["head"])
            head.eval()
    visual.to(device).eval()
    with torch.no_grad():
        dim = visual(torch.zeros(1, 3, size, size, device=device)).shape[1]
    log.info("%s (%s, wise_alpha %.2f): %d-d image vectors, device %s, amp %s", cfg.model,
             "fine-tuned" if cfg.use_finetuned else "base", cfg.wise_alpha, dim, device, dtype)
    written = {}
    for split in (["train", "test"] if cfg.split == "both" else [cfg.split]):
        table = load_table(cfg.data_dir, split)
        writer = EmbeddingCacheWriter(cfg.embeddings_dir, cfg.source_name, split, table["sample_id"].tolist(), dim,
                                      "image", model=cfg.model, config=cache_config, dtype=cfg.storage_dtype,
                                      chunk_size=cfg.chunk_size, rank=dist.rank, world_size=dist.world_size)
        barrier(dist)
        rows = pending_rows(writer)
        loader = image_loader(table["image_path"].to_numpy()[rows], table["has_image"].to_numpy()[rows], transform,
                              size, cfg.extract_batch_size, cfg.num_workers, device)
        n = fill_cache(writer, encode_image_batches(visual, loader, device, dtype), f"clip {split}")
        barrier(dist)
        if dist.is_main:
            written[split] = writer.finalize()
            log.info("%s: encoded %d images now; cache %s", split, n, written[split])
        if split == "test" and head is not None and dist.is_main:
            # the head reads the tower's output, which the cache now holds: no second pass over images
            cached = load_embeddings(cfg.embeddings_dir, cfg.source_name, "test", table["sample_id"])
            with torch.no_grad():
                log_pred = head(torch.from_numpy(cached.values)).squeeze(-1).numpy()
            # rows without an image get the training median: the head has nothing to go on
            median = float(load_table(cfg.data_dir, "train")["price"].median())
            price = np.where(cached.present, prices_from_log(log_pred, ckpt["price_floor"]), median)
            out = pd.DataFrame({"sample_id": table["sample_id"], "price": price})
            atomic_save(lambda tmp: out.to_csv(tmp, index=False), run_dir / "test_predictions.csv")
    barrier(dist)
    cleanup(dist)
    return written


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(ClipConfig, profiles=PROFILES)))
