"""Peak resident memory and seconds of each pipeline stage, each run alone in a child process.

    python -m bench.peak_memory                                   # every demo stage, fresh root in /tmp
    python -m bench.peak_memory root=/tmp/price_mem stages=prepare,qwen_train
    python -m bench.peak_memory profile=small root=R overrides=raw_dir=/data/raw,device=cpu

Runs `python -m pipeline profile=P root=R stages=<one>` for each stage in pipeline order, so every
stage reads what the one before it wrote under R, and reads the child's ru_maxrss from wait4: the
stage process's own peak (worker processes it started count with their own peak, not summed).
A first row gives the floor every stage pays: an interpreter that imports torch and transformers.
A stage the pipeline finds up to date in R is skipped by it and marked so; use a fresh root.
Each stage's output goes to R/peak_memory_logs/<stage>.log.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from core.config import ConfigError, parse_args
from core.errors import run_cli
from core.metrics import format_table


@dataclass
class PeakMemoryConfig:
    profile: str = "tiny"  # pipeline profile; tiny = the demo (synthetic catalog, tiny models, CPU)
    root: Path | None = None  # where the stages write; default: a new folder in the temp directory
    stages: list[str] = field(default_factory=list)  # default: every stage of the profile, in order
    overrides: list[str] = field(default_factory=list)  # key=value tokens passed on to the pipeline


def stage_names(profile: str, root: Path, overrides: list[str]) -> list[str]:
    import pipeline

    cfgs = pipeline.stage_configs(profile, overrides, root)
    return [stage.name for stage in pipeline.build_stages(cfgs, root, profile)]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_description() -> str:
    text = f"CPU: {cpu_model()}, {os.cpu_count()} cores"
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        text += f", {kib / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    import torch

    if torch.cuda.is_available():
        text += f"; GPU: {torch.cuda.get_device_name(0)}"
    return text + f"; torch {torch.__version__}"


def run_measured(command: list[str], log_path: Path) -> tuple[int, float, float]:
    """(exit status, peak RSS in MiB, seconds) of one child process."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        t0 = time.time()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.time() - t0
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keeps Popen from waiting again
    return child.returncode, usage.ru_maxrss / 1024, seconds  # ru_maxrss is in KiB on Linux


def main(cfg: PeakMemoryConfig) -> pd.DataFrame:
    root = Path(cfg.root) if cfg.root else Path(tempfile.mkdtemp(prefix="price_peak_memory_"))
    names = stage_names(cfg.profile, root, cfg.overrides)
    stages = cfg.stages or names
    unknown = [s for s in stages if s not in names]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown} for profile {cfg.profile!r}; stages: {', '.join(names)}")
    stages = [s for s in names if s in stages]  # pipeline order: each stage reads what the one before wrote
    logs = root / "peak_memory_logs"
    rows = []
    floor = [sys.executable, "-c", "import torch, transformers, pandas"]
    code, peak, seconds = run_measured(floor, logs / "imports.log")
    rows.append({"stage": "(python + torch, transformers)", "peak_rss_mib": round(peak), "seconds": round(seconds, 1),
                 "status": "ok" if code == 0 else f"exit {code}"})
    for name in stages:
        command = [sys.executable, "-m", "pipeline", f"profile={cfg.profile}", f"root={root}", f"stages={name}",
                   *cfg.overrides]
        code, peak, seconds = run_measured(command, logs / f"{name}.log")
        text = (logs / f"{name}.log").read_text(errors="replace")
        status = "ok" if code == 0 else f"exit {code}"
        if code == 0 and f"{name}: up to date, skipped" in text:
            status = "skipped (up to date)"
        rows.append({"stage": name, "peak_rss_mib": round(peak), "seconds": round(seconds, 1), "status": status})
        print(f"[peak_memory] {name}: {peak:,.0f} MiB, {seconds:.1f} s, {status}", flush=True)
        if code != 0:
            print(f"[peak_memory] {name} failed; its output: {logs / f'{name}.log'}; later stages not run", flush=True)
            break
    table = pd.DataFrame(rows)
    print(f"\npeak resident memory per stage, profile={cfg.profile}, root={root}")
    print(f"{datetime.date.today().isoformat()}, {device_description()}")
    print(format_table(table, floatfmt="{:.1f}"))
    table.to_csv(root / "peak_memory.csv", index=False)
    return table


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(PeakMemoryConfig)))
