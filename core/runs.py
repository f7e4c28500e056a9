"""Run folders: one config per folder, refused when another config is already there."""
from __future__ import annotations

from pathlib import Path

from core.config import ConfigError, same_settings, to_dict
from core.io import read_json, write_json


def claim_run_dir(run_dir: Path, cfg, write: bool = True) -> dict | None:
    """Check `run_dir` against `cfg` and save `config.json`. Returns the finished run's metrics
    when it is complete and `cfg.resume` (nothing left to do), else None."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if config_path.exists() and cfg.resume and not same_settings(read_json(config_path), to_dict(cfg)):
        raise ConfigError(f"{run_dir} holds a run with another config; pick a new run_name, or resume=false to replace it")
    if write:
        write_json(config_path, to_dict(cfg))
    done = run_dir / "metrics.json"
    if cfg.resume and done.exists() and read_json(done).get("complete"):
        return read_json(done)
    return None
