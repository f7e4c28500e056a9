"""Device choice, seeding, mixed precision, logging and progress bars, shared by every stage."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm


def pick_device(preference: str = "auto"):
    """The torch device for a stage's `device` setting: `auto` takes CUDA when present, else the CPU;
    `cuda` (or `cuda:N`) with no such GPU is a PipelineError, never a silent fall-back to the CPU.
    Cheap and without side effects (no CUDA context is created), so a run can check every stage's
    setting before any work."""
    import torch

    from core.errors import PipelineError

    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except RuntimeError as exc:
        raise PipelineError(f"device={preference!r} is not a device: use auto, cpu, cuda or cuda:N ({exc})") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise PipelineError(
            f"device={preference}: no CUDA device found (this torch {torch.__version__} was built for CUDA "
            f"{torch.version.cuda or 'none: a CPU-only build'}; check `nvidia-smi` and that the driver supports that "
            f"version). Pass device=cpu to run on the CPU on purpose.")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise PipelineError(f"device={preference}: only {torch.cuda.device_count()} CUDA device(s) found")
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


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _clock() -> float:
    return time.monotonic()


def _format_value(value) -> str:
    if hasattr(value, "item"):  # a 0-d tensor or numpy scalar
        value = value.item()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class ProgressLines:
    """What `progress` returns off a terminal: the parts of tqdm's interface the stages use
    (iteration, update, set_postfix, set_description, close), writing one plain line every
    `every_steps` steps or `every_seconds` seconds, whichever comes first, and one at the end.
    Lines are at least `min_seconds` apart, and a loop that ends within `min_seconds` writes none: a
    fast evaluation pass inside every epoch should not bury the epoch lines."""

    def __init__(self, iterable=None, total=None, desc="", unit="it", every_steps=None, every_seconds=30.0,
                 samples_per_step=None, min_seconds=1.0, file=None, log=None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit = total, desc or "", unit
        # default: ten lines over a loop of known length; only the clock for one of unknown length
        self.every_steps = every_steps if every_steps is not None else (max(1, math.ceil(total / 10)) if total else None)
        self.every_seconds = every_seconds
        self.samples_per_step, self.min_seconds = samples_per_step, min_seconds
        self.file, self.log = file, log
        self.n, self.postfix = 0, {}
        self.start = self.last_time = _clock()
        self.last_n, self.lines, self.closed = 0, 0, False

    def __len__(self):
        return self.total if self.total is not None else len(self.iterable)

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1) -> None:
        self.n += n
        now = _clock()
        since = now - self.last_time
        due_steps = self.every_steps and self.n // self.every_steps > self.last_n // self.every_steps
        due_time = self.every_seconds is not None and since >= self.every_seconds
        if (due_steps or due_time) and since >= self.min_seconds:
            self._emit(now)

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def set_postfix_str(self, s="", refresh=True) -> None:
        self.postfix = {"": s}

    def set_description(self, desc=None, refresh=True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def write(self, s, file=None, end="\n") -> None:
        print(s, end=end, file=file or self.file or sys.stderr, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = _clock()
        # the end, unless the last step was just logged or the whole loop was too quick to report
        if self.n != self.last_n and (self.lines or now - self.start >= self.min_seconds):
            self._emit(now)

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.n / elapsed
        parts = [self.desc + ":" if self.desc else "progress:"]
        if self.total:
            parts.append(f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)")
        else:
            parts.append(str(self.n))
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.samples_per_step:
            parts.append(f"{rate * self.samples_per_step:.3g} samples/s")
        parts.append(f"elapsed {_format_interval(elapsed)}")
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else math.inf
            parts.append(f"ETA {_format_interval(eta)}")
        parts += [f"{k}={_format_value(v)}" if k else str(v) for k, v in self.postfix.items()]
        return " ".join(parts)

    def _emit(self, now: float) -> None:
        text = self.line(now)
        self.last_time, self.last_n, self.lines = now, self.n, self.lines + 1
        if self.log is not None:
            self.log.info(text)
        else:
            print(time.strftime("%H:%M:%S ") + text, file=self.file or sys.stderr, flush=True)


def _format_interval(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return tqdm.format_interval(seconds)


def progress(iterable=None, *, every_steps: int | None = None, every_seconds: float = 30.0,
             samples_per_step: int | None = None, min_seconds: float = 1.0, log: logging.Logger | None = None,
             **kwargs):
    """A tqdm bar on a terminal; off one (nohup, a scheduler, a file), plain progress lines instead.

    Lines come every `every_steps` steps (default: a tenth of a loop of known length) or every
    `every_seconds` seconds, whichever first, and once at the end: description, step/total,
    it/s (samples/s too when `samples_per_step` is given), elapsed, ETA and the values last
    passed to `set_postfix` (e.g. loss=0.42); at least `min_seconds` apart, none for a loop
    that ends within `min_seconds`. They go to `log` when given (so they also reach a
    run's log.txt), else to the bar's stream (stderr). `disable=True` (e.g. non-main ranks) and
    PRICE_NO_PROGRESS=1 (tests) mean neither bar nor lines."""
    if os.environ.get("PRICE_NO_PROGRESS") == "1" or kwargs.get("disable") is True:
        kwargs["disable"] = True
        return tqdm(iterable, **kwargs)
    stream = kwargs.get("file") or sys.stderr
    if _is_terminal(stream):
        kwargs["disable"] = False
        kwargs.setdefault("mininterval", 0.5)
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, **kwargs)
    return ProgressLines(iterable, total=kwargs.get("total"), desc=kwargs.get("desc", ""), unit=kwargs.get("unit", "it"),
                         every_steps=every_steps, every_seconds=every_seconds, samples_per_step=samples_per_step,
                         min_seconds=min_seconds, file=kwargs.get("file"), log=log)
