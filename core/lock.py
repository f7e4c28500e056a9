"""One writer per root: a training run holds its root alone; scoring runs, which only read it,
share it with each other but never with a training run.

    with hold_root(root):               # a training run (the pipeline, data.prepare)
    with hold_root(root, shared=True):  # a scoring run

The lock is an `flock` on `<root>/.lock`, which the kernel releases when its process dies, so a
lock left by a killed run is simply free again. Beside it, `.lock.json` records the training run
that holds the root (PID, start time, command line) and `.lock.shared/` one record per scoring
run, so that a refused run can say who holds the root. A record whose run is gone is taken over
with a line saying so.

A process holds a root once: a nested hold of a root it already holds (a training run that scores)
passes through. Under torchrun only rank 0 takes the lock; the launcher stops the other ranks when
rank 0 is refused.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shlex
import sys
from datetime import datetime
from pathlib import Path

from core.errors import PipelineError
from core.io import process_alive, read_json, write_json

LOCK_FILE = ".lock"
RECORD_FILE = ".lock.json"  # the training run holding the root
SHARED_DIR = ".lock.shared"  # one record per scoring run holding it

_held: dict[Path, bool] = {}  # roots this process holds -> shared?


class RootBusy(PipelineError):
    pass


def _read_record(path: Path) -> dict | None:
    try:
        record = read_json(path)
        return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None
    except (OSError, ValueError):
        return None  # gone meanwhile, or half a record from a writer that is still starting


def _describe(record: dict) -> str:
    command = " ".join(str(record.get("command", "?")).split())  # one line, whatever the command held
    return f"PID {record['pid']}, started {record.get('started', '?')} ({command})"


def _shared_records(root: Path) -> list[tuple[Path, dict]]:
    folder = root / SHARED_DIR
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = _read_record(path)
        if record is not None:
            found.append((path, record))
    return found


def _busy_message(root: Path, shared: bool) -> str:
    holder = _read_record(root / RECORD_FILE)
    if holder is not None and process_alive(holder["pid"]):
        return (f"{root} is in use by a training run: {_describe(holder)}. Two runs on one root would overwrite "
                f"each other's files: wait for it to finish, or stop it (kill {holder['pid']}), then run this again.")
    scorers = [record for _, record in _shared_records(root) if process_alive(record["pid"])]
    if scorers and not shared:
        listed = "; ".join(_describe(r) for r in scorers)
        return (f"{root} is being scored by {len(scorers)} run(s): {listed}. Training would change the models "
                "under them: wait for the scoring to finish, then run this again.")
    if holder is not None:
        return (f"{root} is locked by a process that a training run started ({_describe(holder)}); that run is no "
                f"longer running but the process it started still holds {root / LOCK_FILE}: find it with "
                f"`fuser -v {root / LOCK_FILE}`, stop it, then run this again.")
    return (f"{root} is locked by another run that is starting or stopping; try again in a moment, or find it "
            f"with `fuser -v {root / LOCK_FILE}`.")


def _take_over_leftovers(root: Path, shared: bool) -> None:
    """Remove the records of runs that ended without releasing the root, saying so. Called with the
    lock held: a training run's record is then always a leftover, and so is every scoring run's
    when this run holds the root alone."""
    leftovers = []
    holder = _read_record(root / RECORD_FILE)
    if holder is not None:
        leftovers.append((root / RECORD_FILE, holder, "a training run"))
    for path, record in _shared_records(root):
        if not shared or not process_alive(record["pid"]):
            leftovers.append((path, record, "a scoring run"))
    for path, record, kind in leftovers:
        print(f"warning: taking over the lock on {root} left by {kind}, PID {record['pid']} (started "
              f"{record.get('started', '?')}), which ended without releasing it", file=sys.stderr, flush=True)
        path.unlink(missing_ok=True)


def _open_lock_file(root: Path, shared: bool) -> int | None:
    """The lock file's descriptor; None for a scoring run on a root that no one can write here
    (read-only, or missing), where no training run can be writing either."""
    if not shared:
        root.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except FileNotFoundError:
        if shared:
            return None
        raise
    except OSError as exc:
        if not shared or exc.errno not in (errno.EROFS, errno.EACCES):
            raise
    try:
        return os.open(root / LOCK_FILE, os.O_RDONLY)  # a shared flock needs no write access
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def hold_root(root: Path, shared: bool = False):
    """Hold `root` for this run, exclusively (a training run) or shared (a scoring run), until the
    block ends, also on an exception. Raises RootBusy at once, naming the holder, when another run
    holds it in a way that conflicts."""
    root = Path(root).resolve()
    if root in _held:
        if not _held[root] or shared:
            yield  # held already by this process
            return
        raise RootBusy(f"{root}: this process scores the root and cannot also train on it")
    if int(os.environ.get("RANK", "0")) != 0:
        yield  # a torchrun rank other than 0: rank 0 holds the root for the whole job
        return
    fd = _open_lock_file(root, shared)
    if fd is None:
        yield
        return
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RootBusy(_busy_message(root, shared)) from None
    record_path = root / (f"{SHARED_DIR}/{os.getpid()}-{secrets.token_hex(4)}.json" if shared else RECORD_FILE)
    record = {"pid": os.getpid(), "started": datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": shlex.join(sys.orig_argv), "kind": "scoring" if shared else "training"}
    _held[root] = shared
    try:
        _take_over_leftovers(root, shared)
        try:
            write_json(record_path, record)
        except OSError:
            if not shared:
                raise
            # a read-only root: the scoring run holds the lock without a record
        yield
    finally:
        del _held[root]
        with contextlib.suppress(FileNotFoundError if not shared else OSError):
            record_path.unlink()  # before unlocking: a record seen under the lock is never a live run's
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
