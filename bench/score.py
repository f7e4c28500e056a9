"""Seconds and peak memory of pricing new rows with a trained root (score.py), each run in a child process.

    python -m bench.score                                        # 2,000 real rows + 10k/100k/1M synthetic rows
    python -m bench.score sizes=10000 work=/tmp/bench_score      # a quick check
    python -m bench.score small_root=/tmp/real_small_root sizes=10000,100000,1000000 chunk_rows=50000

Two measurements, one table:

- 2,000 real rows with a trained `profile=small` root (`small_root`, real MiniLM weights; skipped with
  a note when the folder is missing): the NEW.csv is the root's own raw/test.csv rows (its first
  `small_rows`, topped up with its rows again under new ids when it has fewer), scored with
  `python -m pipeline root=R score=NEW.csv out=PRICES.csv`; the ratio is scoring seconds over the
  whole training run's seconds (the sum of every stage's `seconds` in R/pipeline_state.json).
- scale: a tiny root is trained once (`python -m pipeline profile=tiny root=WORK/tiny_root`, the
  demo), its test rows are cycled into files of `sizes` rows under new ids `s0, s1, ...` (image links
  made absolute, the file written in blocks), and each file is scored with `score_chunk_rows=chunk_rows`;
  the ratio is the peak memory over the smallest size's.

Each scoring runs as `python -m pipeline ...` in its own process; its peak resident memory is the
child's ru_maxrss from wait4 (as in bench.peak_memory) and its output goes to WORK/logs/<name>.log,
whose per-chunk seconds are summarised under the table. Nothing is written into a trained root.
On a machine shared with other work, `OMP_NUM_THREADS=1 python -m bench.score ...` keeps torch's
threads from spinning against the other processes (two threads on a busy 2-core box ran the tiny
text encoder about 20x slower); the header says which was used.
Further `key=value` tokens (placement only: device=cpu, batch sizes) go to every scoring.
"""
from __future__ import annotations

import datetime
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench import split_options
from bench.peak_memory import cpu_model, device_description, run_measured

DEFAULTS = {
    "small_root": "/tmp/real_small_root",  # a trained profile=small root; the real-rows row is skipped if missing
    "small_rows": "2000",  # rows scored with the small root
    "work": "",  # scratch folder (tiny root, generated files, outputs, logs); default: a new temp folder
    "sizes": "10000,100000,1000000",  # synthetic file sizes scored with the tiny root
    "chunk_rows": "50000",  # score_chunk_rows for every scoring (score.py's default)
}
TIME_GOAL = 0.05  # scoring 2,000 rows should cost under 5% of the run that trained the root
MEMORY_GOAL = 1.5  # the largest file's peak memory within 1.5x of the smallest's
BLOCK_ROWS = 50_000  # rows per block when writing a generated file


def short_device(rest: list[str]) -> str:
    """'cpu, 2 cores (AMD EPYC)', or the GPU's name when the children would use one."""
    text = f"cpu, {os.cpu_count()} cores ({cpu_model()})"
    import torch

    if torch.cuda.is_available() and "device=cpu" not in rest:
        text = f"{torch.cuda.get_device_name(0)} + {text}"
    return text


def small_test_file(root: Path, path: Path, rows: int) -> Path:
    """The root's first `rows` test rows (no price); cycled again under new ids when it has fewer."""
    test = pd.read_csv(root / "raw" / "test.csv", dtype={"sample_id": str})
    test = test[["sample_id", "catalog_content", "image_link"]]
    extra = rows - len(test)
    if extra > 0:
        again = test.iloc[np.arange(extra) % len(test)].assign(sample_id=[f"bench{i}" for i in range(extra)])
        test = pd.concat([test, again], ignore_index=True)
    test.head(rows).to_csv(path, index=False)
    return path


def absolute_links(links: pd.Series, base: Path) -> pd.Series:
    """Local image links made absolute against `base`, so the file may live anywhere; URLs unchanged."""
    def one(link: str) -> str:
        if not isinstance(link, str) or not link or link.lower().startswith(("http://", "https://")):
            return link
        return str((base / link).resolve()) if not Path(link).is_absolute() else link

    return links.map(one)


