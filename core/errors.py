"""Errors a user can fix (bad config, bad input file, missing upstream output, a disk that refuses
a write). Scripts print their message and exit 2 instead of showing a traceback."""
import errno
import os
import sys


class PipelineError(Exception):
    pass


# What a disk answers when it will not take a file: full, over quota, read-only, no permission.
DISK_REFUSALS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def disk_refusal_line(exc: OSError) -> str | None:
    """`error: cannot write PATH: REASON` for an OSError that a full, read-only or forbidden disk
    raised; None for any other OSError (left to show its traceback)."""
    if exc.errno not in DISK_REFUSALS or (exc.errno == errno.EPERM and exc.filename is None):
        return None  # EPERM without a path comes from signals, ownership and the like, not from a write
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return f"error: cannot write to disk: {reason}"
    path = os.fsdecode(exc.filename)
    # permission errors also come from reading: an existing file this user may not read was a read
    unreadable = exc.errno in (errno.EACCES, errno.EPERM) and os.path.exists(path) and not os.access(path, os.R_OK)
    return f"error: cannot {'read' if unreadable else 'write'} {path}: {reason}"


def run_cli(fn, *args):
    """Call a script's main; a PipelineError becomes `error: ...` on stderr and exit status 2, and
    so does an OSError from a full, read-only or forbidden disk (one line naming the path)."""
    try:
        return fn(*args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        line = disk_refusal_line(exc)
        if line is None:
            raise
        print(line, file=sys.stderr)
        sys.exit(2)
