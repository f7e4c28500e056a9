"""Device choice, seeding, mixed precision, logging and progress bars, shared by every stage."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm


def pick_device(preference: str = "auto"):
    """CUDA when present (or asked for), CPU otherwise. Chosen once per run."""
    import torch

    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={preference!r} was asked for but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)
    except ImportError:
        pass


def amp_dtype(device, precision: str = "auto"):
    """The autocast dtype for `device`: bf16 on CUDA where supported, else fp16; None (fp32) on CPU."""
    import torch

    if precision == "fp32" or device.type != "cuda":
        return None
    if precision == "fp16":
        return torch.float16
    if precision in ("bf16", "auto"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {precision!r}")


def autocast(device, dtype):
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LambdaLR factor: linear warmup over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    import math

    warmup, total = max(1, warmup_steps), max(1, total_steps)
    return lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))


def setup_logging(name: str, run_dir: Path | None = None) -> logging.Logger:
    """Log to the console and, when given, to `run_dir/log.txt` (appending, so resumed runs keep history)."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(Path(run_dir) / "log.txt")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger


def progress(iterable=None, **kwargs):
    """A tqdm bar that stays quiet when PRICE_NO_PROGRESS=1 (tests) and is sparse off a terminal."""
    kwargs.setdefault("disable", os.environ.get("PRICE_NO_PROGRESS") == "1")
    kwargs.setdefault("mininterval", 0.5 if sys.stderr.isatty() else 10.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
