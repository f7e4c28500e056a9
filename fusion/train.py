"""Train a fusion regressor on cached embeddings. One trainer for every fusion model.

    python -m fusion.train model=all_embeddings                 # GPU box, real defaults
    python -m fusion.train model=qwen_clip block=gated lr=5e-4   # any field as key=value
    python -m fusion.train model=all_embeddings profile=tiny     # the demo, CPU

`model=` picks the model's config.py (fusion/<model>/config.py); other tokens override its
fields. The split is the data stage's `fold` column: `folds=holdout` trains on the other folds and
scores the holdout fold; `folds=all` trains one model per fold and writes out-of-fold
predictions for every training row. With `selection=inner` (the default) the epochs (early
stopping, LR plateau, best checkpoint) are judged on a seeded slice of the training folds and the
scored fold is predicted once, at the end; `selection=scored_fold` judges them on the scored fold
itself (optimistic). Sources whose cache was skipped are left out with a log line. Embeddings are
kept as tensors on the device and batches are indexed directly; the loss and the expert load are
summed on the device and read every LOG_EVERY_STEPS steps, and TF32 is on for fp32 matmuls on
CUDA. The run folder out_dir/run_name holds config.json, metrics.json (the folds this run
trained) and per fold best.pt (+ best.json), last.pt (resume: written at most every
LAST_SAVE_SECONDS and when the fold's training ends), history.csv (with last.pt), metrics.json,
val_predictions.csv and tensorboard/ (loss, learning rate, samples/s, selection SMAPE, expert
load); a fresh start (resume=false, or nothing to resume) first clears what an earlier run left
there. This trainer runs in one process (fusion's epochs take seconds on one GPU).
"""
from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.config import ConfigError, parse_args, to_dict
from core.errors import run_cli
from core.io import atomic_save, read_json, write_json
from core.losses import get_loss, l1_log_loss
from core.metrics import format_table, price_bin_report, prices_from_log, smape
from core.runs import claim_run_dir, is_fresh_start, load_last, save_last
from core.runtime import amp_dtype, autocast, pick_device, progress, seed_everything, setup_logging
from core.tables import encoder_rows, holdout_fold, load_table, n_folds
from core.train_log import DeviceMean, TrainLog, enable_tf32, is_log_step
from fusion.config import FusionConfig, model_profiles
from fusion.inference import (EXPERT_LOAD_NOTE, FusionInputs, available_sources, load_checkpoint, load_inputs,
                              pooled_load, predict_log, predict_with_load, with_fold_sources)
from fusion.models import build_model, count_parameters, specs_to_dicts

SELECTIONS = ("inner", "scored_fold")
# what a run writes in its folder; a fresh start removes these before training
RUN_OUTPUTS = ("fold_*", "metrics.json", "oof_predictions.csv", "test_out.csv", "eval")
# seconds between two writes of a fold's last.pt (plus one when the fold ends): at full size it is
# about 130 MB and an epoch takes about a second, so saving every epoch would dominate the run
LAST_SAVE_SECONDS = 60.0


def parse_cli(argv: list[str] | None = None) -> FusionConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    model = "all_embeddings"
    for token in list(argv):
        if token.startswith("model="):
            model = token.split("=", 1)[1]
            argv.remove(token)
    profiles = model_profiles(model)
    if not any(t.startswith("profile=") for t in argv):
        argv.insert(0, "profile=default")
    return parse_args(FusionConfig, argv, profiles)


def routed_load(model) -> torch.Tensor | None:
    """The last forward pass's per-expert share of rows, left on the device (None without experts)."""
    for module in model.modules():
        load = getattr(module, "last_load", None)
        if load is not None:
            return load
    return None


