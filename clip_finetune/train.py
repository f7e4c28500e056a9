"""Fine-tune an open_clip image tower with a regression head on log1p(price).

    python -m clip_finetune.train                              # ViT-L-14 (openai), one GPU
    torchrun --nproc_per_node=8 -m clip_finetune.train         # DDP, batch_size per GPU
    python -m clip_finetune.train profile=tiny                 # the demo's tiny ViT, CPU

Rows come from core.tables.encoder_rows: the model trains on the `fit` rows, early-stops and keeps
best.pt on the `select` slice (selection_fraction of the training folds), and only then is scored
once on the data stage's holdout fold, which it never trained on nor chose a checkpoint with, so
fusion and the ensemble later score that fold on rows this encoder never saw. Only rows whose
`has_image` is true take part: the data stage sets it only for an image it decoded and kept. An
image that still fails to decode in training is left out of the loss and counted in the epoch's
log line. When no training row has an image the stage steps aside: one log line and metrics.json
{"skipped": true, "reason": ..., "complete": true}.

The backbone learns at a far lower rate than the head; the first `freeze_blocks` blocks and the
norms can be frozen. Warmup then cosine, AMP (and TF32) on CUDA, gradient clipping; the loss is
summed on the device and read every LOG_EVERY_STEPS steps. Under torchrun, early stopping and the
checkpoint are decided on rank 0 and broadcast. The run folder out_dir/run_name holds config.json,
last.pt (every epoch, for resume), best.pt with best.json, history.csv, val_predictions.csv (the
holdout fold, chosen checkpoint), metrics.json and tensorboard/ (loss, learning rate, samples/s,
selection SMAPE).

With `encoder_folds=all` there is one fine-tune per fold (k times the cost): the encoder scored on
fold k trains and chooses its checkpoint outside fold k, in out_dir/run_name/fold_<k>/ with its own
last.pt, best.pt, history.csv, val_predictions.csv (fold k) and metrics.json; the run folder's
metrics.json holds each fold's and the mean scored-fold SMAPE. A re-run skips the folds already
finished and resumes the interrupted one. When one fold's encoder has no usable image to train on,
the whole stage steps aside as above: some train rows would have no encoder blind to them.
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from clip_finetune.config import PROFILES, ClipConfig
from clip_finetune.model import ClipRegressor, freeze
from core.config import parse_args, to_dict
from core.distributed import barrier, cleanup, init_device, judge_epoch
from core.encode import image_loader
from core.errors import PipelineError, run_cli
from core.io import atomic_save, write_json
from core.losses import get_loss, l1_log_loss
from core.metrics import format_table, price_bin_report, prices_from_log, smape
from core.open_clip_models import image_size_of, load_open_clip
from core.runs import (check_encoder_folds, claim_run_dir, clear_outputs, encoder_dir, encoder_folds, finished_encoder,
                       fold_summary, load_last, save_last)
from core.runtime import autocast, progress, seed_everything, setup_logging, warmup_cosine
from core.tables import encoder_rows, encoder_selection, load_table
from core.train_log import TENSORBOARD_DIR, DeviceMean, TrainLog, enable_tf32, is_log_step


@torch.no_grad()
def predict_log(model, loader, device, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(log1p price predictions, present) for every row of an ImageRows loader, in order."""
    model.eval()
    out, present = [], []
    for pixels, ok, _ in loader:
        with autocast(device, dtype):
            out.append(model(pixels.to(device, non_blocking=True)).float())  # copied to the host once, below
        present.append(ok)
    return torch.cat(out).cpu().numpy(), torch.cat(present).numpy().astype(bool)


def step_aside(run_dir: Path, reason: str, dist, log) -> dict:
    """No image to learn from: say so once and leave a complete run folder so a pipeline goes on."""
    metrics = {"skipped": True, "reason": reason, "complete": True}
    if dist.is_main:
        log.warning("clip_finetune steps aside, no image model is trained: %s", reason)
        # an earlier run's outputs must not be read as this one's
        clear_outputs(run_dir, ("best.pt", "best.json", "val_predictions.csv", TENSORBOARD_DIR))
        for stale in run_dir.glob("fold_*"):
            shutil.rmtree(stale)
        write_json(run_dir / "metrics.json", metrics)
    barrier(dist)
    cleanup(dist)
    return metrics


