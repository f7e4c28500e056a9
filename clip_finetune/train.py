"""Fine-tune an open_clip image tower with a regression head on log1p(price).

    python -m clip_finetune.train                              # ViT-L-14 (openai), one GPU
    torchrun --nproc_per_node=8 -m clip_finetune.train         # DDP, batch_size per GPU
    python -m clip_finetune.train profile=tiny                 # the demo's tiny ViT, CPU

Trains on rows with a usable image outside the data stage's holdout fold and validates on the
holdout fold, so the fusion model later validates on rows this encoder never saw. The backbone
learns at a far lower rate than the head; the first `freeze_blocks` blocks and the norms can be
frozen. Warmup then cosine, AMP on CUDA, gradient clipping, early stopping on validation SMAPE.
The run folder out_dir/run_name holds config.json, last.pt (every epoch, for resume), best.pt
with best.json, history.csv, val_predictions.csv and metrics.json.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from clip_finetune.config import PROFILES, ClipConfig
from clip_finetune.model import ClipRegressor, freeze
from core.config import parse_args, to_dict
from core.distributed import barrier, cleanup, init_device
from core.encode import image_loader
from core.errors import run_cli
from core.io import atomic_save, write_json
from core.losses import get_loss, l1_log_loss
from core.metrics import format_table, price_bin_report, prices_from_log, smape
from core.open_clip_models import image_size_of, load_open_clip
from core.runs import claim_run_dir
from core.runtime import autocast, progress, seed_everything, setup_logging, warmup_cosine
from core.tables import holdout_fold, load_table


@torch.no_grad()
def predict_log(model, loader, device, dtype) -> np.ndarray:
    model.eval()
    out = []
    for pixels, _, _ in loader:
        with autocast(device, dtype):
            out.append(model(pixels.to(device, non_blocking=True)).float().cpu())
    return torch.cat(out).numpy()


def main(cfg: ClipConfig) -> dict:
    dist, device, dtype = init_device(cfg.device, cfg.precision)
    run_dir = Path(cfg.out_dir) / cfg.run_name
    log = setup_logging("clip_finetune", run_dir if dist.is_main else None)
    finished = claim_run_dir(run_dir, cfg, write=dist.is_main)
    if finished:
        log.info("%s is complete for this config; nothing to do (resume=false retrains)", run_dir)
        cleanup(dist)
        return finished
    seed_everything(cfg.seed)

    # data: the data stage's split; rows without an image cannot teach an image model
    table = load_table(cfg.data_dir, "train")
    holdout = holdout_fold(cfg.data_dir)
    usable = table[table["has_image"]].reset_index(drop=True)
    train_rows, val_rows = usable[usable["fold"] != holdout], usable[usable["fold"] == holdout]
    y_train = torch.tensor(train_rows["log_price"].to_numpy(), dtype=torch.float32)
    price_floor = float(train_rows["price"].min())

    # model
    clip, preprocess_train, preprocess_eval, _ = load_open_clip(cfg.model, cfg.pretrained, "cpu")
    visual, size = clip.visual, image_size_of(clip.visual)
    with torch.no_grad():
        embed_dim = visual(torch.zeros(1, 3, size, size)).shape[1]
    del clip  # the text tower is not needed
    model = ClipRegressor(visual, embed_dim, cfg.head_hidden)
    trainable = freeze(model.visual, cfg.freeze_blocks, cfg.freeze_norms)
    with torch.no_grad():
        model.head[-1].bias.fill_(float(y_train.median()))  # start at the median price
    model.to(device)
    ddp = model
    if dist.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)

    sampler = None
    if dist.enabled:
        sampler = torch.utils.data.distributed.DistributedSampler(range(len(train_rows)), num_replicas=dist.world_size,
                                                                  rank=dist.rank, shuffle=True, seed=cfg.seed)
    train_loader = image_loader(train_rows["image_path"], train_rows["has_image"], preprocess_train, size, cfg.batch_size,
                                cfg.num_workers, device, shuffle=True, drop_last=len(train_rows) > cfg.batch_size,
                                sampler=sampler, seed=cfg.seed)
    val_loader = image_loader(val_rows["image_path"], val_rows["has_image"], preprocess_eval, size,
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
    if cfg.resume and last_path.exists():
        state = torch.load(last_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, bad_epochs, history = state["epoch"] + 1, state["best"], state["bad_epochs"], state["history"]
        torch.set_rng_state(state["rng"])
        log.info("resumed at epoch %d (best val SMAPE %.3f)", start_epoch, best)
    log.info("%s: %d-d image vectors at %d px; %s trainable backbone parameters; %d train / %d val images; "
             "device %s x%d, amp %s", cfg.model, embed_dim, size, f"{trainable:,}", len(train_rows), len(val_rows),
             device, dist.world_size, dtype)

    for epoch in range(start_epoch, cfg.epochs):
        if bad_epochs >= cfg.early_stopping_patience:
            log.info("early stop: no better validation SMAPE in %d epochs", bad_epochs)
            break
        t0 = time.time()
        if sampler is not None:
            sampler.set_epoch(epoch)
        else:
            train_loader.generator.manual_seed(cfg.seed + epoch)  # same batches after a resume
        ddp.train()
        use_l1 = epoch < cfg.l1_warmup_epochs
        total, count = 0.0, 0
        for pixels, _, idx in progress(train_loader, desc=f"clip epoch {epoch}", disable=None if dist.is_main else True):
            with autocast(device, dtype):
                pred = ddp(pixels.to(device, non_blocking=True))
            loss = (l1_log_loss if use_l1 else loss_fn)(pred.float(), y_train[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total, count = total + float(loss.detach()) * len(idx), count + len(idx)
        if not math.isfinite(total):
            raise FloatingPointError(f"epoch {epoch}: loss is not finite; lower lr_backbone or use loss=l1")
        val_pred = prices_from_log(predict_log(model, val_loader, device, dtype), price_floor)
        val_smape = smape(val_rows["price"], val_pred)
        improved = val_smape < best
        best, bad_epochs = (val_smape, 0) if improved else (best, bad_epochs + 1)
        history.append({"epoch": epoch, "train_loss": total / max(count, 1), "loss": "l1_warmup" if use_l1 else cfg.loss,
                        "val_smape": val_smape, "lr_backbone": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0})
        if dist.is_main:
            if improved:
                ckpt = {"visual": model.visual.state_dict(), "head": model.head.state_dict(), "embed_dim": embed_dim,
                        "config": to_dict(cfg), "epoch": epoch, "val_smape": val_smape, "price_floor": price_floor}
                atomic_save(lambda tmp: torch.save(ckpt, tmp), run_dir / "best.pt")
                write_json(run_dir / "best.json", {k: v for k, v in ckpt.items() if k not in ("visual", "head")})
                atomic_save(lambda tmp: pd.DataFrame({"sample_id": val_rows["sample_id"], "price": val_rows["price"],
                                                      "pred": val_pred}).to_csv(tmp, index=False),
                            run_dir / "val_predictions.csv")
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "epoch": epoch, "best": best, "bad_epochs": bad_epochs, "history": history, "rng": torch.get_rng_state()}
            atomic_save(lambda tmp: torch.save(state, tmp), last_path)
            atomic_save(lambda tmp: pd.DataFrame(history).to_csv(tmp, index=False), run_dir / "history.csv")
        log.info("epoch %2d  loss %.4f  val SMAPE %.3f%s  lr %.2e  %.1fs", epoch, history[-1]["train_loss"], val_smape,
                 " *" if improved else "", history[-1]["lr_backbone"], history[-1]["seconds"])
        barrier(dist)

    baseline = smape(val_rows["price"], np.full(len(val_rows), train_rows["price"].median()))
    metrics = {"val_smape": best, "constant_median_val_smape": baseline, "epochs_run": len(history),
               "train_images": len(train_rows), "val_images": len(val_rows), "complete": True}
    if dist.is_main:
        preds = pd.read_csv(run_dir / "val_predictions.csv")
        log.info("best validation SMAPE %.3f (constant median %.3f):\n%s", best, baseline,
                 format_table(price_bin_report(preds["price"], preds["pred"])))
        write_json(run_dir / "metrics.json", metrics)
    barrier(dist)
    cleanup(dist)
    return metrics


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(ClipConfig, profiles=PROFILES)))
