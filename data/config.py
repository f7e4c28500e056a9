"""Settings for the data stage. Edit the defaults here or override any field as key=value."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class PrepareConfig:
    raw_dir: Path = Path("data/raw")  # holds train.csv and test.csv in the competition format
    out_dir: Path = Path("checkpoints/data")  # train.parquet, test.parquet, parse report, sidecar
    image_dir: Optional[Path] = None  # the only folder local image links may be read from; default raw_dir
    image_cache_dir: Optional[Path] = None  # bounded image copies every image stage reads; default out_dir/images
    image_side: int = 448  # shortest side of the copies in pixels: enough for CLIP at 224 and SigLIP at 384
    max_image_bytes: int = 20_000_000  # a larger image file or download is refused
    allow_private_image_hosts: bool = False  # true: fetch from loopback and private-network hosts too
    download_images: bool = True  # false: use only images already cached or on local paths
    download_workers: int = 32  # parallel downloads and decodes; the work is mostly network-bound
    timeout_s: float = 10.0  # per image: the whole fetch, redirects included
    retries: int = 2  # extra attempts on timeouts and 5xx (never on 404 or corrupt files)
    retry_failed: bool = False  # re-try links that failed in an earlier run
    n_folds: int = 5  # folds for k-fold; every later stage reads this column and nothing else to split
    holdout_fold: int = 0  # the fold used as the 80/20 validation set
    n_price_bins: int = 10  # price-quantile bins the folds are stratified on
    seed: int = 42  # fixes the folds
    force: bool = False  # rerun even when the outputs are complete and the config is unchanged


@dataclass
class SyntheticConfig:
    out_dir: Path = Path("checkpoints/demo/raw")  # train.csv, test.csv, test_labels.csv, images/
    n_train: int = 3000
    n_test: int = 1000
    seed: int = 0
    image_size: int = 64  # pixels per side of the square PNGs
    missing_image_rate: float = 0.02  # share of rows whose image link is broken or corrupt


PREPARE_PROFILES = {
    "default": PrepareConfig(),
    "tiny": PrepareConfig(raw_dir=Path("checkpoints/demo/raw"), out_dir=Path("checkpoints/demo/data"),
                          download_workers=4, timeout_s=2.0, retries=0),
}

SYNTHETIC_PROFILES = {
    "default": SyntheticConfig(),
    "tiny": SyntheticConfig(n_train=2000, n_test=500, image_size=32),
}