def cycled_file(test_csv: Path, path: Path, rows: int) -> Path:
    """`rows` rows cycling `test_csv`'s rows with ids s0, s1, ...; written block by block so that a
    million rows never sit in memory at once."""
    test = pd.read_csv(test_csv, dtype={"sample_id": str})[["catalog_content", "image_link"]]
    test["image_link"] = absolute_links(test["image_link"], test_csv.parent)
    with open(path, "w", newline="", encoding="utf-8") as f:
        for start in range(0, rows, BLOCK_ROWS):
            index = np.arange(start, min(start + BLOCK_ROWS, rows))
            block = test.iloc[index % len(test)].reset_index(drop=True)
            block.insert(0, "sample_id", [f"s{i}" for i in index])
            block.to_csv(f, header=start == 0, index=False)
    return path


def chunk_summary(log_path: Path, seconds: float) -> str:
    """Per-chunk seconds from score.py's 'chunk k/n: R rows in S s' lines, and the time outside chunks."""
    times = [float(s) for s in re.findall(r"chunk \d+/\d+: \d+ rows in ([\d.]+) s", log_path.read_text(errors="replace"))]
    if not times:
        return "no chunk lines in the log"
    rest = f", mean of the others {np.mean(times[1:]):.1f} s" if len(times) > 1 else ""
    return (f"{len(times)} chunk(s): first {times[0]:.1f} s{rest}; outside chunks {seconds - sum(times):.1f} s "
            "(start, loading the root, the validation pass, writing the output)")


def score_measured(root: Path, new_csv: Path, out: Path, chunk_rows: int, rest: list[str], log: Path) -> dict:
    """Score `new_csv` with `root` in a child process: its seconds, peak RSS and the output's row count."""
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pipeline", f"root={root}", f"score={new_csv}", f"out={out}",
               f"score_chunk_rows={chunk_rows}", *rest]
    code, peak, seconds = run_measured(command, log)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"scoring {new_csv} failed (exit {code}); log {log}:\n{tail}")
    return {"seconds": seconds, "peak": peak, "out": out, "log": log}


def rows_in(out: Path) -> int:
    return sum(len(part) for part in pd.read_csv(out, usecols=["sample_id"], chunksize=200_000))


def full_run_seconds(root: Path) -> float:
    from core.io import read_json

    state = read_json(root / "pipeline_state.json")
    return sum(v.get("seconds") or 0.0 for v in state.values() if isinstance(v, dict))


def measure_small(opts: dict, work: Path, rest: list[str], device: str, notes: list[str]) -> dict | None:
    root = Path(opts["small_root"]) if opts["small_root"] else None
    if root is None or not (root / "pipeline_state.json").exists():
        print(f"[bench.score] no trained root at {opts['small_root']!r}: the real-rows row is skipped "
              "(train one with `python -m bench.real_data root=/tmp/real_small_root`)", flush=True)
        return None
    rows = int(opts["small_rows"])
    new_csv = small_test_file(root, work / f"real_{rows}.csv", rows)
    print(f"[bench.score] scoring {rows:,} real rows with {root} ...", flush=True)
    run = score_measured(root, new_csv, work / f"real_{rows}_prices.csv", int(opts["chunk_rows"]), rest,
                         work / "logs" / f"real_{rows}.log")
    full = full_run_seconds(root)
    ratio = run["seconds"] / full
    notes.append(f"real {rows:,} rows: {chunk_summary(run['log'], run['seconds'])}")
    # rows of the root's own test file must get the root's own prices
    ours = pd.read_csv(run["out"], dtype={"sample_id": str}).set_index("sample_id")["price"]
    theirs = pd.read_csv(root / "test_out.csv", dtype={"sample_id": str}).set_index("sample_id")["price"]
    shared = ours.index.intersection(theirs.index)
    if len(shared):
        gap = float(np.max(np.abs(ours[shared] / theirs[shared] - 1)))
        notes.append(f"real {rows:,} rows: {len(shared):,} are rows of {root}/test_out.csv; largest relative price "
                     f"difference {gap:.2e}")
    return {"what": f"score {rows:,} real rows, profile=small", "device": device, "rows": rows_in(run["out"]),
            "seconds": round(run["seconds"], 1), "rows_per_s": round(rows / run["seconds"], 1),
            "peak_rss_mib": round(run["peak"]), "ratio": f"{ratio:.3f}",
            "ratio_of": f"scoring s / full run {full:.0f} s", "goal": f"< {TIME_GOAL:.2f}",
            "met": "yes" if ratio < TIME_GOAL else "no"}