def selection_rows(cfg: FusionConfig, table: pd.DataFrame, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, select) boolean masks for scoring `fold`: the model trains on `fit`, and `select` judges
    its epochs. inner: `select` is a seeded slice of the other folds, so no scored row chooses an epoch."""
    if cfg.selection == "inner":
        return encoder_rows(table, fold, cfg.selection_fraction, seed=cfg.seed + fold)
    scored = table["fold"].to_numpy() == fold
    return ~scored, scored


def selection_sentence(cfg: FusionConfig) -> str:
    """How each fold chose its checkpoint, for metrics and the predictions' meta."""
    if cfg.selection == "scored_fold":
        return ("best epoch on the scored fold: optimistic (early stopping, LR plateau and the checkpoint were "
                "judged on the rows the fold is scored on)")
    return (f"best epoch on a seeded {cfg.selection_fraction:.0%} slice of the training folds (early stopping, "
            "LR plateau, checkpoint); the scored fold was predicted once, with that checkpoint")


def check_config(cfg: FusionConfig) -> None:
    if cfg.folds not in ("holdout", "all"):
        raise ConfigError(f"folds must be 'holdout' or 'all', got {cfg.folds!r}")
    if cfg.selection not in SELECTIONS:
        raise ConfigError(f"selection must be one of {', '.join(SELECTIONS)}, got {cfg.selection!r}")
    if cfg.selection == "inner" and not 0 < cfg.selection_fraction < 1:
        raise ConfigError(f"selection_fraction must be between 0 and 1, got {cfg.selection_fraction}")


