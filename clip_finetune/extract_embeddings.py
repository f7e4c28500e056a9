"""Write CLIP image embeddings (the fine-tuned tower, or the base one) into the embedding cache.

    python -m clip_finetune.extract_embeddings                   # train and test, fine-tuned ViT-L-14
    python -m clip_finetune.extract_embeddings split=test wise_alpha=0.5
    python -m clip_finetune.extract_embeddings use_finetuned=false
    torchrun --nproc_per_node=4 -m clip_finetune.extract_embeddings
    python -m clip_finetune.extract_embeddings profile=tiny

Reads out_dir/run_name/best.pt from clip_finetune.train. With `wise_alpha` below 1 the backbone is
the weight-space interpolation (WiSE-FT) of the base and fine-tuned towers. Writes the source
`clip_image` (the tower's output width: 768 for ViT-L-14); rows without a usable image (none, or
a file that fails to decode: counted and logged) are masked. When no train row has an image, or
training stepped aside, the source is marked skipped (core.embedding_cache.mark_source_skipped)
and nothing else is written.

With the fine-tuned head (wise_alpha=1), also writes its predictions, computed from the cached
vectors: test prices to out_dir/run_name/test_predictions.csv, and in the shared format
(core.predictions, model "clip_head") the holdout fold's predictions from training with every
test row's, when this call extracts the test split.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from clip_finetune.config import PROFILES, ClipConfig
from clip_finetune.model import price_head, wise_ft
from core.config import parse_args
from core.distributed import barrier, cleanup, init_device
from core.embedding_cache import SKIPPED_FILE, EmbeddingCacheWriter, load_embeddings, mark_source_skipped
from core.encode import DecodeFailures, describe_failures, encode_image_batches, fill_cache, image_loader, pending_rows
from core.errors import PipelineError, run_cli
from core.io import atomic_save, read_json
from core.metrics import prices_from_log
from core.open_clip_models import image_size_of, load_open_clip
from core.predictions import write_predictions
from core.runtime import setup_logging
from core.tables import holdout_fold, load_table

HEAD_MODEL = "clip_head"  # name under predictions_dir


def skip_reason(cfg: ClipConfig, run_dir: Path) -> str | None:
    """Why there is nothing to extract, or None."""
    train = load_table(cfg.data_dir, "train")
    if not train["has_image"].any():
        return f"no train row has an image (has_image is false for all {len(train)} rows)"
    metrics = run_dir / "metrics.json"
    if cfg.use_finetuned and metrics.exists() and read_json(metrics).get("skipped"):
        return f"clip_finetune.train stepped aside: {read_json(metrics).get('reason')}"
    return None


def step_aside(cfg: ClipConfig, reason: str, cache_config: dict, dist, log) -> dict:
    if dist.is_main:
        log.warning("clip_extract steps aside, no %s cache: %s", cfg.source_name, reason)
        mark_source_skipped(cfg.embeddings_dir, cfg.source_name, reason, cache_config)
        shutil.rmtree(Path(cfg.predictions_dir) / HEAD_MODEL, ignore_errors=True)  # no stale head predictions
    barrier(dist)
    cleanup(dist)
    return {}


def write_head_predictions(cfg: ClipConfig, run_dir: Path, head, ckpt: dict, test: pd.DataFrame, log) -> None:
    """test_predictions.csv and the shared-format predictions, from the cached test vectors and the
    holdout predictions training made with the same checkpoint."""
    cached = load_embeddings(cfg.embeddings_dir, cfg.source_name, "test", test["sample_id"])
    with torch.no_grad():
        log_pred = head(torch.from_numpy(cached.values)).squeeze(-1).numpy().astype(np.float64)
    # rows without an image get the training median: the head has nothing to go on
    log_pred = np.where(cached.present, log_pred, np.log1p(ckpt["price_median"]))
    out = pd.DataFrame({"sample_id": test["sample_id"], "price": prices_from_log(log_pred, ckpt["price_floor"])})
    atomic_save(lambda tmp: out.to_csv(tmp, index=False), run_dir / "test_predictions.csv")
    holdout = pd.read_csv(run_dir / "val_predictions.csv", dtype={"sample_id": str})
    fold = holdout_fold(cfg.data_dir)
    meta = {"oof_kind": "holdout", "selection": ckpt["selection"], "folds": [fold], "encoder_unseen_folds": [fold],
            "checkpoint": str(run_dir / "best.pt"), "checkpoint_epoch": ckpt["epoch"],
            "rows_without_image": "the training median price", "source": cfg.source_name}
    path = write_predictions(cfg.predictions_dir, HEAD_MODEL, holdout.assign(fold=fold)[["sample_id", "log_pred", "fold"]],
                             pd.DataFrame({"sample_id": test["sample_id"], "log_pred": log_pred}), meta)
    log.info("head predictions: %d holdout and %d test rows in %s", len(holdout), len(test), path)


def main(cfg: ClipConfig) -> dict:
    dist, device, dtype = init_device(cfg.device, cfg.precision)
    run_dir = Path(cfg.out_dir) / cfg.run_name
    log = setup_logging("clip_extract", run_dir if dist.is_main else None)
    cache_config = {"model": cfg.model, "pretrained": cfg.pretrained, "use_finetuned": cfg.use_finetuned,
                    "wise_alpha": cfg.wise_alpha, "precision": cfg.precision}
    reason = skip_reason(cfg, run_dir)
    if reason:
        return step_aside(cfg, reason, cache_config, dist, log)
    if dist.is_main:  # images now: an earlier run's skip marker must not hide the new cache
        (Path(cfg.embeddings_dir) / cfg.source_name / SKIPPED_FILE).unlink(missing_ok=True)
    clip, _, transform, _ = load_open_clip(cfg.model, cfg.pretrained, "cpu")
    visual, size = clip.visual, image_size_of(clip.visual)
    del clip
    head = None
    if cfg.use_finetuned:
        best = run_dir / "best.pt"
        if not best.exists():
            raise PipelineError(f"no {best}; run `python -m clip_finetune.train` first, or use_finetuned=false")
        ckpt = torch.load(best, map_location="cpu", weights_only=False)
        visual.load_state_dict(wise_ft(visual.state_dict(), ckpt["visual"], cfg.wise_alpha))
        cache_config.update(checkpoint=str(best), checkpoint_epoch=ckpt["epoch"],
                            checkpoint_select_smape=ckpt["select_smape"])
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
        failures = DecodeFailures()
        n = fill_cache(writer, encode_image_batches(visual, loader, device, dtype, failures), f"clip {split}")
        if failures:
            log.warning("clip %s: %s", split, describe_failures(failures.reasons, table["sample_id"].to_numpy()[rows]))
        barrier(dist)
        if dist.is_main:
            written[split] = writer.finalize()
            log.info("%s: encoded %d images now; cache %s", split, n, written[split])
        if split == "test" and head is not None and dist.is_main:
            # the head reads the tower's output, which the cache now holds: no second pass over images
            write_head_predictions(cfg, run_dir, head, ckpt, table, log)
    barrier(dist)
    cleanup(dist)
    return written


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(ClipConfig, profiles=PROFILES)))
