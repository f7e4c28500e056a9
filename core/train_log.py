"""Training figures that never make the GPU wait, and TensorBoard scalars, shared by every trainer.

A training step adds its loss (and, for fusion, its expert load) to sums kept on the device; the
host reads them once per `LOG_EVERY_STEPS` steps (or per tenth of a shorter epoch) and at the end
of an epoch, one sync each time, instead of a `float(loss)` every step. On rank 0 the figures also go to TensorBoard under the run
folder (`<run folder>/tensorboard/`; view with `tensorboard --logdir checkpoints`). Event files
carry wall-clock times, so nothing that is fingerprinted or compared byte for byte reads them.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

LOG_EVERY_STEPS = 50  # training steps between reads of the device-side sums (one GPU sync per read)
TENSORBOARD_DIR = "tensorboard"  # inside a run folder


def enable_tf32(device) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (about 8x fp32 on an H100, at
    bf16-like input precision); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def is_log_step(step: int, steps: int) -> bool:
    """Whether the figures are read after 0-based `step` of an epoch of `steps` steps: every
    LOG_EVERY_STEPS steps, or every tenth of a shorter epoch (when a progress line is written), and
    at the epoch's end."""
    every = max(1, min(LOG_EVERY_STEPS, math.ceil(steps / 10)))
    return (step + 1) % every == 0 or step + 1 == steps


class DeviceMean:
    """A weighted mean of per-step values (a loss, or a vector such as each expert's load) summed on
    the device. `add` queues the work and never waits; `read` copies the interval's sums to the host
    in one sync, returns the interval's mean and adds the sums to the running total, whose mean is
    `mean()` (e.g. the epoch's)."""

    def __init__(self):
        self._sum, self._weight, self._scalar = None, 0.0, True  # this interval's (weights are host numbers)
        self.total, self.weight = None, 0.0  # every interval read so far

    def add(self, value: torch.Tensor, weight: float = 1.0) -> None:
        """Add `value` (a device tensor) with `weight` (a host number, e.g. the rows in the batch)."""
        term = value.detach().to(torch.float64) * weight
        self._scalar = term.dim() == 0
        self._sum = term if self._sum is None else self._sum + term
        self._weight += weight

    def read(self):
        """The mean since the last read (a float, or a list for a vector; None when nothing was added)."""
        if self._sum is None:
            return None
        total, weight = self._sum.reshape(-1).cpu().numpy(), self._weight  # the one sync
        self._sum, self._weight = None, 0.0
        self.total = total if self.total is None else self.total + total
        self.weight += weight
        return self._value(total, weight)

    @property
    def finite(self) -> bool:
        """Whether every sum read so far is finite (a NaN or inf loss in any step makes it false)."""
        return self.total is None or bool(np.isfinite(self.total).all())

    def mean(self):
        """The mean over every interval read so far (call `read` first); None when nothing was read."""
        return None if self.total is None else self._value(self.total, self.weight)

    def _value(self, total: np.ndarray, weight: float):
        mean = total / weight if weight else np.full_like(total, math.nan)
        return float(mean[0]) if self._scalar else [float(x) for x in mean]


class TrainLog:
    """Scalars for TensorBoard in `<run_dir>/tensorboard/`, written on rank 0 only (`enabled`);
    elsewhere every call does nothing. Also times the interval between `rate` calls (samples/s)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported only where it writes

            self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR))
        self.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def scalars(self, step: int, **values) -> None:
        """One scalar per keyword (`train/loss=...` via a dict: `**{"train/loss": x}`); None and
        non-finite values are left out."""
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)

    def start(self) -> None:
        """Restart the samples/s clock, e.g. at an epoch's first step, so evaluation time is not counted."""
        self._since, self._samples = time.monotonic(), 0

    def count(self, samples: int) -> None:
        self._samples += samples

    def rate(self) -> float:
        """Samples per second since the previous call (or since the log was made)."""
        now = time.monotonic()
        rate = self._samples / max(now - self._since, 1e-9)
        self._since, self._samples = now, 0
        return rate

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
