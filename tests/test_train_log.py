"""Training figures summed on the device and read once per interval, TF32, and TensorBoard scalars."""
import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from core import train_log
from core.train_log import DeviceMean, TrainLog, enable_tf32, is_log_step


def test_interval_and_epoch_means_equal_the_per_step_floats():
    rng = np.random.default_rng(0)
    losses = [torch.tensor(x, dtype=torch.float32) for x in rng.uniform(0.1, 3.0, 23)]
    rows = rng.integers(1, 64, 23).tolist()
    running, intervals, start = DeviceMean(), [], 0
    for step, (loss, n) in enumerate(zip(losses, rows)):
        running.add(loss, n)
        if (step + 1) % 5 == 0 or step == 22:
            intervals.append((running.read(), start, step + 1))
            start = step + 1
    # what the trainers did before: total += float(loss) * n every step
    as_floats = [float(x) for x in losses]
    for mean, a, b in intervals:
        assert mean == pytest.approx(np.dot(as_floats[a:b], rows[a:b]) / sum(rows[a:b]), rel=1e-12)
    total = sum(f * n for f, n in zip(as_floats, rows))
    assert running.mean() == pytest.approx(total / sum(rows), rel=1e-12)
    assert running.read() is None and running.finite  # nothing since the last read


def test_a_vector_mean_and_a_non_finite_step():
    loads = DeviceMean()
    for row in ([1.0, 0.0], [0.5, 0.5], [0.0, 1.0]):
        loads.add(torch.tensor(row))
    assert loads.read() == pytest.approx([0.5, 0.5])
    losses = DeviceMean()
    losses.add(torch.tensor(1.0), 4)
    losses.add(torch.tensor(float("nan")), 4)
    losses.read()
    assert not losses.finite and math.isnan(losses.mean())


def test_reads_come_every_interval_and_at_the_epoch_end(monkeypatch):
    monkeypatch.setattr(train_log, "LOG_EVERY_STEPS", 4)
    assert [s for s in range(100) if is_log_step(s, 100)] == list(range(3, 100, 4))
    assert [s for s in range(10) if is_log_step(s, 10)] == list(range(10))  # a tenth is one step
    assert [s for s in range(30) if is_log_step(s, 30)] == [2, 5, 8, 11, 14, 17, 20, 23, 26, 29]
    assert [s for s in range(7) if is_log_step(s, 7)] == [0, 1, 2, 3, 4, 5, 6]
    monkeypatch.setattr(train_log, "LOG_EVERY_STEPS", 50)
    assert [s for s in range(1000) if is_log_step(s, 1000)] == list(range(49, 1000, 50))
    assert len([s for s in range(1001) if is_log_step(s, 1001)]) == 21  # every 50 and the last


def test_tf32_is_turned_on_for_cuda_only():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        enable_tf32(torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        enable_tf32(torch.device("cuda", 0))  # only flags: no GPU needed to set them
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_scalars_reach_tensorboard_on_the_main_rank_only(tmp_path):
    with TrainLog(tmp_path / "other_rank", enabled=False) as board:
        board.scalars(1, **{"train/loss": 1.0})
    assert not (tmp_path / "other_rank").exists()
    with TrainLog(tmp_path / "run") as board:
        for step, loss in enumerate([2.0, 1.5, float("nan"), 1.0], start=1):
            board.count(32)
            board.scalars(step, **{"train/loss": loss, "train/samples_per_s": board.rate(), "select/smape": None})
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/samples_per_s"}  # None is left out
    logged = events.Scalars("train/loss")
    assert [(s.step, s.value) for s in logged] == [(1, 2.0), (2, 1.5), (4, 1.0)]  # and so is NaN
    assert all(s.value > 0 for s in events.Scalars("train/samples_per_s"))
