"""Settings for the ensemble stage. Edit the defaults here or override any field as key=value."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class EnsembleConfig:
    data_dir: Path = Path("checkpoints/data")  # processed tables: true prices, folds, test ids, the price floor
    predictions_dir: Path = Path("checkpoints/predictions")  # every model's predictions (core.predictions format)
    output: Optional[Path] = None  # the submission; None: <predictions_dir>/../test_out.csv
    models: list[str] = field(default_factory=list)  # models to blend; empty: every model found except the ensemble
    scale_min: float = 0.80  # price scale search range; SMAPE rewards slight under-prediction
    scale_max: float = 1.20
    scale_steps: int = 81  # grid points (0.005 apart by default), then a bounded refinement around the best
    smoothing: float = 1e-3  # |p - y| becomes sqrt((p - y)^2 + (smoothing * y)^2) so L-BFGS-B sees a gradient
    n_restarts: int = 2  # random starting weights tried beside the NNLS and equal-weight starts
    seed: int = 42  # fixes the random starts


PROFILES = {
    "default": EnsembleConfig(),
    # the same folders; every setting already fits a 2-core CPU (about 15 s for 3 models on 75,000 rows)
    "small": EnsembleConfig(),
    "tiny": EnsembleConfig(data_dir=Path("checkpoints/demo/data"), predictions_dir=Path("checkpoints/demo/predictions"),
                           scale_steps=41, n_restarts=0),
}