def train_fold(cfg: FusionConfig, fold: int, table: pd.DataFrame, inputs: FusionInputs, run_dir: Path, device, log):
    fold_dir = run_dir / f"fold_{fold}"
    metrics_path = fold_dir / "metrics.json"
    if cfg.resume and metrics_path.exists() and read_json(metrics_path).get("complete"):
        log.info("fold %d is complete in %s; skipping", fold, fold_dir)
        return read_json(metrics_path)
    fold_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed + fold)
    dtype = amp_dtype(device, cfg.precision)
    is_val = table["fold"].to_numpy() == fold
    fit, select = selection_rows(cfg, table, fold)
    train_idx = torch.from_numpy(np.flatnonzero(fit)).to(device)
    select_idx = torch.from_numpy(np.flatnonzero(select)).to(device)
    val_idx = torch.from_numpy(np.flatnonzero(is_val)).to(device)
    y = torch.tensor(table["log_price"].to_numpy(), dtype=torch.float32, device=device)
    prices = table["price"].to_numpy()
    y_val_price, y_select_price = prices[is_val], prices[select]
    price_floor = float(prices[~is_val].min())

    model = build_model(cfg, inputs.specs).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.plateau_factor,
                                                           patience=cfg.plateau_patience)
    loss_fn = get_loss(cfg.loss, cfg.price_thresholds, cfg.tier_weights)
    start_epoch, best, best_epoch, bad_epochs, history = 0, math.inf, -1, 0, []
    last_path = fold_dir / "last.pt"
    if (state := load_last(last_path, cfg, map_location=device)) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, best_epoch = state["epoch"] + 1, state["best"], state["best_epoch"]
        bad_epochs, history = state["bad_epochs"], state["history"]
        log.info("fold %d: resumed at epoch %d (best selection SMAPE %.3f at epoch %d)", fold, start_epoch, best,
                 best_epoch)
    log.info("fold %d: %d train / %d selection / %d scored rows (selection=%s), %s parameters, device %s, amp %s",
             fold, len(train_idx), len(select_idx), len(val_idx), cfg.selection, f"{count_parameters(model):,}",
             device, dtype)

    board = TrainLog(fold_dir)
    last_saved, saved_epoch = time.monotonic(), start_epoch - 1
    with board:
        for epoch in range(start_epoch, cfg.epochs):
            if bad_epochs >= cfg.early_stopping_patience:
                break
            t0 = time.time()
            model.train()
            use_l1 = epoch < cfg.l1_warmup_epochs
            gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + fold * 100_000 + epoch)
            perm = train_idx[torch.randperm(len(train_idx), generator=gen).to(device)]
            running, loads = DeviceMean(), DeviceMean()
            board.start()
            steps = math.ceil(len(perm) / cfg.batch_size)
            bar = progress(range(0, len(perm), cfg.batch_size), desc=f"fold {fold} epoch {epoch}", leave=False,
                           samples_per_step=cfg.batch_size, log=log)
            for step, start in enumerate(bar):
                idx = perm[start:start + cfg.batch_size]
                xb, mb = inputs.batch(idx)
                with autocast(device, dtype):
                    pred, aux = model(xb, mb)
                loss = (l1_log_loss if use_l1 else loss_fn)(pred.float(), y[idx]) + aux.float()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                running.add(loss, len(idx))
                if (load := routed_load(model)) is not None:
                    loads.add(load)
                board.count(len(idx))
                if is_log_step(step, steps):
                    interval_loss = running.read()
                    loads.read()  # into the epoch's mean load
                    bar.set_postfix(loss=interval_loss)
                    board.scalars(epoch * steps + step + 1, **{"train/loss": interval_loss,
                                                               "train/samples_per_s": board.rate()})
            if not running.finite:
                raise FloatingPointError(f"fold {fold} epoch {epoch}: loss is not finite; lower lr or check the "
                                         "embeddings for NaN")
            select_pred = prices_from_log(predict_log(model, inputs, select_idx, cfg.batch_size, device, dtype),
                                          price_floor)
            select_smape = smape(y_select_price, select_pred)
            scheduler.step(select_smape)
            row = {"epoch": epoch, "train_loss": running.mean(), "loss": "l1_warmup" if use_l1 else cfg.loss,
                   "select_smape": select_smape, "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0}
            epoch_load = loads.mean()
            if epoch_load is not None:
                row["expert_load"] = str(np.round(epoch_load, 3).tolist())
            history.append(row)
            board.scalars((epoch + 1) * steps, **{"select/smape": select_smape, "train/lr": row["lr"],
                                                  "epoch/train_loss": row["train_loss"]},
                          **{f"expert_load/expert_{e}": x for e, x in enumerate(epoch_load or [])})
            improved = select_smape < best
            if improved:
                best, best_epoch, bad_epochs = select_smape, epoch, 0
                ckpt = {"model": model.state_dict(), "config": to_dict(cfg), "sources": specs_to_dicts(inputs.specs),
                        "epoch": epoch, "select_smape": select_smape, "selection": cfg.selection,
                        "price_floor": price_floor, "fold": fold}
                atomic_save(lambda tmp: torch.save(ckpt, tmp), fold_dir / "best.pt")
                write_json(fold_dir / "best.json", {k: v for k, v in ckpt.items() if k != "model"})
            else:
                bad_epochs += 1
            log.info("fold %d epoch %3d  loss %.4f  selection SMAPE %.3f%s  lr %.2e  %.1fs%s", fold, epoch,
                     row["train_loss"], select_smape, " *" if improved else "", row["lr"], row["seconds"],
                     f"  expert load {row['expert_load']}" if "expert_load" in row else "")
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "best": best, "best_epoch": best_epoch,
                     "bad_epochs": bad_epochs}
            if time.monotonic() - last_saved >= LAST_SAVE_SECONDS:
                save_last(last_path, cfg, state, history)
                last_saved, saved_epoch = time.monotonic(), epoch
        if history and saved_epoch < history[-1]["epoch"]:  # the end of the fold's training is always saved
            save_last(last_path, cfg, state, history)

    # the scored fold is predicted once, with the chosen checkpoint
    model, chosen = load_checkpoint(fold_dir / "best.pt", device)
    # best.pt may come from epochs replayed after a resume from an older last.pt: report the file's own
    best, best_epoch = chosen["select_smape"], chosen["epoch"]
    val_log, val_load = predict_with_load(model, inputs, val_idx, cfg.batch_size, device, dtype)
    val_pred = prices_from_log(val_log, price_floor)
    val_ids = table["sample_id"].to_numpy()[is_val]
    predictions = pd.DataFrame({"sample_id": val_ids, "fold": fold, "price": y_val_price, "pred": val_pred,
                                "log_pred": val_log})
    atomic_save(lambda tmp: predictions.to_csv(tmp, index=False), fold_dir / "val_predictions.csv")
    report = price_bin_report(y_val_price, val_pred)
    log.info("fold %d best epoch %d, scored fold by price bin:\n%s", fold, best_epoch, format_table(report))
    metrics = {"fold": fold, "val_smape": smape(y_val_price, val_pred), "best_epoch": best_epoch,
               "best_select_smape": best, "selection": cfg.selection, "selection_rows": int(select.sum()),
               "train_rows": int(fit.sum()), "epochs_run": len(history), "parameters": count_parameters(model),
               "price_floor": price_floor, "expert_load": val_load,
               "by_price_bin": report.to_dict(orient="records"), "complete": True}
    write_json(metrics_path, metrics)
    return metrics


