"""Writes under stress: two writers of one file, a full disk, a read-only disk. A write either
lands whole or not at all, never leaves a temporary file, and a refused write is one line."""
import contextlib
import errno
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from core.embedding_cache import EmbeddingCacheWriter, load_embeddings
from core.errors import disk_refusal_line
from core.io import UMASK, FolderNotWritable, atomic_save, atomic_write_bytes, check_writable, write_json

ROOT = Path(__file__).resolve().parents[1]


def chunked_writer(payload: bytes, pieces: int = 64):
    """A write_fn that writes in pieces and yields the GIL between them, as a slow writer would."""
    def write(tmp):
        step = len(payload) // pieces
        with open(tmp, "wb") as f:
            for i in range(0, len(payload), step):
                f.write(payload[i:i + step])
                f.flush()
    return write


def test_two_threads_writing_one_file_never_mix(tmp_path):
    target = tmp_path / "best.pt"
    payloads = [bytes([65 + k]) * 512_000 for k in range(2)]
    errors, seen = [], set()
    stop = threading.Event()

    def writer(payload):
        try:
            for _ in range(15):
                atomic_save(chunked_writer(payload), target)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    def reader():
        while not stop.is_set():
            if target.exists():
                seen.add(target.read_bytes())

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert errors == []
    assert target.read_bytes() in payloads
    assert seen <= set(payloads)  # a reader only ever saw one whole payload
    assert os.listdir(tmp_path) == ["best.pt"]


def test_two_processes_writing_one_file_leave_one_whole_payload(tmp_path):
    target = tmp_path / "present.npy"  # np.save adds .npy to a name without it: the temp name must keep it
    script = """
import sys
from pathlib import Path
import numpy as np
from core.io import atomic_save
target, byte = Path(sys.argv[1]), int(sys.argv[2])
values = np.full(2_000_000, byte, dtype=np.uint8)
for _ in range(20):
    atomic_save(lambda tmp: np.save(tmp, values), target)
"""
    procs = [subprocess.Popen([sys.executable, "-c", script, str(target), str(b)], cwd=ROOT, stderr=subprocess.PIPE,
                              text=True) for b in (1, 2)]
    for proc in procs:
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    values = np.load(target)
    assert values.shape == (2_000_000,) and len(set(np.unique(values).tolist())) == 1
    assert os.listdir(tmp_path) == ["present.npy"]
    assert (target.stat().st_mode & 0o777) == 0o666 & ~UMASK  # a plain file's mode, not mkstemp's


def test_a_writer_that_renames_its_file_is_refused_not_emptied(tmp_path):
    target = tmp_path / "present.bin"
    target.write_bytes(b"old")
    with pytest.raises(ValueError, match="added a suffix"):
        atomic_save(lambda tmp: np.save(tmp, np.arange(3)), target)  # np.save writes tmp + ".npy"
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["present.bin"]


# ---------------------------------------------------------------- full and read-only disks


def _mount(point: Path, options: str) -> None:
    if shutil.which("mount") is None:
        pytest.skip("no mount command here: cannot make a small or read-only filesystem")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root): {done.stderr.strip()}")


