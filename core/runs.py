"""Run folders: one config per folder, refused when another config is already there.

A run owns its folder: a fresh start (resume=false, or no run there to resume) removes what an
earlier run left, so its folds and outputs never mix into this run's."""
from __future__ import annotations

import shutil
from pathlib import Path

from core.config import ConfigError, same_settings, to_dict
from core.io import read_json, write_json


def is_fresh_start(run_dir: Path, cfg) -> bool:
    """Whether a run in `run_dir` starts from scratch: asked to (resume=false), or nothing there to resume."""
    return not cfg.resume or not (Path(run_dir) / "config.json").exists()


def clear_outputs(run_dir: Path, patterns) -> list[Path]:
    """Remove every file or folder in `run_dir` matching one of the glob `patterns`; returns what went."""
    removed = []
    for pattern in patterns:
        for path in sorted(Path(run_dir).glob(pattern)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def claim_run_dir(run_dir: Path, cfg, write: bool = True, outputs=()) -> dict | None:
    """Check `run_dir` against `cfg` and save `config.json`. On a fresh start, first remove what
    matches `outputs` (glob patterns inside `run_dir`, e.g. "fold_*", "metrics.json").
    Returns the finished run's metrics when it is complete and `cfg.resume` (nothing left to
    do), else None."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if config_path.exists() and cfg.resume and not same_settings(read_json(config_path), to_dict(cfg)):
        raise ConfigError(f"{run_dir} holds a run with another config; pick a new run_name, or resume=false to replace it")
    if write:
        if is_fresh_start(run_dir, cfg):
            clear_outputs(run_dir, outputs)
        write_json(config_path, to_dict(cfg))
    done = run_dir / "metrics.json"
    if cfg.resume and done.exists() and read_json(done).get("complete"):
        return read_json(done)
    return None


def save_last(path: Path, cfg, state: dict, history: list) -> None:
    """The resume state (weights, optimiser, loop counters in `state`) with the history, the RNG and the
    config it was made under, and history.csv beside it. Every trainer saves through here."""
    import pandas as pd
    import torch

    from core.io import atomic_save

    path = Path(path)
    full = {**state, "history": history, "rng": torch.get_rng_state(), "config": to_dict(cfg)}
    atomic_save(lambda tmp: torch.save(full, tmp), path)
    atomic_save(lambda tmp: pd.DataFrame(history).to_csv(tmp, index=False), path.parent / "history.csv")


def load_last(path: Path, cfg, map_location="cpu") -> dict | None:
    """The state `save_last` wrote, when `cfg.resume` and it exists, with the RNG restored; None
    otherwise. A state made under another config is refused rather than silently continued."""
    import torch

    path = Path(path)
    if not cfg.resume or not path.exists():
        return None
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not same_settings(state.get("config", {}), to_dict(cfg)):
        raise ConfigError(f"{path} was made with another config; use a new run_name or resume=false")
    torch.set_rng_state(state["rng"])
    return state


# ---------------------------------------------------------------- one encoder per fold (CLIP and the text stage)

ENCODER_FOLDS = ("holdout", "all")


def check_encoder_folds(cfg) -> None:
    if cfg.encoder_folds not in ENCODER_FOLDS:
        raise ConfigError(f"encoder_folds={cfg.encoder_folds!r}: use holdout (one encoder) or all (one per fold)")


def encoder_folds(cfg) -> list[int]:
    """The folds an encoder is scored on, one fine-tune each: the data stage's holdout fold
    (`encoder_folds=holdout`), or every fold (`all`)."""
    from core.tables import holdout_fold, n_folds

    check_encoder_folds(cfg)
    return list(range(n_folds(cfg.data_dir))) if cfg.encoder_folds == "all" else [holdout_fold(cfg.data_dir)]


def encoder_dir(cfg, fold: int) -> Path:
    """The run folder of the encoder that never saw `fold`: out_dir/run_name, or its fold_<k>/ when
    there is one encoder per fold."""
    run_dir = Path(cfg.out_dir) / cfg.run_name
    return run_dir / f"fold_{fold}" if cfg.encoder_folds == "all" else run_dir


def finished_encoder(cfg, fold_dir: Path) -> dict | None:
    """A fold's metrics when, with one encoder per fold, that fold's encoder is already trained and
    `cfg.resume`: a resumed run skips it. None otherwise."""
    done = Path(fold_dir) / "metrics.json"
    if cfg.encoder_folds == "all" and cfg.resume and done.exists() and read_json(done).get("complete"):
        return read_json(done)
    return None


def fold_summary(per_fold: dict) -> dict:
    """The run folder's metrics with one encoder per fold: each fold's scored SMAPE and their mean
    (over the folds that had rows to score). Keys are strings, as metrics.json reads back."""
    import numpy as np

    scored = {str(k): m["val_smape"] for k, m in per_fold.items()}
    baseline = [m["constant_median_val_smape"] for m in per_fold.values() if m.get("constant_median_val_smape") is not None]
    known = [v for v in scored.values() if v is not None]
    return {"val_smape": float(np.mean(known)) if known else None, "val_smape_by_fold": scored,
            "constant_median_val_smape": float(np.mean(baseline)) if baseline else None,
            "best_epoch_by_fold": {str(k): m.get("best_epoch", m.get("epochs_run")) for k, m in per_fold.items()},
            "selection": next(iter(per_fold.values()))["selection"], "encoder_folds": "all", "complete": True}
