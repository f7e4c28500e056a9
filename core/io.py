"""Atomic file writes and JSON sidecars: a crash never leaves a half-written output in place."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes the file private; the output gets a plain file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def atomic_save(write_fn, path: Path) -> None:
    """Run `write_fn(tmp_path)` (e.g. torch.save, df.to_parquet) and move the result into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# Bytes that are not valid UTF-8, as a file opened with errors="surrogateescape" decodes them.
UNDECODABLE = re.compile("[\udc80-\udcff]")


def undecodable_bytes(text: str) -> str:
    """The first bytes of `text` that were not valid UTF-8, as \\xNN escapes ('' when there are none)."""
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" for c in UNDECODABLE.findall(text)[:4])


def escaped(text: str) -> str:
    """`text` with each byte that was not valid UTF-8 written as \\xNN, safe to print."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
