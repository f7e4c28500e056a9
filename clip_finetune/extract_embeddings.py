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

With one encoder per fold (`encoder_folds=all`, from clip_finetune.train), each train row's vector
comes from the encoder that never saw its fold (out_dir/run_name/fold_<k>/best.pt) and each test
row's is the mean of the k encoders' vectors. The head's train-row predictions are then out of
fold over every fold (each fold's val_predictions.csv), and its test predictions the mean of the k
heads in log space, each on its own encoder's vectors.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from clip_finetune.config import PROFILES, ClipConfig
from clip_finetune.model import price_head, wise_ft
from core.runs import check_encoder_folds, encoder_dir, encoder_folds
from core.config import parse_args
from core.distributed import barrier, cleanup, init_device
from core.embedding_cache import SKIPPED_FILE, EmbeddingCacheWriter, load_embeddings, mark_source_skipped
from core.encode import DecodeFailures, describe_failures, encode_image_batches, fill_cache, image_loader, pending_rows
from core.errors import PipelineError, run_cli
from core.io import atomic_save, read_json
from core.metrics import prices_from_log
from core.open_clip_models import image_size_of, load_open_clip
from core.predictions import write_predictions
from core.runtime import progress, setup_logging
from core.tables import encoder_selection, load_table

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


def head_log(head, vectors: np.ndarray, present: np.ndarray, price_median: float) -> np.ndarray:
    """log1p(price) from a fine-tuned head on its own tower's vectors; rows without an image get the
    training median: the head has nothing to go on."""
    with torch.no_grad():
        log_pred = head(torch.from_numpy(np.asarray(vectors, np.float32))).squeeze(-1).numpy().astype(np.float64)
    return np.where(present, log_pred, np.log1p(price_median))


def write_head_predictions(cfg: ClipConfig, run_dir: Path, encoders: dict, test: pd.DataFrame, test_log: np.ndarray,
                           log) -> None:
    """test_predictions.csv and the shared-format predictions: the test rows' `test_log`, with each
    scored fold's predictions that training made with the same checkpoint (val_predictions.csv)."""
    ckpts = {fold: ckpt for fold, (_, _, ckpt) in encoders.items()}
    floor = min(ckpt["price_floor"] for ckpt in ckpts.values())
    out = pd.DataFrame({"sample_id": test["sample_id"], "price": prices_from_log(test_log, floor)})
    atomic_save(lambda tmp: out.to_csv(tmp, index=False), run_dir / "test_predictions.csv")
    oof = []
    for fold in ckpts:
        scored = pd.read_csv(encoder_dir(cfg, fold) / "val_predictions.csv", dtype={"sample_id": str})
        oof.append(scored.assign(fold=fold)[["sample_id", "log_pred", "fold"]])
    folds = list(ckpts)
    every_fold = cfg.encoder_folds == "all"
    selection = encoder_selection(cfg.selection_fraction, per_fold=True) if every_fold else ckpts[folds[0]]["selection"]
    meta = {"oof_kind": "out_of_fold" if every_fold else "holdout", "selection": selection, "folds": folds,
            "encoder_unseen_folds": folds, "rows_without_image": "the training median price", "source": cfg.source_name}
    if every_fold:
        meta.update(checkpoint={str(k): str(encoder_dir(cfg, k) / "best.pt") for k in folds},
                    checkpoint_epoch={str(k): ckpts[k]["epoch"] for k in folds},
                    test="the mean of the fold encoders' heads in log space")
    else:
        meta.update(checkpoint=str(run_dir / "best.pt"), checkpoint_epoch=ckpts[folds[0]]["epoch"])
    oof = pd.concat(oof, ignore_index=True)
    path = write_predictions(cfg.predictions_dir, HEAD_MODEL, oof,
                             pd.DataFrame({"sample_id": test["sample_id"], "log_pred": test_log}), meta)
    log.info("head predictions: %d train rows (%s) and %d test rows in %s", len(oof), meta["oof_kind"], len(test), path)


def load_encoders(cfg: ClipConfig, base, per_fold: bool) -> dict:
    """{scored fold: (image tower, head or None, checkpoint)}: one fine-tuned tower per fold, or
    (per_fold false) the one encoder in the run folder, or the base tower when not use_finetuned."""
    if not cfg.use_finetuned:
        return {None: (base, None, None)}
    folds = encoder_folds(cfg)
    encoders = {}
    for fold in folds if per_fold else folds[:1]:
        best = encoder_dir(cfg, fold) / "best.pt"
        if not best.exists():
            raise PipelineError(f"no {best}; run `python -m clip_finetune.train` first, or use_finetuned=false")
        ckpt = torch.load(best, map_location="cpu", weights_only=False)
        visual = copy.deepcopy(base) if per_fold else base
        visual.load_state_dict(wise_ft(base.state_dict(), ckpt["visual"], cfg.wise_alpha))
        head = None
        if cfg.wise_alpha == 1.0:  # the head was trained on the fine-tuned tower's vectors only
            head = price_head(ckpt["embed_dim"], cfg.head_hidden)
            head.load_state_dict(ckpt["head"])
            head.eval()
        encoders[fold] = (visual, head, ckpt)
    return encoders


def encode_rows(visual, table: pd.DataFrame, rows: np.ndarray, transform, size: int, cfg: ClipConfig, device, dtype,
                failures: dict) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, present) of the table's `rows` through one tower; rows whose file fails to decode go
    to `failures` ({table row: reason}) and come back masked."""
    loader = image_loader(table["image_path"].to_numpy()[rows], table["has_image"].to_numpy()[rows], transform, size,
                          cfg.extract_batch_size, cfg.num_workers, device)
    seen = DecodeFailures()
    batches = list(encode_image_batches(visual, loader, device, dtype, seen))
    failures.update({int(rows[i]): reason for i, reason in seen.reasons.items()})
    if not batches:
        return np.zeros((0, 0), np.float32), np.zeros(0, bool)
    return np.concatenate([v for v, _ in batches]), np.concatenate([p for _, p in batches])


def main(cfg: ClipConfig, run_outputs: bool = True) -> dict:
    """{split: cache folder}, and with a fine-tuned head and the test split, "head_test_log": the head's
    log1p prediction per test row. run_outputs=false writes nothing but the cache: no log in the run
    folder, no head predictions (scoring new rows reads a trained run and never writes into it)."""
    check_encoder_folds(cfg)  # a bad value is refused before anything is written
    dist, device, dtype = init_device(cfg.device, cfg.precision)
    run_dir = Path(cfg.out_dir) / cfg.run_name
    log = setup_logging("clip_extract", run_dir if dist.is_main and run_outputs else None)
    per_fold = cfg.use_finetuned and cfg.encoder_folds == "all"
    cache_config = {"model": cfg.model, "pretrained": cfg.pretrained, "use_finetuned": cfg.use_finetuned,
                    "wise_alpha": cfg.wise_alpha, "precision": cfg.precision,
                    "encoder_folds": cfg.encoder_folds if cfg.use_finetuned else None}
    reason = skip_reason(cfg, run_dir)
    if reason:
        return step_aside(cfg, reason, cache_config, dist, log)
    if dist.is_main:  # images now: an earlier run's skip marker must not hide the new cache
        (Path(cfg.embeddings_dir) / cfg.source_name / SKIPPED_FILE).unlink(missing_ok=True)
    clip, _, transform, _ = load_open_clip(cfg.model, cfg.pretrained, "cpu")
    base, size = clip.visual, image_size_of(clip.visual)
    del clip
    encoders = load_encoders(cfg, base, per_fold)
    del base  # a per-fold run keeps only the k fine-tuned copies
    if cfg.use_finetuned:
        # one value for the one encoder; with an encoder per fold, one per fold
        pick = (lambda by_fold: by_fold) if per_fold else (lambda by_fold: next(iter(by_fold.values())))
        cache_config.update(checkpoint=pick({str(k): str(encoder_dir(cfg, k) / "best.pt") for k in encoders}),
                            checkpoint_epoch=pick({str(k): c["epoch"] for k, (_, _, c) in encoders.items()}),
                            checkpoint_select_smape=pick({str(k): c["select_smape"] for k, (_, _, c) in encoders.items()}))
    for visual, _, _ in encoders.values():
        visual.to(device).eval()
    first = next(iter(encoders.values()))[0]
    with torch.no_grad():
        dim = first(torch.zeros(1, 3, size, size, device=device)).shape[1]
    with_head = all(head is not None for _, head, _ in encoders.values())
    log.info("%s (%s, wise_alpha %.2f): %d-d image vectors, device %s, amp %s", cfg.model,
             f"{len(encoders)} fine-tuned, one per fold" if per_fold else "fine-tuned" if cfg.use_finetuned else "base",
             cfg.wise_alpha, dim, device, dtype)

    def encode_chunk(table, rows, split, failures, test_logs):
        """(vectors, present) for `rows`: a train row from the encoder blind to its fold, a test row
        the mean of every encoder's vector (and each head's prediction into test_logs)."""
        if split == "train":
            vectors, present = np.zeros((len(rows), dim), np.float32), np.zeros(len(rows), bool)
            fold_of = table["fold"].to_numpy()[rows]
            for fold, (visual, _, _) in encoders.items():
                mine = fold_of == fold
                if mine.any():
                    vectors[mine], present[mine] = encode_rows(visual, table, rows[mine], transform, size, cfg, device,
                                                               dtype, failures)
            return vectors, present
        parts = [encode_rows(visual, table, rows, transform, size, cfg, device, dtype, failures)
                 for visual, _, _ in encoders.values()]
        if with_head:
            for j, ((_, head, ckpt), (vectors, present)) in enumerate(zip(encoders.values(), parts)):
                test_logs[rows, j] = head_log(head, vectors, present, ckpt["price_median"])
        return np.mean([v for v, _ in parts], axis=0), np.logical_and.reduce([p for _, p in parts])

    written = {}
    for split in (["train", "test"] if cfg.split == "both" else [cfg.split]):
        table = load_table(cfg.data_dir, split)
        writer = EmbeddingCacheWriter(cfg.embeddings_dir, cfg.source_name, split, table["sample_id"].tolist(), dim,
                                      "image", model=cfg.model, config=cache_config, dtype=cfg.storage_dtype,
                                      chunk_size=cfg.chunk_size, rank=dist.rank, world_size=dist.world_size)
        barrier(dist)
        failures = {}  # table row -> why its image did not decode
        test_logs = np.full((len(table), len(encoders)), np.nan)  # each fold head's test predictions
        if per_fold:
            chunks = writer.pending_chunks()
            for chunk, start, stop in progress(chunks, desc=f"clip {split} chunks", disable=None if dist.is_main else True):
                writer.write_chunk(chunk, *encode_chunk(table, np.arange(start, stop), split, failures, test_logs))
            n = sum(stop - start for _, start, stop in chunks)
        else:
            rows = pending_rows(writer)
            loader = image_loader(table["image_path"].to_numpy()[rows], table["has_image"].to_numpy()[rows], transform,
                                  size, cfg.extract_batch_size, cfg.num_workers, device)
            seen = DecodeFailures()
            n = fill_cache(writer, encode_image_batches(first, loader, device, dtype, seen), f"clip {split}")
            failures = {int(rows[i]): reason for i, reason in seen.reasons.items()}
        if failures:
            log.warning("clip %s: %s", split, describe_failures(failures, table["sample_id"].to_numpy()))
        barrier(dist)
        if dist.is_main:
            written[split] = writer.finalize()
            log.info("%s: encoded %d images now; cache %s", split, n, written[split])
        if split == "test" and with_head and dist.is_main:
            written["head_test_log"] = head_test_log(cfg, encoders, table, test_logs, transform, size, device, dtype)
            if run_outputs:
                write_head_predictions(cfg, run_dir, encoders, table, written["head_test_log"], log)
    barrier(dist)
    cleanup(dist)
    return written


def head_test_log(cfg: ClipConfig, encoders: dict, test: pd.DataFrame, test_logs: np.ndarray, transform, size: int,
                  device, dtype) -> np.ndarray:
    """Every test row's head prediction in log space. One encoder: its head on the cached vectors
    (no second pass over images). One per fold: the mean of the k heads, each on its own tower's
    vectors; rows whose chunk an earlier call (or another rank) encoded are read again here."""
    if cfg.encoder_folds != "all":
        (_, head, ckpt), = encoders.values()
        cached = load_embeddings(cfg.embeddings_dir, cfg.source_name, "test", test["sample_id"])
        return head_log(head, cached.values, cached.present, ckpt["price_median"])
    missing = np.flatnonzero(np.isnan(test_logs).any(axis=1))
    for j, (visual, head, ckpt) in enumerate(encoders.values()):
        if len(missing):
            vectors, present = encode_rows(visual, test, missing, transform, size, cfg, device, dtype, {})
            test_logs[missing, j] = head_log(head, vectors, present, ckpt["price_median"])
    return test_logs.mean(axis=1)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(ClipConfig, profiles=PROFILES)))
