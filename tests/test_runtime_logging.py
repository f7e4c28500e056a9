"""Progress off a terminal: plain lines at a known cadence, with step, ETA and the caller's loss."""
import io
import logging
import re

import pytest

from core import runtime


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(runtime, "_clock", fake)
    monkeypatch.delenv("PRICE_NO_PROGRESS", raising=False)
    return fake


def run_loop(bar, clock, seconds_per_step=1.0):
    for step in bar:
        clock.now += seconds_per_step
        bar.set_postfix(loss=1.0 / (step + 1))


def test_known_length_logs_every_tenth_with_step_eta_and_loss(clock):
    stream = io.StringIO()  # not a terminal
    bar = runtime.progress(range(40), desc="train epoch 0", file=stream, samples_per_step=32)
    run_loop(bar, clock)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10  # default: every 4 of 40 steps; the end coincides with step 40
    steps = [int(re.search(r" (\d+)/40 ", line).group(1)) for line in lines]
    assert steps == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    # one second per step: 1 it/s, 32 samples/s; at step 4, 36 steps left -> ETA 36 s
    first = lines[0]
    assert "train epoch 0:" in first
    assert "1 it/s" in first and "32 samples/s" in first
    assert "elapsed 00:04" in first and "ETA 00:36" in first
    assert "loss=0.25" in first  # the value set_postfix got in step 4 (index 3)
    assert "ETA 00:00" in lines[-1] and "loss=0.025" in lines[-1]


def test_whichever_comes_first_steps_or_seconds_and_a_final_line(clock):
    stream = io.StringIO()
    # 23 steps of 10 s: every 5 steps (50 s) or every 25 s -> the clock fires at odd steps too
    bar = runtime.progress(range(23), desc="slow", file=stream, every_steps=5, every_seconds=25)
    run_loop(bar, clock, seconds_per_step=10.0)
    steps = [int(re.search(r" (\d+)/23 ", line).group(1)) for line in stream.getvalue().splitlines()]
    assert steps == [3, 5, 8, 10, 13, 15, 18, 20, 23]
    stream = io.StringIO()
    run_loop(runtime.progress(range(23), file=stream, every_steps=5, every_seconds=None), clock)
    steps = [int(re.search(r" (\d+)/23 ", line).group(1)) for line in stream.getvalue().splitlines()]
    assert steps == [5, 10, 15, 20, 23]  # the last, unlogged step gets a closing line


def test_manual_updates_and_unknown_total(clock):
    stream = io.StringIO()
    bar = runtime.progress(total=1000, desc="rows", unit="row", file=stream, every_steps=500)
    for _ in range(4):
        clock.now += 2.0
        bar.update(250)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "500/1000" in lines[0] and "125 row/s" in lines[0] and "ETA 00:04" in lines[0]
    stream = io.StringIO()
    run_loop(runtime.progress(iter(range(7)), desc="stream", file=stream, every_seconds=3), clock)
    lines = stream.getvalue().splitlines()
    assert [line.split("stream: ")[1].split()[0] for line in lines] == ["3", "6", "7"]
    assert all("ETA" not in line for line in lines)


def test_lines_go_to_a_logger_when_given(clock):
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    log = logging.getLogger("test_runtime_logging")
    log.addHandler(Collect())
    log.setLevel(logging.INFO)
    run_loop(runtime.progress(range(10), desc="fit", log=log, file=io.StringIO(), every_steps=5), clock)
    assert len(records) == 2 and records[1].startswith("fit: 10/10")


def test_no_progress_env_and_disable_silence_everything(clock, monkeypatch):
    stream = io.StringIO()
    run_loop(runtime.progress(range(20), file=stream, disable=True, every_steps=1), clock)
    monkeypatch.setenv("PRICE_NO_PROGRESS", "1")
    bar = runtime.progress(range(20), file=stream, disable=None, every_steps=1)
    run_loop(bar, clock)
    assert stream.getvalue() == ""


def test_terminal_keeps_the_tqdm_bar(clock):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = runtime.progress(range(5), desc="bar", file=stream, every_steps=1)
    assert isinstance(bar, runtime.tqdm)
    run_loop(bar, clock)
    assert "5/5" in stream.getvalue() and "\r" in stream.getvalue()


def test_quick_loops_stay_quiet_and_lines_are_spaced(clock):
    stream = io.StringIO()
    run_loop(runtime.progress(range(100), desc="eval", file=stream), clock, seconds_per_step=0.005)
    assert stream.getvalue() == ""  # 0.5 s in all: under min_seconds, nothing to report
    # 0.25 s per step, a line due every step: spaced to one a second, i.e. every 4th step
    run_loop(runtime.progress(range(12), file=stream, every_steps=1), clock, seconds_per_step=0.25)
    steps = [int(re.search(r" (\d+)/12 ", line).group(1)) for line in stream.getvalue().splitlines()]
    assert steps == [4, 8, 12]
