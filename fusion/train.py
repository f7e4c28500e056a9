"""Train a fusion regressor on cached embeddings. One trainer for every fusion model.

    python -m fusion.train model=all_embeddings                 # GPU box, real defaults
    python -m fusion.train model=qwen_clip block=gated lr=5e-4   # any field as key=value
    python -m fusion.train model=all_embeddings profile=tiny     # the demo, CPU

`model=` picks the model's config.py (fusion/<model>/config.py); other tokens override its
fields. The split is the data stage's `fold` column: `folds=holdout` trains on the other folds and
validates on the holdout fold; `folds=all` trains one model per fold and writes out-of-fold
predictions for every training row. Embeddings are kept as tensors on the device and batches are
indexed directly. The run folder out_dir/run_name holds config.json, and per fold best.pt (+ best.json),
last.pt (resume), history.csv, metrics.json and val_predictions.csv.
"""
from __future__ import annotations

import importlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.config import ConfigError, same_settings, from_dict, parse_args, to_dict
from core.embedding_cache import load_embeddings
from core.errors import run_cli
from core.io import atomic_save, read_json, write_json
from core.metrics import format_table, price_bin_report, prices_from_log, smape
from core.runs import claim_run_dir
from core.runtime import amp_dtype, autocast, pick_device, progress, seed_everything, setup_logging
from core.tables import holdout_fold, load_table, n_folds
from fusion.config import FusionConfig
from core.losses import get_loss, l1_log_loss
from fusion.models import SourceSpec, build_model, count_parameters, specs_to_dicts

MODELS = ("all_embeddings", "qwen_clip")


def model_profiles(model: str) -> dict:
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    return importlib.import_module(f"fusion.{model}.config").PROFILES


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


@dataclass
class FusionInputs:
    """Every source for one split, aligned to `sample_ids`, as tensors on the device."""
    sample_ids: list[str]
    specs: list[SourceSpec]
    values: list[torch.Tensor]
    present: list[torch.Tensor]

    def batch(self, idx):
        return [v[idx] for v in self.values], [p[idx] for p in self.present]


def load_inputs(cfg: FusionConfig, split: str, sample_ids, device) -> FusionInputs:
    specs, values, present = [], [], []
    for name in cfg.sources:
        cached = load_embeddings(cfg.embeddings_dir, name, split, sample_ids)
        specs.append(SourceSpec(name=name, modality=cached.meta["modality"], dim=cached.dim))
        values.append(torch.from_numpy(cached.values).to(device))
        present.append(torch.from_numpy(cached.present).to(device))
    return FusionInputs(list(map(str, sample_ids)), specs, values, present)


