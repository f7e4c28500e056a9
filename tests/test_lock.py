"""One writer per root: real separate processes hold and are refused the lock."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from core.lock import RECORD_FILE, SHARED_DIR, RootBusy, hold_root

ROOT = Path(__file__).resolve().parents[1]

HOLD = """
import sys, time
from pathlib import Path
from core.lock import hold_root
with hold_root(Path(sys.argv[1]), shared=sys.argv[2] == "shared"):
    print("held", flush=True)
    time.sleep(60)
"""

TRY = """
import sys
from pathlib import Path
from core.errors import run_cli
from core.lock import hold_root
def main():
    with hold_root(Path(sys.argv[1]), shared=sys.argv[2] == "shared"):
        print("held", flush=True)
run_cli(main)
"""


@pytest.fixture
def holders():
    """Start processes that hold a root until the test ends (or kills them)."""
    started = []

    def start(root: Path, mode: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root), mode], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline() == "held\n", proc.stderr.read()
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def try_hold(root: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TRY, str(root), mode], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_a_second_run_on_a_held_root_stops_at_once_naming_the_holder(tmp_path, holders):
    root = tmp_path / "root"  # created by the first holder
    training = holders(root, "exclusive")
    record = json.loads((root / RECORD_FILE).read_text())
    assert record["pid"] == training.pid and record["kind"] == "training"
    for mode in ("exclusive", "shared"):  # neither another training run nor a scoring run may start
        refused = try_hold(root, mode)
        assert refused.returncode == 2 and "held" not in refused.stdout
        message = refused.stderr.strip()
        assert message.startswith(f"error: {root} is in use by a training run: PID {training.pid}, "
                                  f"started {record['started']}")
        assert f"kill {training.pid}" in message and "Traceback" not in message and "\n" not in message
    with pytest.raises(RootBusy, match=f"PID {training.pid}"):
        with hold_root(root):
            pass
    assert json.loads((root / RECORD_FILE).read_text()) == record  # the refused runs left the holder's record


def test_scoring_runs_share_a_root_and_keep_training_out(tmp_path, holders):
    root = tmp_path / "root"
    root.mkdir()
    scoring = holders(root, "shared")
    with hold_root(root, shared=True):  # a second scoring run beside the first
        assert len(list((root / SHARED_DIR).glob("*.json"))) == 2
        assert try_hold(root, "shared").returncode == 0  # and a third
        training = try_hold(root, "exclusive")
        assert training.returncode == 2
        assert f"{root} is being scored by 2 run(s): " in training.stderr
        assert f"PID {scoring.pid}, started" in training.stderr and f"PID {os.getpid()}, started" in training.stderr
    assert [json.loads(p.read_text())["pid"] for p in (root / SHARED_DIR).glob("*.json")] == [scoring.pid]
    training = try_hold(root, "exclusive")
    assert training.returncode == 2
    assert f"{root} is being scored by 1 run(s): PID {scoring.pid}" in training.stderr
    assert not (root / RECORD_FILE).exists()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_line(tmp_path, holders, capsys):
    root = tmp_path / "root"
    dead = holders(root, "exclusive")
    started = json.loads((root / RECORD_FILE).read_text())["started"]
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    assert (root / RECORD_FILE).exists()  # the killed run could not remove its record
    with hold_root(root):
        record = json.loads((root / RECORD_FILE).read_text())
        assert record["pid"] == os.getpid()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"warning: taking over the lock on {root} left by a training run, PID {dead.pid} "
                     f"(started {started}), which ended without releasing it"]
    assert not (root / RECORD_FILE).exists()


def test_the_lock_is_released_on_an_exception_and_nested_holds_pass(tmp_path):
    root = tmp_path / "root"
    with pytest.raises(ValueError):
        with hold_root(root):
            with hold_root(root, shared=True):  # a training run that scores its own root
                with hold_root(root):
                    pass
            raise ValueError("a stage failed")
    assert not (root / RECORD_FILE).exists()
    assert try_hold(root, "exclusive").stdout == "held\n"
    with hold_root(root, shared=True):
        with pytest.raises(RootBusy, match="cannot also train"):
            with hold_root(root):
                pass


def test_a_scoring_run_may_hold_a_root_it_cannot_write(tmp_path):
    root = tmp_path / "missing"
    with hold_root(root, shared=True):  # nothing to lock: no training run can be writing there
        pass
    assert not root.exists()