def main(cfg: ClipConfig) -> dict:
    check_encoder_folds(cfg)  # a bad value is refused before anything is written
    dist, device, dtype = init_device(cfg.device, cfg.precision)
    enable_tf32(device)
    run_dir = Path(cfg.out_dir) / cfg.run_name
    log = setup_logging("clip_finetune", run_dir if dist.is_main else None)
    finished = claim_run_dir(run_dir, cfg, write=dist.is_main,
                             outputs=("fold_*", "best.pt", "best.json", "last.pt", "history.csv", "val_predictions.csv",
                                      "metrics.json", TENSORBOARD_DIR))
    if finished:
        log.info("%s is complete for this config; nothing to do (resume=false retrains)", run_dir)
        cleanup(dist)
        return finished

    # data: the data stage's split. Each encoder fits on `fit`, chooses its checkpoint on `select` and
    # scores its fold once at the end. A row without an image takes part in neither: a blank image
    # with a real price would teach the model noise.
    table = load_table(cfg.data_dir, "train")
    folds = encoder_folds(cfg)
    plan = {fold: encoder_plan(cfg, table, fold) for fold in folds}
    blocked = {fold: reason for fold, (_, _, reason) in plan.items() if reason}
    if blocked:
        fold, reason = next(iter(blocked.items()))
        if cfg.encoder_folds == "all":
            reason = (f"the encoder scored on fold {fold} has nothing to learn from: {reason}; one encoder per fold "
                      f"needs every fold's")
        return step_aside(run_dir, reason, dist, log)

    per_fold = {}
    for fold in folds:
        fold_dir = encoder_dir(cfg, fold)
        if (finished := finished_encoder(cfg, fold_dir)) is not None:
            log.info("fold %d: encoder already trained (%s)", fold, fold_dir)
            per_fold[fold] = finished
            continue
        fit, select, _ = plan[fold]
        per_fold[fold] = train_encoder(cfg, table, fit, select, fold, fold_dir, dist, device, dtype, log)
    metrics = per_fold[fold]
    if cfg.encoder_folds == "all" and dist.is_main:
        metrics = fold_summary(per_fold)
        write_json(run_dir / "metrics.json", metrics)
        log.info("one encoder per fold: mean scored-fold SMAPE %s (%s)", f"{metrics['val_smape']:.3f}" if metrics["val_smape"]
                 is not None else "none", ", ".join(f"fold {k} {v if v is None else round(v, 2)}"
                                                    for k, v in metrics["val_smape_by_fold"].items()))
    barrier(dist)
    cleanup(dist)
    return metrics


def encoder_plan(cfg: ClipConfig, table: pd.DataFrame, scored_fold: int):
    """(fit, select, reason) for the encoder scored on `scored_fold`: the rows it may train on and
    choose its checkpoint with, and why it cannot be trained (None when it can)."""
    fit, select = encoder_rows(table, scored_fold, cfg.selection_fraction, cfg.seed)
    reason = None
    if not table["has_image"].to_numpy(bool)[fit].any():
        reason = (f"no training row has an image (has_image is false for all {int(fit.sum())} rows outside fold "
                  f"{scored_fold} and the selection slice)")
    return fit, select, reason


