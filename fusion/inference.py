"""Loading and inference for fusion runs: which sources exist, cached inputs as device tensors,
checkpoints, batched prediction, and the folds a finished run owns. Training, prediction,
evaluation and the pipeline all go through here."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.config import ConfigError, from_dict, same_settings
from core.embedding_cache import load_embeddings, skipped_reason
from core.errors import PipelineError
from core.io import read_json
from core.runtime import autocast
from fusion.config import FusionConfig
from fusion.models import SourceSpec, build_model


class RunError(PipelineError, RuntimeError):
    pass


def available_sources(cfg: FusionConfig, log: logging.Logger | None = None) -> list[str]:
    """`cfg.sources` less those whose stage wrote no cache (e.g. no usable image anywhere); one log
    line per source left out. A clear error when none remains."""
    log = log or logging.getLogger("fusion")
    kept = []
    for name in cfg.sources:
        reason = skipped_reason(cfg.embeddings_dir, name)
        if reason is None:
            kept.append(name)
        else:
            log.info("source %s left out: %s", name, reason)
    if not kept:
        raise ConfigError(f"no source left to train on: every one of {cfg.sources} was skipped in {cfg.embeddings_dir}")
    return kept


def with_fold_sources(cfg: FusionConfig, inputs: "FusionInputs", split: str, fold: int, device,
                      log: logging.Logger | None = None) -> "FusionInputs":
    """`inputs` plus the caches of cfg.fold_sources written for the model scored on `fold`; one whose
    stage wrote no cache for that fold is left out with a log line."""
    from core.embedding_cache import cache_dir, fold_source

    names = [fold_source(name, fold) for name in cfg.fold_sources]
    present = [n for n in names if (cache_dir(cfg.embeddings_dir, n, split) / "meta.json").exists()]
    for name in sorted(set(names) - set(present)):
        (log or logging.getLogger("fusion")).info("fold source %s left out: no cache in %s", name, cfg.embeddings_dir)
    if not present:
        return inputs
    extra = load_inputs(cfg, split, inputs.sample_ids, device, present)
    return FusionInputs(inputs.sample_ids, inputs.specs + extra.specs, inputs.values + extra.values,
                        inputs.present + extra.present)


@dataclass
class FusionInputs:
    """Every source for one split, aligned to `sample_ids`, as tensors on the device."""
    sample_ids: list[str]
    specs: list[SourceSpec]
    values: list[torch.Tensor]
    present: list[torch.Tensor]

    def batch(self, idx):
        return [v[idx] for v in self.values], [p[idx] for p in self.present]


def load_inputs(cfg: FusionConfig, split: str, sample_ids, device, sources: list[str] | None = None) -> FusionInputs:
    """The caches of `sources` (default: the config's sources that were not skipped) for `split`."""
    names = available_sources(cfg) if sources is None else list(sources)
    specs, values, present = [], [], []
    for name in names:
        reason = skipped_reason(cfg.embeddings_dir, name)
        if reason is not None:
            raise RunError(f"source {name!r} is needed but its cache in {cfg.embeddings_dir} was skipped: {reason}")
        cached = load_embeddings(cfg.embeddings_dir, name, split, sample_ids)
        specs.append(SourceSpec(name=name, modality=cached.meta["modality"], dim=cached.dim))
        values.append(torch.from_numpy(cached.values).to(device))
        present.append(torch.from_numpy(cached.present).to(device))
    return FusionInputs(list(map(str, sample_ids)), specs, values, present)


EXPERT_LOAD_NOTE = "fraction of the scored rows whose largest gate weight is each expert"


def expert_load(model) -> list[float] | None:
    """Per expert, the fraction of the last forward pass's rows whose largest gate weight is that
    expert (fusion.blocks.Router); None without a mixture of experts."""
    for module in model.modules():
        load = getattr(module, "last_load", None)
        if load is not None:
            return [round(float(x), 4) for x in load]
    return None


def pooled_load(loads_and_rows: list[tuple[list[float], int]]) -> list[float]:
    """Several folds' per-expert loads, each over its own rows, as one load over all those rows."""
    loads = np.array([load for load, _ in loads_and_rows], dtype=float)
    rows = np.array([n for _, n in loads_and_rows], dtype=float)
    return [round(float(x), 4) for x in (loads * rows[:, None]).sum(0) / rows.sum()]


@torch.no_grad()
def predict_with_load(model, inputs: FusionInputs, idx: torch.Tensor, batch_size: int, device, dtype):
    """(log1p price predictions for rows `idx`, per expert the fraction of those rows routed to it, or None)."""
    model.eval()
    out, loads, weights = [], [], []
    step = max(batch_size, 1024)
    for start in range(0, len(idx), step):
        rows = idx[start:start + step]
        xb, mb = inputs.batch(rows)
        with autocast(device, dtype):
            pred, _ = model(xb, mb)
        out.append(pred.float().cpu())
        if (load := expert_load(model)) is not None:
            loads.append(load)
            weights.append(len(rows))
    preds = torch.cat(out).numpy() if out else np.zeros(0, np.float32)
    load = [round(float(x), 4) for x in np.average(loads, axis=0, weights=weights)] if loads else None
    return preds, load


def predict_log(model, inputs: FusionInputs, idx: torch.Tensor, batch_size: int, device, dtype) -> np.ndarray:
    return predict_with_load(model, inputs, idx, batch_size, device, dtype)[0]


def model_from_checkpoint(ckpt: dict, device="cpu"):
    cfg = from_dict(FusionConfig, ckpt["config"])
    model = build_model(cfg, [SourceSpec(**s) for s in ckpt["sources"]]).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model


def load_checkpoint(path: Path, device="cpu"):
    """(model, checkpoint dict) for a saved best.pt."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    return model_from_checkpoint(ckpt, device), ckpt


@dataclass
class RunFold:
    fold: int
    dir: Path
    checkpoint: dict  # best.pt: weights, config, sources, price_floor
    metrics: dict  # the fold's metrics.json


def run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise RunError(f"{run_dir}: no config.json; train first: python -m fusion.train run_name={Path(run_dir).name}")
    return read_json(path)


def run_folds(run_dir: Path, device="cpu") -> list[RunFold]:
    """The folds a finished run trained, as listed in its own metrics.json, each checked against
    the run's config.json. Anything else in the folder (a fold an earlier run left) is never read."""
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists() or not read_json(metrics_path).get("complete"):
        raise RunError(f"{run_dir}: the run did not finish (no complete metrics.json); train first: "
                       f"python -m fusion.train run_name={run_dir.name}")
    out = []
    for fold in read_json(metrics_path)["folds"]:
        fold_dir = run_dir / f"fold_{fold}"
        for name in ("best.pt", "metrics.json", "val_predictions.csv"):
            if not (fold_dir / name).exists():
                raise RunError(f"{run_dir}: fold {fold} is listed in metrics.json but {fold_dir / name} is missing")
        ckpt = torch.load(fold_dir / "best.pt", map_location=device, weights_only=False)
        if not same_settings(ckpt["config"], config):
            raise RunError(f"{fold_dir / 'best.pt'} was trained with another config than {run_dir / 'config.json'}; "
                           "retrain the run (resume=false)")
        if ckpt.get("fold") != fold:
            raise RunError(f"{fold_dir / 'best.pt'} says it is fold {ckpt.get('fold')}, not fold {fold}")
        out.append(RunFold(fold, fold_dir, ckpt, read_json(fold_dir / "metrics.json")))
    return out