@contextlib.contextmanager
def _mounted(point: Path, options: str):
    point.mkdir()
    _mount(point, options)
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB filesystem: any real write fills it."""
    with _mounted(tmp_path / "disk", "size=64k") as point:
        yield point


@pytest.fixture
def read_only_disk(tmp_path):
    with _mounted(tmp_path / "ro", "size=64k") as point:
        (point / "inside").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
        yield point


def _write_with(kind: str, target: Path) -> None:
    big = np.random.default_rng(0).random(200_000)
    if kind == "bytes":
        atomic_write_bytes(target, big.tobytes())
    elif kind == "json":
        write_json(target, {"values": big[:50_000].tolist()})
    elif kind == "np.save":  # reports a full disk as an OSError without an errno
        atomic_save(lambda tmp: np.save(tmp, big), target)
    elif kind == "torch.save":  # reports a full disk as a RuntimeError
        import torch

        atomic_save(lambda tmp: torch.save({"w": torch.from_numpy(big)}, tmp), target)
    elif kind == "parquet":
        import pandas as pd

        atomic_save(lambda tmp: pd.DataFrame({"x": big}).to_parquet(tmp), target)


@pytest.mark.parametrize("kind, name", [("bytes", "result.bin"), ("json", "meta.json"), ("np.save", "present.npy"),
                                        ("torch.save", "best.pt"), ("parquet", "test.parquet")])
def test_a_full_disk_keeps_the_old_file_and_leaves_no_temp(small_disk, kind, name):
    target = small_disk / "out" / name
    target.parent.mkdir()
    target.write_bytes(b"the previous good version")
    with pytest.raises(OSError) as failure:
        _write_with(kind, target)
    assert failure.value.errno == errno.ENOSPC and failure.value.filename == str(target)
    assert target.read_bytes() == b"the previous good version"
    assert os.listdir(target.parent) == [name]
    assert os.listdir(small_disk) == ["out"]


def test_an_extraction_that_fills_the_disk_resumes_once_there_is_room(small_disk):
    ids = [str(i) for i in range(200)]
    vectors = np.random.default_rng(1).random((200, 16)).astype(np.float32)
    writer = EmbeddingCacheWriter(small_disk, "src", "train", ids, dim=16, modality="text", model="m",
                                  dtype="float32", chunk_size=50)
    for chunk, start, stop in writer.pending_chunks():
        writer.write_chunk(chunk, vectors[start:stop])
    filler = small_disk / "filler"
    with pytest.raises(OSError):  # take what room is left
        with open(filler, "wb") as f:
            f.write(bytes(1 << 20))
    with pytest.raises(OSError) as failure:
        writer.finalize()
    assert failure.value.errno == errno.ENOSPC and failure.value.filename == str(writer.dir / "embeddings.npy")
    assert sorted(os.listdir(writer.dir)) == ["chunks", "meta.json", "sample_ids.npy"]
    filler.unlink()
    again = EmbeddingCacheWriter(small_disk, "src", "train", ids, dim=16, modality="text", model="m",
                                 dtype="float32", chunk_size=50)
    assert again.pending_chunks() == []  # every chunk survived: finishing needs no encoding
    again.finalize()
    np.testing.assert_array_equal(load_embeddings(small_disk, "src", "train").values, vectors)


FAIL = """
import sys
from pathlib import Path
from core.errors import run_cli
from core.io import atomic_write_bytes
from core.lock import hold_root
action, where = sys.argv[1], Path(sys.argv[2])
def main():
    if action == "write":
        atomic_write_bytes(where / "test_out.csv", bytes(1 << 20))
    elif action == "lock":
        with hold_root(where):
            pass
    else:
        open(where / "no-such-file")
run_cli(main)
"""


def run_failing(action: str, where: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FAIL, action, str(where)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_a_refused_write_is_one_line_and_exit_2(small_disk, tmp_path):
    done = run_failing("write", small_disk)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"error: cannot write {small_disk / 'test_out.csv'}: No space left on device\n"
    assert os.listdir(small_disk) == []
    other = run_failing("read", tmp_path)  # any other OSError keeps its traceback
    assert other.returncode == 1 and "Traceback" in other.stderr and "FileNotFoundError" in other.stderr


def test_a_read_only_disk_is_one_line_and_exit_2(read_only_disk):
    done = run_failing("write", read_only_disk / "inside")
    assert (done.returncode, done.stderr) == (2, f"error: cannot write {read_only_disk / 'inside/test_out.csv'}: "
                                                 "Read-only file system\n")
    locked = run_failing("lock", read_only_disk / "inside")
    assert (locked.returncode, locked.stderr) == (2, f"error: cannot write {read_only_disk / 'inside/.lock'}: "
                                                     "Read-only file system\n")


def test_check_writable_names_the_folder_its_role_and_the_reason(read_only_disk, small_disk, tmp_path):
    with pytest.raises(FolderNotWritable) as refused:
        check_writable(read_only_disk / "inside", "the output folder")
    assert str(refused.value) == f"cannot write to the output folder {read_only_disk / 'inside'}: Read-only file system"
    with pytest.raises(FolderNotWritable, match=f"the scoring folder {read_only_disk / 'new'}: Read-only file system"):
        check_writable(read_only_disk / "new", "the scoring folder")  # cannot even be created
    with pytest.raises(OSError):
        (small_disk / "filler").write_bytes(bytes(1 << 20))
    with pytest.raises(FolderNotWritable, match="No space left on device"):
        check_writable(small_disk, "the output folder")
    (small_disk / "filler").unlink()
    check_writable(small_disk / "a" / "b", "the output folder")  # created, and left empty
    assert os.listdir(small_disk / "a" / "b") == []


def test_which_os_errors_are_a_refusing_disk():
    assert disk_refusal_line(OSError(errno.ENOSPC, "No space left on device")) == \
        "error: cannot write to disk: No space left on device"
    assert disk_refusal_line(OSError(errno.EDQUOT, "Disk quota exceeded", "/r/x")) == \
        "error: cannot write /r/x: Disk quota exceeded"
    assert disk_refusal_line(PermissionError(errno.EPERM, "Operation not permitted")) is None  # e.g. os.kill
    assert disk_refusal_line(FileNotFoundError(errno.ENOENT, "No such file or directory", "/r/x")) is None