def train_encoder(cfg: ClipConfig, table: pd.DataFrame, fit: np.ndarray, select: np.ndarray, scored_fold: int,
                  run_dir: Path, dist, device, dtype, log) -> dict:
    """Fine-tune one encoder on `fit`, choose its checkpoint on `select` (a slice of its training
    folds), and score `scored_fold` once with that checkpoint; everything lands in `run_dir`."""
    seed_everything(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    usable = table["has_image"].to_numpy(bool)  # the data stage decoded and kept these images
    scored = table["fold"].to_numpy() == scored_fold
    if not usable[select].any():
        raise PipelineError(f"{cfg.data_dir}: none of the {int(select.sum())} selection rows of the encoder scored on "
                            f"fold {scored_fold} has a usable image; raise selection_fraction (now {cfg.selection_fraction})")
    fit_rows = table[fit & usable].reset_index(drop=True)
    select_rows = table[select & usable].reset_index(drop=True)
    holdout_rows = table[scored].reset_index(drop=True)
    holdout_usable = usable[scored]
    y_fit = torch.tensor(fit_rows["log_price"].to_numpy(), dtype=torch.float32, device=device)
    price_floor = float(fit_rows["price"].min())
    price_median = float(table.loc[fit, "price"].median())  # what a row without an image is given

    # model
    clip, preprocess_train, preprocess_eval, _ = load_open_clip(cfg.model, cfg.pretrained, "cpu")
    visual, size = clip.visual, image_size_of(clip.visual)
    with torch.no_grad():
        embed_dim = visual(torch.zeros(1, 3, size, size)).shape[1]
    del clip  # the text tower is not needed
    model = ClipRegressor(visual, embed_dim, cfg.head_hidden)
    trainable = freeze(model.visual, cfg.freeze_blocks, cfg.freeze_norms)
    with torch.no_grad():
        model.head[-1].bias.fill_(float(y_fit.median()))  # start at the median price
    model.to(device)
    ddp = model
    if dist.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)

    sampler = None
    if dist.enabled:
        sampler = torch.utils.data.distributed.DistributedSampler(range(len(fit_rows)), num_replicas=dist.world_size,
                                                                  rank=dist.rank, shuffle=True, seed=cfg.seed)
    train_loader = image_loader(fit_rows["image_path"], fit_rows["has_image"], preprocess_train, size, cfg.batch_size,
                                cfg.num_workers, device, shuffle=True, drop_last=len(fit_rows) > cfg.batch_size,
                                sampler=sampler, seed=cfg.seed)
    select_loader = image_loader(select_rows["image_path"], select_rows["has_image"], preprocess_eval, size,
                                 cfg.batch_size * 2, cfg.num_workers, device)

    backbone = [p for p in model.visual.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": backbone, "lr": cfg.lr_backbone},
                                   {"params": model.head.parameters(), "lr": cfg.lr_head}], weight_decay=cfg.weight_decay)
    schedule = warmup_cosine(cfg.epochs * len(train_loader), cfg.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    loss_fn = get_loss(cfg.loss)

    start_epoch, best, bad_epochs, history = 0, math.inf, 0, []
    last_path = run_dir / "last.pt"
    if (state := load_last(last_path, cfg)) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, bad_epochs, history = state["epoch"] + 1, state["best"], state["bad_epochs"], state["history"]
        log.info("resumed at epoch %d (best selection SMAPE %.3f)", start_epoch, best)
    log.info("%s: %d-d image vectors at %d px; %s trainable backbone parameters; %d fit / %d select / %d fold-%d "
             "images (%d train rows without a usable image left out); device %s x%d, amp %s", cfg.model, embed_dim,
             size, f"{trainable:,}", len(fit_rows), len(select_rows), int(holdout_usable.sum()), scored_fold,
             int((~usable).sum()), device, dist.world_size, dtype)

    board = TrainLog(run_dir, enabled=dist.is_main)
    with board:
        for epoch in range(start_epoch, cfg.epochs):
            if bad_epochs >= cfg.early_stopping_patience:
                log.info("early stop: no better selection SMAPE in %d epochs", bad_epochs)
                break
            t0 = time.time()
            if sampler is not None:
                sampler.set_epoch(epoch)
            else:
                train_loader.generator.manual_seed(cfg.seed + epoch)  # same batches after a resume
            ddp.train()
            use_l1 = epoch < cfg.l1_warmup_epochs
            epoch_loss = l1_log_loss if use_l1 else loss_fn
            running, masked = DeviceMean(), 0
            board.start()
            bar = progress(train_loader, desc=f"clip epoch {epoch}", disable=None if dist.is_main else True,
                           samples_per_step=cfg.batch_size * dist.world_size, log=log)
            for step, (pixels, present, idx) in enumerate(bar):
                with autocast(device, dtype):
                    pred = ddp(pixels.to(device, non_blocking=True)).float()
                target = y_fit[idx.to(device, non_blocking=True)]
                n_kept = int(present.sum())  # `present` is on the host: no wait for the GPU
                if n_kept == len(idx):
                    loss = epoch_loss(pred, target)
                elif n_kept:  # an image that failed to decode here is left out of the loss
                    keep = present.nonzero().squeeze(1).to(device, non_blocking=True)
                    loss = epoch_loss(pred[keep], target[keep])
                else:
                    loss = pred.sum() * 0.0  # nothing to learn here, but DDP ranks stay in step
                masked += len(idx) - n_kept
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                running.add(loss, n_kept)
                board.count(len(idx) * dist.world_size)
                if is_log_step(step, len(train_loader)):
                    interval_loss, lr = running.read(), optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=interval_loss, lr=lr)
                    board.scalars(epoch * len(train_loader) + step + 1, **{
                        "train/loss": interval_loss, "train/lr_backbone": lr,
                        "train/lr_head": optimizer.param_groups[1]["lr"], "train/samples_per_s": board.rate()})
            if not running.finite:
                raise FloatingPointError(f"epoch {epoch}: loss is not finite; lower lr_backbone or use loss=l1")
            if masked:
                log.warning("epoch %d: %d fit image(s) failed to decode during training and were left out of the loss",
                            epoch, masked)
            select_log, select_present = predict_log(model, select_loader, device, dtype)
            select_smape = smape(select_rows["price"].to_numpy()[select_present],
                                 prices_from_log(select_log[select_present], price_floor))
            improved, best, bad_epochs = judge_epoch(dist, select_smape, best, bad_epochs)
            history.append({"epoch": epoch, "train_loss": running.mean() if running.weight else 0.0,
                            "loss": "l1_warmup" if use_l1 else cfg.loss, "select_smape": select_smape,
                            "lr_backbone": optimizer.param_groups[0]["lr"], "masked_images": masked,
                            "seconds": time.time() - t0})
            board.scalars((epoch + 1) * len(train_loader), **{"select/smape": select_smape,
                                                               "epoch/train_loss": history[-1]["train_loss"]})
            if dist.is_main:
                if improved:
                    ckpt = {"visual": model.visual.state_dict(), "head": model.head.state_dict(),
                            "embed_dim": embed_dim, "config": to_dict(cfg), "epoch": epoch,
                            "select_smape": select_smape, "selection": encoder_selection(cfg.selection_fraction), "price_floor": price_floor,
                            "price_median": price_median}
                    atomic_save(lambda tmp: torch.save(ckpt, tmp), run_dir / "best.pt")
                    write_json(run_dir / "best.json", {k: v for k, v in ckpt.items() if k not in ("visual", "head")})
                save_last(last_path, cfg, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                           "scheduler": scheduler.state_dict(), "epoch": epoch, "best": best,
                                           "bad_epochs": bad_epochs}, history)
            log.info("epoch %2d  loss %.4f  select SMAPE %.3f%s  lr %.2e  %.1fs", epoch, history[-1]["train_loss"],
                     select_smape, " *" if improved else "", history[-1]["lr_backbone"], history[-1]["seconds"])
            barrier(dist)

    metrics = {"select_smape": best, "epochs_run": len(history), "fit_images": len(fit_rows),
               "select_images": len(select_rows), "val_images": int(holdout_usable.sum()),
               "selection": encoder_selection(cfg.selection_fraction),
               "scored_fold": scored_fold}
    if dist.is_main:
        metrics.update(score_holdout(model, run_dir, holdout_rows, holdout_usable, preprocess_eval, size, cfg, device,
                                     dtype, price_median, log))
        write_json(run_dir / "metrics.json", {**metrics, "complete": True})
    barrier(dist)
    return {**metrics, "complete": True}