def clear_predictions(cfg: FusionConfig, log) -> None:
    """A fresh run's shared predictions come from this run only: drop those an earlier run wrote."""
    folder = Path(cfg.predictions_dir) / cfg.run_name
    if (folder / "meta.json").exists():
        log.info("fresh run: removing the earlier run's predictions in %s", folder)
        shutil.rmtree(folder)


def main(cfg: FusionConfig) -> dict:
    check_config(cfg)
    run_dir = Path(cfg.out_dir) / cfg.run_name
    log = setup_logging("fusion.train", run_dir)
    sources = available_sources(cfg, log)  # before the folder is claimed: no source left is an error that changes nothing
    fresh = is_fresh_start(run_dir, cfg)
    # a finished run still reloads: its folds are skipped one by one
    claim_run_dir(run_dir, cfg, outputs=RUN_OUTPUTS)
    if fresh:
        clear_predictions(cfg, log)
    device = pick_device(cfg.device)
    enable_tf32(device)
    table = load_table(cfg.data_dir, "train")
    inputs = load_inputs(cfg, "train", table["sample_id"].tolist(), device, sources)
    log.info("sources: %s", ", ".join(f"{s.name} ({s.modality}, {s.dim})" for s in inputs.specs))
    all_folds = list(range(n_folds(cfg.data_dir)))
    folds = [holdout_fold(cfg.data_dir)] if cfg.folds == "holdout" else all_folds
    unseen = all_folds if cfg.encoder_unseen_folds is None else list(cfg.encoder_unseen_folds)
    seen = [k for k in folds if k not in unseen]
    if seen:
        log.warning("upstream encoders trained on rows of fold(s) %s, so their scores and out-of-fold predictions "
                    "are optimistic; only fold(s) %s are free of rows they saw", seen, unseen)
    t0 = time.time()
    per_fold = [train_fold(cfg, k, table, with_fold_sources(cfg, inputs, "train", k, device, log), run_dir, device, log)
                for k in folds]
    scores = [m["val_smape"] for m in per_fold]
    summary = {"model": cfg.run_name, "folds": folds, "val_smape_per_fold": scores,
               "val_smape_mean": float(np.mean(scores)), "val_smape_std": float(np.std(scores)),
               "parameters": per_fold[0]["parameters"], "train_seconds": time.time() - t0,
               "sources": [s.name for s in inputs.specs], "selection": cfg.selection,
               "selection_note": selection_sentence(cfg), "encoder_unseen_folds": unseen, "complete": True}
    fold_rows = table["fold"].value_counts()
    if (loads := [(m["expert_load"], int(fold_rows[m["fold"]])) for m in per_fold if m.get("expert_load") is not None]):
        summary["expert_load"] = pooled_load(loads)  # over every scored row of the run's folds
        summary["expert_load_note"] = EXPERT_LOAD_NOTE
    if cfg.folds == "all":
        oof = pd.concat([pd.read_csv(run_dir / f"fold_{k}" / "val_predictions.csv", dtype={"sample_id": str}) for k in folds])
        oof = oof.set_index("sample_id").loc[table["sample_id"].astype(str)].reset_index()
        atomic_save(lambda tmp: oof.to_csv(tmp, index=False), run_dir / "oof_predictions.csv")
        summary["oof_smape"] = smape(oof["price"], oof["pred"])
    write_json(run_dir / "metrics.json", summary)
    log.info("scored-fold SMAPE %.3f (std %.3f over %d fold(s)), epochs chosen by %s; run folder %s",
             summary["val_smape_mean"], summary["val_smape_std"], len(folds), cfg.selection, run_dir)
    return summary


if __name__ == "__main__":
    run_cli(lambda: main(parse_cli()))
