"""Under torchrun, early stopping and the checkpoint are decided once, on rank 0: two gloo processes
that see different selection figures stop at the same epoch and the run ends (a deadlock fails the
test through its timeout rather than hanging it)."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]

# rank 0's selection figure stops improving after the first epoch; rank 1's improves every epoch
FIGURES = {0: [50.0, 60.0, 60.0, 60.0, 60.0, 60.0], 1: [50.0, 40.0, 30.0, 20.0, 10.0, 5.0]}
PATIENCE = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, args: list[str], log: Path, timeout: float) -> None:
    """Two CPU processes under torchrun. Past `timeout` torchrun is stopped (it ends its workers, which
    run in sessions of their own) and the test fails with the end of the log."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), *args]
    env = {**os.environ, "PRICE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            pytest.fail(f"two ranks did not finish within {timeout:.0f} s (a rank waiting in a collective):\n"
                        f"{log.read_text()[-3000:]}")
    assert proc.returncode == 0, log.read_text()[-3000:]


def stop_epoch(figures: list[float]) -> int:
    """Epochs a rank would run deciding on its own figures (what each rank did before)."""
    best, bad = float("inf"), 0
    for epoch, score in enumerate(figures):
        if bad >= PATIENCE:
            return epoch
        best, bad = (score, 0) if score < best else (best, bad + 1)
    return len(figures)


def test_the_figures_would_split_ranks_that_decide_alone():
    assert stop_epoch(FIGURES[0]) == 2 and stop_epoch(FIGURES[1]) == len(FIGURES[1])


LOOP = """
import json, sys

import torch
import torch.distributed

from core.distributed import cleanup, init_distributed, judge_epoch
from tests.test_rank_decisions import FIGURES, PATIENCE

info = init_distributed("cpu")
figures, best, bad, kept = FIGURES[info.rank], float("inf"), 0, []
for epoch, score in enumerate(figures):
    if bad >= PATIENCE:
        break
    torch.distributed.all_reduce(torch.ones(1))  # as DDP's gradients: a rank that left would leave this one waiting
    improved, best, bad = judge_epoch(info, score, best, bad)
    kept += [epoch] if improved else []
torch.distributed.barrier()
json.dump({"epochs": epoch, "best": best, "kept": kept}, open(f"{sys.argv[1]}/rank{info.rank}.json", "w"))
cleanup(info)
"""


def test_the_decision_is_rank_0s_on_every_rank(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    torchrun(script, [str(tmp_path)], tmp_path / "torchrun.log", timeout=60)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] == {"epochs": 2, "best": 50.0, "kept": [0]}


CLIP = """
import json, os, sys

from clip_finetune import train
from clip_finetune.config import PROFILES, ClipConfig
from core.config import parse_args
from tests.test_rank_decisions import FIGURES

rank, calls = int(os.environ["RANK"]), []


def figure_of_this_rank(y, pred):  # the selection SMAPE each rank computes, made to disagree
    calls.append(1)
    return FIGURES[rank][min(len(calls), len(FIGURES[rank])) - 1]


train.smape = figure_of_this_rank
metrics = train.main(parse_args(ClipConfig, sys.argv[2:], PROFILES))
json.dump(metrics, open(f"{sys.argv[1]}/rank{rank}.json", "w"))
"""


def test_the_clip_trainer_stops_both_ranks_at_the_same_epoch(demo_catalog, tiny_models, tmp_path):
    script = tmp_path / "clip_ranks.py"
    script.write_text(textwrap.dedent(CLIP))
    args = ["profile=tiny", f"model={tiny_models / 'clip_tiny'}", f"data_dir={demo_catalog / 'data'}",
            f"out_dir={tmp_path}", f"predictions_dir={tmp_path / 'pred'}", "num_workers=0", "device=cpu", "epochs=4",
            f"early_stopping_patience={PATIENCE}"]
    torchrun(script, [str(tmp_path), *args], tmp_path / "torchrun.log", timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["epochs_run"] == ranks[1]["epochs_run"] == 2  # rank 1 alone would have run all 4
    history = pd.read_csv(tmp_path / "tiny" / "history.csv")
    assert history["select_smape"].tolist() == FIGURES[0][:2]
    assert json.loads((tmp_path / "tiny" / "best.json").read_text())["epoch"] == 0