def score_holdout(model, run_dir: Path, rows: pd.DataFrame, usable: np.ndarray, transform, size: int, cfg, device,
                  dtype, price_median: float, log) -> dict:
    """The chosen checkpoint's predictions for every row of its scored fold (the training median
    where there is no usable image) to val_predictions.csv, and its SMAPE on the rows with an image."""
    ckpt = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)
    model.visual.load_state_dict(ckpt["visual"])
    model.head.load_state_dict(ckpt["head"])
    loader = image_loader(rows["image_path"], usable, transform, size, cfg.batch_size * 2, cfg.num_workers, device)
    log_pred, present = predict_log(model, loader, device, dtype)
    log_pred = np.where(present, log_pred, np.log1p(price_median))
    price = rows["price"].to_numpy()
    pred = prices_from_log(log_pred, ckpt["price_floor"])
    out = pd.DataFrame({"sample_id": rows["sample_id"], "fold": rows["fold"], "price": price, "pred": pred,
                        "log_pred": log_pred, "has_usable_image": present})
    atomic_save(lambda tmp: out.to_csv(tmp, index=False), run_dir / "val_predictions.csv")
    if not present.any():
        log.warning("no row of the scored fold has a usable image; the fold is not scored")
        return {"val_smape": None, "constant_median_val_smape": None, "best_epoch": ckpt["epoch"]}
    val_smape = smape(price[present], pred[present])
    baseline = smape(price[present], np.full(int(present.sum()), price_median))
    log.info("scored-fold SMAPE %.3f with the epoch-%d checkpoint (constant median %.3f), on %d holdout images:\n%s",
             val_smape, ckpt["epoch"], baseline, int(present.sum()),
             format_table(price_bin_report(price[present], pred[present])))
    return {"val_smape": val_smape, "constant_median_val_smape": baseline, "best_epoch": ckpt["epoch"]}


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(ClipConfig, profiles=PROFILES)))
