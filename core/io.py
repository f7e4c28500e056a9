"""Atomic file writes and JSON sidecars: a crash never leaves a half-written output in place.

Every write goes to a temporary file beside its target, named uniquely per writer (with the
writer's PID, so a dead writer's leftovers can be told apart), and is moved into place only when
complete. A write that the disk refuses (full, over quota, read-only) removes its temporary file
and raises an OSError naming the target, which `core.errors.run_cli` prints as one line.
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path

from core.errors import DISK_REFUSALS, PipelineError


class FolderNotWritable(PipelineError):
    pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


def process_alive(pid: int) -> bool:
    """Whether process `pid` is running (a zombie, dead but not yet reaped, counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def _temp_beside(path: Path) -> Path:
    """A new empty file beside `path`, unique to this writer. It keeps `path`'s suffix, since some
    writers (np.save, np.savez) append one to a name that lacks it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=f".tmp{path.suffix}")
    os.close(fd)
    return Path(tmp)


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files of `path` left by writers that died mid-write; returns them.
    A live writer's temporary file is left alone."""
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(f".tmp{path.suffix}")):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            (path.parent / name).unlink(missing_ok=True)
            removed.append(path.parent / name)
    return removed


def _no_space(folder: Path) -> OSError | None:
    """The ENOSPC/EDQUOT error that writing a few KiB in `folder` raises now, else None. Some writers
    (torch.save, np.save) report a full disk as a RuntimeError or an OSError without an errno."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".space-probe-")
    except OSError as exc:
        return exc if exc.errno in (errno.ENOSPC, errno.EDQUOT) else None
    try:
        if os.write(fd, bytes(4096)) < 4096:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return None
    except OSError as exc:
        return exc if exc.errno in (errno.ENOSPC, errno.EDQUOT) else None
    finally:
        os.close(fd)
        os.unlink(probe)


def _disk_refusal(exc: BaseException, path: Path) -> OSError | None:
    """For a failed write of `path`: the OSError to raise in its place when the disk refused it
    (naming `path`, not the temporary file), else None. Called while the temporary file still holds
    the space it took."""
    if isinstance(exc, OSError) and exc.errno is not None:
        cause = exc if exc.errno in DISK_REFUSALS else None
    elif isinstance(exc, Exception) and not isinstance(exc, PipelineError):
        cause = _no_space(path.parent)
    else:
        cause = None
    if cause is None:
        return None
    return OSError(cause.errno, cause.strerror or os.strerror(cause.errno), str(path))


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        refused = _disk_refusal(exc, path)
        if refused is None:
            raise
        raise refused from exc


def atomic_save(write_fn, path: Path) -> None:
    """Run `write_fn(tmp_path)` (e.g. torch.save, df.to_parquet, np.save) and move the result into
    place. `tmp_path` is unique to this call and ends with `path`'s suffix; it exists (empty) already."""
    path = Path(path)
    _make_parent(path)
    try:
        tmp = _temp_beside(path)
    except OSError as exc:
        refused = _disk_refusal(exc, path)
        if refused is None:
            raise
        raise refused from exc
    # np.save and np.savez write to `name.npy` / `name.npz` when the name lacks that suffix
    strays = [tmp.with_name(tmp.name + suffix) for suffix in (".npy", ".npz")]
    try:
        write_fn(tmp)
        if any(stray.exists() for stray in strays):
            raise ValueError(f"{path}: the writer added a suffix to the file it was given (np.save adds .npy, "
                             f"np.savez .npz); name the output with that suffix")
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes the file private; the output gets a plain file's mode
        os.replace(tmp, path)
    except BaseException as exc:
        refused = _disk_refusal(exc, path)
        for leftover in (tmp, *strays):
            leftover.unlink(missing_ok=True)
        if refused is None:
            raise
        raise refused from exc


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_save(write, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_writable(folder: Path, what: str) -> None:
    """Fail at once, before any loading, when `folder` (created if missing) cannot take a new file:
    a read-only disk, no permission, or a full disk. `what` names the folder's role in the message,
    e.g. "the output folder"."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-")
        try:
            if os.write(fd, bytes(4096)) < 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise FolderNotWritable(f"cannot write to {what} {folder}: {exc.strerror or exc}") from None


# Bytes that are not valid UTF-8, as a file opened with errors="surrogateescape" decodes them.
UNDECODABLE = re.compile("[\udc80-\udcff]")


def undecodable_bytes(text: str) -> str:
    """The first bytes of `text` that were not valid UTF-8, as \\xNN escapes ('' when there are none)."""
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" for c in UNDECODABLE.findall(text)[:4])


def escaped(text: str) -> str:
    """`text` with each byte that was not valid UTF-8 written as \\xNN, safe to print."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
