"""Errors a user can fix (bad config, bad input file, missing upstream output). Scripts print
their message and exit 2 instead of showing a traceback."""
import sys


class PipelineError(Exception):
    pass


def run_cli(fn, *args):
    """Call a script's main; a PipelineError becomes `error: ...` on stderr and exit status 2."""
    try:
        return fn(*args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