@torch.no_grad()
def predict_log(model, inputs: FusionInputs, idx: torch.Tensor, batch_size: int, device, dtype) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(idx), max(batch_size, 1024)):
        xb, mb = inputs.batch(idx[start:start + max(batch_size, 1024)])
        with autocast(device, dtype):
            pred, _ = model(xb, mb)
        out.append(pred.float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def expert_load(model) -> list[float] | None:
    for module in model.modules():
        load = getattr(module, "last_load", None)
        if load is not None:
            return [round(float(x), 4) for x in load]
    return None


def load_checkpoint(path: Path, device="cpu"):
    """(model, checkpoint dict) for a saved best.pt."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    cfg = from_dict(FusionConfig, ckpt["config"])
    model = build_model(cfg, [SourceSpec(**s) for s in ckpt["sources"]]).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt


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
    train_idx = torch.from_numpy(np.flatnonzero(~is_val)).to(device)
    val_idx = torch.from_numpy(np.flatnonzero(is_val)).to(device)
    y = torch.tensor(table["log_price"].to_numpy(), dtype=torch.float32, device=device)
    y_val_price = table["price"].to_numpy()[is_val]
    price_floor = float(table["price"].to_numpy()[~is_val].min())

    model = build_model(cfg, inputs.specs).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.plateau_factor,
                                                           patience=cfg.plateau_patience)
    loss_fn = get_loss(cfg.loss, cfg.price_thresholds, cfg.tier_weights)
    start_epoch, best, best_epoch, bad_epochs, history = 0, math.inf, -1, 0, []
    last_path = fold_dir / "last.pt"
    if cfg.resume and last_path.exists():
        state = torch.load(last_path, map_location=device, weights_only=False)
        if not same_settings(state["config"], to_dict(cfg)):
            raise ConfigError(f"{last_path} was made with another config; use a new run_name or resume=false")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, best_epoch = state["epoch"] + 1, state["best"], state["best_epoch"]
        bad_epochs, history = state["bad_epochs"], state["history"]
        torch.set_rng_state(state["rng"])
        log.info("fold %d: resumed at epoch %d (best val SMAPE %.3f at epoch %d)", fold, start_epoch, best, best_epoch)
    log.info("fold %d: %d train / %d val rows, %s parameters, device %s, amp %s", fold, len(train_idx), len(val_idx),
             f"{count_parameters(model):,}", device, dtype)

    for epoch in range(start_epoch, cfg.epochs):
        if bad_epochs >= cfg.early_stopping_patience:
            break
        t0 = time.time()
        model.train()
        use_l1 = epoch < cfg.l1_warmup_epochs
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + fold * 100_000 + epoch)
        perm = train_idx[torch.randperm(len(train_idx), generator=gen).to(device)]
        total, count, loads = 0.0, 0, []
        bar = progress(range(0, len(perm), cfg.batch_size), desc=f"fold {fold} epoch {epoch}", leave=False)
        for start in bar:
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
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            if (load := expert_load(model)) is not None:
                loads.append(load)
        if not math.isfinite(total):
            raise FloatingPointError(f"fold {fold} epoch {epoch}: loss is not finite; lower lr or check the embeddings for NaN")
        val_pred = prices_from_log(predict_log(model, inputs, val_idx, cfg.batch_size, device, dtype), price_floor)
        val_smape = smape(y_val_price, val_pred)
        scheduler.step(val_smape)
        row = {"epoch": epoch, "train_loss": total / max(count, 1), "loss": "l1_warmup" if use_l1 else cfg.loss,
               "val_smape": val_smape, "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0}
        if loads:
            row["expert_load"] = str(np.mean(loads, 0).round(3).tolist())
        history.append(row)
        improved = val_smape < best
        if improved:
            best, best_epoch, bad_epochs = val_smape, epoch, 0
            ckpt = {"model": model.state_dict(), "config": to_dict(cfg), "sources": specs_to_dicts(inputs.specs),
                    "epoch": epoch, "val_smape": val_smape, "price_floor": price_floor, "fold": fold}
            atomic_save(lambda tmp: torch.save(ckpt, tmp), fold_dir / "best.pt")
            write_json(fold_dir / "best.json", {k: v for k, v in ckpt.items() if k != "model"})
        else:
            bad_epochs += 1
        log.info("fold %d epoch %3d  loss %.4f  val SMAPE %.3f%s  lr %.2e  %.1fs%s", fold, epoch, row["train_loss"],
                 val_smape, " *" if improved else "", row["lr"], row["seconds"],
                 f"  expert load {row['expert_load']}" if loads else "")
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "epoch": epoch, "best": best, "best_epoch": best_epoch, "bad_epochs": bad_epochs, "history": history,
                 "rng": torch.get_rng_state(), "config": to_dict(cfg)}
        atomic_save(lambda tmp: torch.save(state, tmp), last_path)
        atomic_save(lambda tmp: pd.DataFrame(history).to_csv(tmp, index=False), fold_dir / "history.csv")

    model, _ = load_checkpoint(fold_dir / "best.pt", device)
    val_pred = prices_from_log(predict_log(model, inputs, val_idx, cfg.batch_size, device, dtype), price_floor)
    val_ids = table["sample_id"].to_numpy()[is_val]
    predictions = pd.DataFrame({"sample_id": val_ids, "fold": fold, "price": y_val_price, "pred": val_pred})
    atomic_save(lambda tmp: predictions.to_csv(tmp, index=False), fold_dir / "val_predictions.csv")
    report = price_bin_report(y_val_price, val_pred)
    log.info("fold %d best epoch %d, validation by price bin:\n%s", fold, best_epoch, format_table(report))
    metrics = {"fold": fold, "val_smape": smape(y_val_price, val_pred), "best_epoch": best_epoch,
               "epochs_run": len(history), "parameters": count_parameters(model), "price_floor": price_floor,
               "by_price_bin": report.to_dict(orient="records"), "complete": True}
    write_json(metrics_path, metrics)
    return metrics


def main(cfg: FusionConfig) -> dict:
    run_dir = Path(cfg.out_dir) / cfg.run_name
    log = setup_logging("fusion.train", run_dir)
    claim_run_dir(run_dir, cfg)  # a finished run still reloads: its folds are skipped one by one
    device = pick_device(cfg.device)
    table = load_table(cfg.data_dir, "train")
    inputs = load_inputs(cfg, "train", table["sample_id"].tolist(), device)
    log.info("sources: %s", ", ".join(f"{s.name} ({s.modality}, {s.dim})" for s in inputs.specs))
    if cfg.folds == "holdout":
        folds = [holdout_fold(cfg.data_dir)]
    elif cfg.folds == "all":
        folds = list(range(n_folds(cfg.data_dir)))
        log.warning("folds=all: the encoders were fine-tuned on every fold but %d, so only fold %d's score is "
                    "free of rows they saw; the other folds' scores and out-of-fold predictions are optimistic",
                    holdout_fold(cfg.data_dir), holdout_fold(cfg.data_dir))
    else:
        raise ConfigError(f"folds must be 'holdout' or 'all', got {cfg.folds!r}")
    t0 = time.time()
    per_fold = [train_fold(cfg, k, table, inputs, run_dir, device, log) for k in folds]
    scores = [m["val_smape"] for m in per_fold]
    summary = {"model": cfg.run_name, "folds": folds, "val_smape_per_fold": scores,
               "val_smape_mean": float(np.mean(scores)), "val_smape_std": float(np.std(scores)),
               "parameters": per_fold[0]["parameters"], "train_seconds": time.time() - t0, "complete": True,
               # the one fold the fine-tuned encoders never trained on
               "encoder_unseen_fold": holdout_fold(cfg.data_dir)}
    if cfg.folds == "all":
        oof = pd.concat([pd.read_csv(run_dir / f"fold_{k}" / "val_predictions.csv", dtype={"sample_id": str}) for k in folds])
        oof = oof.set_index("sample_id").loc[table["sample_id"].astype(str)].reset_index()
        atomic_save(lambda tmp: oof.to_csv(tmp, index=False), run_dir / "oof_predictions.csv")
        summary["oof_smape"] = smape(oof["price"], oof["pred"])
    write_json(run_dir / "metrics.json", summary)
    log.info("validation SMAPE %.3f (std %.3f over %d fold(s)); run folder %s", summary["val_smape_mean"],
             summary["val_smape_std"], len(folds), run_dir)
    return summary


if __name__ == "__main__":
    run_cli(lambda: main(parse_cli()))
