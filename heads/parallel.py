"""Independent fits (folds, ridge pairs, network seeds) on every core, with results that do not depend
on how many ran at once: every task computes on one thread, in the main process or in a worker, so its
arithmetic and its bits are the same either way; tasks seed themselves and never read shared state."""
from __future__ import annotations

import os
from contextlib import contextmanager


def cores(n_jobs: int) -> int:
    """n_jobs, or for 0 every core this process may run on."""
    if n_jobs > 0:
        return n_jobs
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def one_thread():
    """BLAS, OpenMP and torch limited to one thread for the block's duration."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def _on_one_thread(function, args):
    with one_thread():
        return function(*args)


def process_map(function, tasks, n_jobs: int) -> list:
    """[function(*args) for args in tasks] in order, up to n_jobs worker processes at once (1: in this
    process), each task on one thread. `function` must be importable (a module-level function)."""
    tasks = list(tasks)
    jobs = min(n_jobs, len(tasks))
    if jobs <= 1:
        return [_on_one_thread(function, args) for args in tasks]
    from joblib import Parallel, delayed

    return Parallel(n_jobs=jobs, backend="loky")(delayed(_on_one_thread)(function, args) for args in tasks)


def thread_map(function, tasks, n_jobs: int) -> list:
    """[function(*args) for args in tasks] in order, up to n_jobs threads at once: for work that leaves the
    GIL and sets its own thread count (LightGBM), so that its inputs are shared, not copied."""
    tasks = list(tasks)
    jobs = min(n_jobs, len(tasks))
    if jobs <= 1:
        return [function(*args) for args in tasks]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda args: function(*args), tasks))