def train_tiny(work: Path) -> Path:
    root = work / "tiny_root"
    print(f"[bench.score] training the tiny root {root} (skipped stage by stage when up to date) ...", flush=True)
    code, peak, seconds = run_measured([sys.executable, "-m", "pipeline", "profile=tiny", f"root={root}"],
                                       work / "logs" / "tiny_root.log")
    if code != 0:
        raise RuntimeError(f"training the tiny root failed (exit {code}); log {work / 'logs' / 'tiny_root.log'}")
    print(f"[bench.score] tiny root ready in {seconds:.0f} s", flush=True)
    return root


def measure_scale(opts: dict, work: Path, rest: list[str], device: str, notes: list[str]) -> list[dict]:
    sizes = [int(s) for s in opts["sizes"].split(",") if s.strip()]
    if not sizes:
        return []
    root = train_tiny(work)
    rows, base = [], None
    for n in sorted(sizes):
        new_csv = cycled_file(root / "raw" / "test.csv", work / f"tiny_{n}.csv", n)
        print(f"[bench.score] scoring {n:,} synthetic rows with the tiny root ...", flush=True)
        run = score_measured(root, new_csv, work / f"tiny_{n}_prices.csv", int(opts["chunk_rows"]), rest,
                             work / "logs" / f"tiny_{n}.log")
        base = base or (n, run["peak"])
        ratio = run["peak"] / base[1]
        notes.append(f"{n:,} synthetic rows: {chunk_summary(run['log'], run['seconds'])}")
        rows.append({"what": f"score {n:,} synthetic rows, tiny models", "device": device, "rows": rows_in(run["out"]),
                     "seconds": round(run["seconds"], 1), "rows_per_s": round(n / run["seconds"], 1),
                     "peak_rss_mib": round(run["peak"]), "ratio": f"{ratio:.2f}",
                     "ratio_of": f"peak RSS / {base[0]:,} rows' peak", "goal": f"<= {MEMORY_GOAL}x" if n != base[0] else "",
                     "met": ("yes" if ratio <= MEMORY_GOAL else "no") if n != base[0] else ""})
        print(f"[bench.score] {n:,} rows: {run['seconds']:.1f} s, {run['peak']:,.0f} MiB", flush=True)
        new_csv.unlink()  # the generated files are large; the scored output stays for inspection
    return rows


def main(argv: list[str] | None = None) -> pd.DataFrame:
    from core.metrics import format_table

    argv = list(sys.argv[1:] if argv is None else argv)
    opts, rest = split_options(argv, DEFAULTS)
    work = Path(opts["work"]) if opts["work"] else Path(tempfile.mkdtemp(prefix="price_bench_score_"))
    work.mkdir(parents=True, exist_ok=True)
    device, notes = short_device(rest), []
    t0 = time.time()
    rows = [r for r in [measure_small(opts, work, rest, device, notes)] if r is not None]
    rows += measure_scale(opts, work, rest, device, notes)
    table = pd.DataFrame(rows)
    load = os.getloadavg()
    print(f"\nscoring new rows with a trained root (python -m pipeline root=R score=NEW.csv out=PRICES.csv "
          f"score_chunk_rows={opts['chunk_rows']}), each in its own process; work folder {work}")
    print(f"{datetime.date.today().isoformat()}, {device_description()}; load average at the end "
          f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; whole benchmark {time.time() - t0:.0f} s; "
          f"threads per child: {os.environ.get('OMP_NUM_THREADS', 'torch default')}")
    if len(table):
        print(format_table(table, floatfmt="{:.1f}"))
        table.to_csv(work / "bench_score.csv", index=False)
    print("\n" + "\n".join(notes))
    print(f"children's logs: {work / 'logs'}")
    return table


if __name__ == "__main__":
    from core.errors import run_cli

    run_cli(main)
