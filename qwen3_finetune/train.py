"""QLoRA-tune Qwen3-Embedding as a price regressor on product text plus three structural features.

    python -m qwen3_finetune.train                              # Qwen3-Embedding-0.6B, 4-bit QLoRA, one GPU
    python -m qwen3_finetune.train quantization=none            # plain bf16 LoRA (often faster on a big GPU)
    torchrun --nproc_per_node=4 -m qwen3_finetune.train         # DDP
    python -m qwen3_finetune.train profile=tiny                 # the demo's tiny Qwen3, CPU

Input `item_name [SEP] catalog_content`, truncated to max_length and padded per batch (batches of
similar length). The last-token (or mean) pooled vector is concatenated with the standardised
quantity_value, unit_volume and unit_weight and fed to a regression head on log1p(price). Trains
outside the data stage's holdout fold and chooses its checkpoint (early stopping, best/) on a seeded
`selection_fraction` slice of those folds, so the holdout fold, on which fusion and the ensemble are
scored, is neither trained on nor used to choose; it is scored once at the end. The run folder
out_dir/run_name holds config.json, epoch_<k>/ and best/ (adapter + head + scaler), last.pt
(optimizer, scheduler and loop state for resume), history.csv, metrics.json and tensorboard/ (loss,
learning rate, samples/s, selection SMAPE). The loss is summed on the device and read every
LOG_EVERY_STEPS steps; TF32 is on for fp32 matmuls on CUDA. Under torchrun, early stopping and the
checkpoint are decided on rank 0 and broadcast.
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from core.config import parse_args, to_dict
from core.distributed import barrier, cleanup, init_device, judge_epoch
from core.errors import run_cli
from core.io import write_json
from core.losses import get_loss, l1_log_loss
from core.metrics import prices_from_log, smape
from core.runs import (check_encoder_folds, claim_run_dir, encoder_dir, encoder_folds, finished_encoder, fold_summary,
                       load_last, save_last)
from core.runtime import autocast, progress, seed_everything, setup_logging, warmup_cosine
from core.tables import STRUCTURAL_FEATURES, encoder_rows, encoder_selection, load_table
from core.train_log import TENSORBOARD_DIR, DeviceMean, TrainLog, enable_tf32, is_log_step
from qwen3_finetune.config import PROFILES, QwenConfig
from qwen3_finetune.model import (FeatureScaler, PriceRegressor, add_lora, collate, length_batches, load_backbone,
                                  load_checkpoint, load_tokenizer, pads_left, qwen_input_text, run_rows,
                                  save_checkpoint, tokenize)


def main(cfg: QwenConfig) -> dict:
    dist, device, dtype = init_device(cfg.device, cfg.precision)
    enable_tf32(device)
    run_dir = Path(cfg.out_dir) / cfg.run_name
    log = setup_logging("qwen3_finetune", run_dir if dist.is_main else None)
    check_encoder_folds(cfg)
    finished = claim_run_dir(run_dir, cfg, write=dist.is_main,
                             outputs=("fold_*", "epoch_*", "best", "last.pt", "metrics.json", TENSORBOARD_DIR))
    if not cfg.finetune:
        metrics = {"skipped": True, "reason": "finetune=false: the encoder stays frozen; extraction reads the base model",
                   "complete": True}
        log.info("%s", metrics["reason"])
        if dist.is_main:
            write_json(run_dir / "metrics.json", metrics)
        cleanup(dist)
        return metrics
    if finished:
        log.info("%s is complete for this config; nothing to do (resume=false retrains)", run_dir)
        cleanup(dist)
        return finished

    table = load_table(cfg.data_dir, "train")
    tokenizer = load_tokenizer(cfg.model)
    texts = [qwen_input_text(n, c) for n, c in zip(table["item_name"], table["catalog_content"])]
    token_ids = tokenize(tokenizer, texts, cfg.max_length)
    per_fold = {}
    for fold in encoder_folds(cfg):
        fold_dir = encoder_dir(cfg, fold)
        if (finished := finished_encoder(cfg, fold_dir)) is not None:
            log.info("fold %d: encoder already trained (%s)", fold, fold_dir)
            per_fold[fold] = finished
            continue
        per_fold[fold] = train_encoder(cfg, table, token_ids, tokenizer, fold, fold_dir, dist, device, dtype, log)
    metrics = per_fold[fold]
    if cfg.encoder_folds == "all" and dist.is_main:
        metrics = fold_summary(per_fold)
        write_json(run_dir / "metrics.json", metrics)
        log.info("one encoder per fold: mean scored-fold SMAPE %.3f (%s)", metrics["val_smape"],
                 ", ".join(f"fold {k} {v:.2f}" for k, v in metrics["val_smape_by_fold"].items()))
    barrier(dist)
    cleanup(dist)
    return metrics


def train_encoder(cfg: QwenConfig, table, token_ids, tokenizer, scored_fold: int, run_dir: Path, dist, device, dtype,
                  log) -> dict:
    """Fine-tune one encoder outside `scored_fold`, choose its checkpoint on a slice of its training
    folds, and score `scored_fold` once with that checkpoint; everything lands in `run_dir`."""
    seed_everything(cfg.seed)
    is_fit, is_select = encoder_rows(table, scored_fold, cfg.selection_fraction, cfg.seed)
    is_holdout = ~(is_fit | is_select)

    scaler = FeatureScaler().fit(table.loc[is_fit, STRUCTURAL_FEATURES].to_numpy())
    features = scaler.transform(table[STRUCTURAL_FEATURES].to_numpy())
    y = torch.tensor(table["log_price"].to_numpy(), dtype=torch.float32, device=device)
    train_idx, val_idx = np.flatnonzero(is_fit), np.flatnonzero(is_select)
    price_floor = float(table.loc[is_fit, "price"].min())

    # model
    backbone = add_lora(load_backbone(cfg.model, cfg.quantization, device, cfg.gradient_checkpointing), cfg)
    model = PriceRegressor(backbone, backbone.config.hidden_size, cfg.head_hidden, cfg.pooling)
    with torch.no_grad():
        model.head[-1].bias.fill_(float(y[train_idx].median()))
    model.head.to(device)
    ddp = model
    if dist.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    lora_params = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": lora_params, "lr": cfg.lr},
                                   {"params": model.head.parameters(), "lr": cfg.head_lr}], weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(length_batches(np.zeros(len(train_idx)), cfg.batch_size, False, 0, dist.rank,
                                                   dist.world_size)) / cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, int(total_steps * cfg.warmup_ratio)))
    loss_fn = get_loss(cfg.loss)

    start_epoch, best, bad_epochs, history = 0, math.inf, 0, []
    last_path = run_dir / "last.pt"
    if (state := load_last(last_path, cfg)) is not None:
        set_peft_model_state_dict(backbone, state["adapter"])
        model.head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, bad_epochs, history = state["epoch"] + 1, state["best"], state["bad_epochs"], state["history"]
        log.info("resumed at epoch %d (best selection SMAPE %.3f)", start_epoch, best)
    n_trainable = sum(p.numel() for p in lora_params) + sum(p.numel() for p in model.head.parameters())
    log.info("%s (%s, LoRA r=%d, %s pooling): %s trainable parameters; %d train / %d val rows; mean %.0f tokens; "
             "device %s x%d, amp %s", cfg.model, cfg.quantization, cfg.lora_r, cfg.pooling, f"{n_trainable:,}",
             len(train_idx), len(val_idx), np.mean([len(t) for t in token_ids]), device, dist.world_size, dtype)

    board = TrainLog(run_dir, enabled=dist.is_main)
    with board:
        for epoch in range(start_epoch, cfg.epochs):
            if bad_epochs >= cfg.early_stopping_patience:
                log.info("early stop: no better selection SMAPE in %d epochs", bad_epochs)
                break
            t0 = time.time()
            ddp.train()
            use_l1 = epoch < cfg.l1_warmup_epochs
            batches = length_batches([len(token_ids[i]) for i in train_idx], cfg.batch_size, True, cfg.seed + epoch,
                                     dist.rank, dist.world_size)
            running, tokens = DeviceMean(), 0
            board.start()
            bar = progress(batches, desc=f"qwen epoch {epoch}", disable=None if dist.is_main else True,
                           samples_per_step=cfg.batch_size * dist.world_size, log=log)
            for step, local in enumerate(bar):
                idx = train_idx[local]
                # built on the host and copied without blocking: a blocking copy would wait for the GPU
                ids, mask = collate(token_ids, idx, tokenizer.pad_token_id, torch.device("cpu"),
                                    left=pads_left(cfg.pooling))
                ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
                with autocast(device, dtype):
                    pred = ddp(ids, mask, torch.from_numpy(features[idx]).to(device, non_blocking=True))
                target = y[torch.from_numpy(idx).to(device, non_blocking=True)]
                loss = (l1_log_loss if use_l1 else loss_fn)(pred.float(), target)
                (loss / cfg.grad_accum).backward()
                if (step + 1) % cfg.grad_accum == 0 or step + 1 == len(batches):
                    torch.nn.utils.clip_grad_norm_(lora_params + list(model.head.parameters()), cfg.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                running.add(loss, len(idx))
                tokens += sum(len(token_ids[i]) for i in idx)  # the mask's sum, counted on the host
                board.count(len(idx) * dist.world_size)
                if is_log_step(step, len(batches)):
                    interval_loss, lr = running.read(), optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=interval_loss, lr=lr)
                    board.scalars(epoch * len(batches) + step + 1, **{
                        "train/loss": interval_loss, "train/lr": lr, "train/lr_head": optimizer.param_groups[1]["lr"],
                        "train/samples_per_s": board.rate()})
            if not running.finite:
                raise FloatingPointError(f"epoch {epoch}: loss is not finite; lower lr, or use precision=bf16 on GPU")
            val_log = run_rows(model, [token_ids[i] for i in val_idx], features[val_idx], cfg.eval_batch_size,
                               tokenizer.pad_token_id, device, dtype)
            val_pred = prices_from_log(val_log, price_floor)
            val_smape = smape(table["price"].to_numpy()[val_idx], val_pred)
            improved, best, bad_epochs = judge_epoch(dist, val_smape, best, bad_epochs)
            seconds = time.time() - t0
            history.append({"epoch": epoch, "train_loss": running.mean(), "loss": "l1_warmup" if use_l1 else cfg.loss,
                            "selection_smape": val_smape, "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
                            "train_tokens_per_s": tokens * dist.world_size / seconds})
            board.scalars((epoch + 1) * len(batches), **{
                "select/smape": val_smape, "epoch/train_loss": history[-1]["train_loss"],
                "epoch/train_tokens_per_s": history[-1]["train_tokens_per_s"]})
            if dist.is_main:
                meta = {"config": to_dict(cfg), "epoch": epoch, "selection_smape": val_smape,
                        "price_floor": price_floor}
                save_checkpoint(run_dir / f"epoch_{epoch}", model, scaler, meta)
                if improved:
                    shutil.rmtree(run_dir / "best", ignore_errors=True)
                    shutil.copytree(run_dir / f"epoch_{epoch}", run_dir / "best")
                save_last(last_path, cfg, {"adapter": get_peft_model_state_dict(backbone),
                                           "head": model.head.state_dict(), "optimizer": optimizer.state_dict(),
                                           "scheduler": scheduler.state_dict(), "epoch": epoch, "best": best,
                                           "bad_epochs": bad_epochs}, history)
            log.info("epoch %d  loss %.4f  selection SMAPE %.3f%s  lr %.2e  %.0f tokens/s  %.1fs", epoch,
                     history[-1]["train_loss"], val_smape, " *" if improved else "", history[-1]["lr"],
                     history[-1]["train_tokens_per_s"], seconds)
            barrier(dist)

    metrics = {}
    if dist.is_main:  # the chosen checkpoint, scored once on the fold it never saw
        holdout_idx = np.flatnonzero(is_holdout)
        best_model, _ = load_checkpoint(run_dir / "best", cfg, device)
        holdout_log = run_rows(best_model, [token_ids[i] for i in holdout_idx], features[holdout_idx],
                               cfg.eval_batch_size, tokenizer.pad_token_id, device, dtype)
        y_holdout = table["price"].to_numpy()[holdout_idx]
        baseline = smape(y_holdout, np.full(len(holdout_idx), table.loc[is_fit, "price"].median()))
        metrics = {"val_smape": smape(y_holdout, prices_from_log(holdout_log, price_floor)), "scored_fold": scored_fold,
                   "selection_smape": best, "constant_median_val_smape": baseline, "epochs_run": len(history),
                   "selection": encoder_selection(cfg.selection_fraction), "complete": True}
        write_json(run_dir / "metrics.json", metrics)
        log.info("fold %d SMAPE %.3f with the checkpoint chosen on the selection slice (%.3f); constant median %.3f; "
                 "best checkpoint %s", scored_fold, metrics["val_smape"], best, baseline, run_dir / "best")
    barrier(dist)
    return metrics




if __name__ == "__main__":
    run_cli(lambda: main(parse_args(QwenConfig, profiles=PROFILES)))
