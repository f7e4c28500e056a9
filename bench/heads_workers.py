"""The heads stage with 1 and with more workers, on a root that a real run prepared, in one table.

    python -m bench.heads_workers root=/tmp/real_bench jobs=1,2 work=/tmp/heads_workers [key=value ...]

`root`: a root that `python -m bench.real_data` (or the pipeline with `profile=small`) ran in; its
prepared tables and embedding caches are read, nothing in it is written. Each `jobs` value runs
`python -m heads.train profile=small heads.n_jobs=J` in a fresh process on its own copy of the caches
(the stage writes its tabular cache there), one after the other. Prints seconds per run, the speedup
against the first, and whether every head's out-of-fold and test predictions are identical to the first
run's. Further `key=value` tokens go to every run's heads config.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench import split_options
from bench.peak_memory import device_description

DEFAULTS = {"root": "/tmp/real_bench", "jobs": "1,2", "work": "/tmp/heads_workers"}  # its own options; the rest: heads keys


def run_heads(root: Path, out: Path, jobs: int, extra: list[str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(root / "embeddings", out / "embeddings")
    command = [sys.executable, "-m", "heads.train", "profile=small", f"data_dir={root / 'data'}",
               f"embeddings_dir={out / 'embeddings'}", f"predictions_dir={out / 'predictions'}",
               f"out_dir={out / 'heads'}", f"n_jobs={jobs}", *extra]
    start = time.time()
    with open(out / "log.txt", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PRICE_NO_PROGRESS": "1"})
    if done.returncode:
        sys.exit(f"heads with n_jobs={jobs} failed (exit {done.returncode}); see {out / 'log.txt'}")
    return time.time() - start


def predictions(out: Path) -> dict[str, pd.Series]:
    found = {}
    for path in sorted((out / "predictions").glob("*/*.parquet")):
        frame = pd.read_parquet(path)
        found[f"{path.parent.name}/{path.stem}"] = frame.set_index("sample_id")["log_pred"]
    return found


def main(argv: list[str] | None = None) -> pd.DataFrame:
    opts, extra = split_options(sys.argv[1:] if argv is None else argv, DEFAULTS)
    root, work = Path(opts["root"]), Path(opts["work"])
    if not (root / "data" / "train.parquet").is_file():
        sys.exit(f"root={root}: no data/train.parquet; run python -m bench.real_data root={root} first")
    device = device_description()
    rows, first = [], None
    for jobs in (int(j) for j in opts["jobs"].split(",")):
        out = work / f"jobs{jobs}"
        seconds = run_heads(root, out, jobs, extra)
        found = predictions(out)
        if first is None:
            first = (seconds, found)
        same = found.keys() == first[1].keys() and all(
            np.array_equal(found[k].to_numpy(), first[1][k].to_numpy()) for k in found)
        rows.append({"what": "heads stage, profile=small, real rows", "device": device, "n_jobs": jobs,
                     "seconds": round(seconds, 1), "speedup": round(first[0] / seconds, 2),
                     "predictions_identical": same, "files": len(found)})
        print(f"[heads_workers] n_jobs={jobs}: {seconds:.1f} s", flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    return table


if __name__ == "__main__":
    main()
