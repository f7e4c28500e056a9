"""Scoring on disks that refuse writes and on roots that another run holds: an output folder that
cannot be written (or created) is refused in a second, before anything loads; a write that fails midway (a full
disk) is one line naming the path and the reason, leaving nothing or finished chunks that the same
command resumes from; a root held by a training run stops scoring at once, naming the holder."""
import contextlib
import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import score
from core.io import FolderNotWritable
from core.lock import RootBusy
from test_score import assert_root_prices, trained_root, write_csv

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_root(tmp_path_factory)


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """`folder` as a fresh tmpfs mounted with `options`; the test is skipped where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root, and these tests run as an ordinary user")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def open_files_under(folder: Path) -> list[str]:
    """Files under `folder` this process still holds open."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith(f"{folder}/"):
                found.append(target)
    return found


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no write reaches: by its mode for an ordinary user; a read-only tmpfs for root, whom
    a folder's mode does not stop."""
    folder = tmp_path / "read_only"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    with tmpfs(folder, "ro,size=64k"):
        yield folder


@pytest.fixture
def untrained_root(tmp_path) -> tuple[Path, Path]:
    """(a root that passes the cheap checks, a valid NEW.csv): nothing behind it can load."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "pipeline_state.json").write_text("{}")
    new_csv = write_csv(pd.DataFrame({"sample_id": ["1"], "catalog_content": ["Item Name: x\nValue: 1\nUnit: Count"],
                                      "image_link": [""]}), tmp_path / "new.csv")
    return root, new_csv


def unwritable(where: str, read_only_folder: Path) -> tuple[Path, str]:
    """(an output path whose folder cannot be written, or is missing and cannot be made, the reason
    the system gives)."""
    reason = os.strerror(errno.EROFS if os.geteuid() == 0 else errno.EACCES)
    return read_only_folder / ("prices.csv" if where == "in" else "missing/prices.csv"), reason


@pytest.mark.parametrize("where", ["in", "below"])
def test_an_out_folder_that_cannot_be_written_is_refused_in_a_second_before_anything_loads(
        where, read_only_folder, untrained_root, monkeypatch):
    root, new_csv = untrained_root
    out, reason = unwritable(where, read_only_folder)
    monkeypatch.setattr(score, "Scorer", lambda *a, **k: pytest.fail("the root was loaded"))
    t0 = time.monotonic()
    with pytest.raises(FolderNotWritable) as refused:
        score.score_file(root, new_csv, out)
    assert time.monotonic() - t0 < 1.0
    assert str(refused.value) == f"cannot write to the output folder {out.parent}: {reason}"
    assert list(read_only_folder.iterdir()) == []


@pytest.mark.parametrize("where", ["in", "below"])
def test_the_command_line_says_it_in_one_line_with_exit_2(where, read_only_folder, untrained_root):
    root, new_csv = untrained_root
    out, reason = unwritable(where, read_only_folder)
    done = subprocess.run([sys.executable, "-m", "pipeline", f"root={root}", f"score={new_csv}", f"out={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: cannot write to the output folder {out.parent}: {reason}"]


def test_a_full_disk_while_scoring_is_one_line_leaves_nothing_and_the_same_command_then_works(trained, tmp_path):
    rows = pd.read_csv(trained / "raw" / "test.csv", dtype=str, keep_default_na=False).iloc[:50]
    new_csv = write_csv(rows, tmp_path / "new.csv")
    with tmpfs(tmp_path / "small_disk", "size=200k") as disk:  # holds the output, not the chunk's vectors
        out = disk / "prices.csv"
        with pytest.raises(score.ScoringError) as failed:
            score.score_file(trained, new_csv, out)
        message = str(failed.value)
        assert "\n" not in message and message.startswith(f"cannot write {disk}/prices.csv.scoring/")
        assert message.endswith(f": {os.strerror(errno.ENOSPC)}; nothing was left behind")
        assert list(disk.iterdir()) == []
        subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)  # space freed
        score.score_file(trained, new_csv, out)
        assert_root_prices(out, trained)
        assert [p.name for p in disk.iterdir()] == ["prices.csv"]
        assert open_files_under(disk) == []  # no stage's log file left open in the scratch that is gone


def test_a_failed_write_keeps_the_finished_chunks_and_the_same_command_resumes_from_them(trained, tmp_path,
                                                                                          monkeypatch):
    rows = pd.read_csv(trained / "raw" / "test.csv", dtype=str, keep_default_na=False).iloc[:60]
    new_csv = write_csv(rows, tmp_path / "new.csv")
    whole = score.score_file(trained, new_csv, tmp_path / "whole.csv", chunk_rows=30)
    encode, calls = score.Scorer.encode, []

    def disk_fills_on_the_second_chunk(self, cfgs):
        calls.append(1)
        if len(calls) == 2:  # the disk fills while the second chunk's vectors are written
            target = Path(cfgs["qwen"].embeddings_dir) / "qwen_text" / "test" / "vectors.npy"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        return encode(self, cfgs)

    monkeypatch.setattr(score.Scorer, "encode", disk_fills_on_the_second_chunk)
    out = tmp_path / "prices.csv"
    scratch = Path(str(out) + score.SCRATCH_SUFFIX)
    with pytest.raises(score.ScoringError) as failed:
        score.score_file(trained, new_csv, out, chunk_rows=30)
    assert str(failed.value) == (
        f"cannot write {scratch}/work_00001/embeddings/qwen_text/test/vectors.npy: No space left on device; "
        f"the 1 finished chunk(s) in {scratch} are kept, and the same command resumes from them")
    assert not out.exists()
    assert sorted(p.name for p in scratch.iterdir()) == ["chunks", "images", "scoring.json"]  # no unfinished work
    assert [p.name for p in (scratch / "chunks").iterdir()] == ["chunk_00000.parquet"]
    calls.clear()
    monkeypatch.setattr(score.Scorer, "encode", lambda self, cfgs: (calls.append(1), encode(self, cfgs))[1])
    score.score_file(trained, new_csv, out, chunk_rows=30)
    assert len(calls) == 1  # only the second chunk ran again
    assert out.read_bytes() == whole.read_bytes() and not scratch.exists()


def test_only_a_disk_refusal_becomes_the_one_line_and_a_writer_that_names_no_file_gets_the_scratch(tmp_path):
    scratch = tmp_path / "prices.csv.scoring"
    (scratch / "work_00000").mkdir(parents=True)
    assert score.write_failure(OSError(errno.ENOENT, "No such file or directory", "x"), scratch) is None
    assert scratch.exists()  # nothing dropped for an error that is not the disk's
    failure = score.write_failure(OSError(errno.ENOSPC, "No space left on device"), scratch)  # as pyarrow raises it
    assert str(failure) == f"cannot write {scratch}: No space left on device; nothing was left behind"
    assert not scratch.exists()


def hold_in_child(root: Path, shared: bool) -> subprocess.Popen:
    """A process holding `root` (as a training run does, or a scoring run with shared) until its stdin closes."""
    code = ("import sys; from pathlib import Path; from core.lock import hold_root\n"
            f"with hold_root(Path({str(root)!r}), shared={shared}):\n"
            "    print('held', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_scoring_stops_at_once_while_a_training_run_holds_the_root(untrained_root, tmp_path, monkeypatch):
    root, new_csv = untrained_root
    monkeypatch.setattr(score, "Scorer", lambda *a, **k: pytest.fail("the root was loaded"))
    child = hold_in_child(root, shared=False)
    try:
        t0 = time.monotonic()
        with pytest.raises(RootBusy, match=rf"in use by a training run: PID {child.pid}, started "):
            score.score_file(root, new_csv, tmp_path / "prices.csv")
        assert time.monotonic() - t0 < 1.0
    finally:
        child.communicate("")


def test_scorings_share_the_root(untrained_root, tmp_path, monkeypatch):
    root, new_csv = untrained_root

    class Loaded(Exception):
        pass

    def loads(*args, **kwargs):
        raise Loaded  # past the lock: the root would load now

    monkeypatch.setattr(score, "Scorer", loads)
    child = hold_in_child(root, shared=True)
    try:
        with pytest.raises(Loaded):
            score.score_file(root, new_csv, tmp_path / "prices.csv")
    finally:
        child.communicate("")
