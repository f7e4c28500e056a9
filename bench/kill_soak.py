"""Kill the tiny pipeline with SIGKILL at N moments spread over every stage, rerun until it finishes,
and check that test_out.csv equals an uninterrupted run's bytes.

    python -m bench.kill_soak kills=20 seed=0 work=/tmp/kill_soak

An uninterrupted run first gives the reference bytes and each stage's time. Then, on a fresh root,
each kill aims at the next stage in order: the soak waits for the pipeline to print that stage's
`running` line, sleeps a random share of the stage's reference time and kills the whole process
group (DataLoader workers too). The killed run is restarted at once; when a run finishes, its
test_out.csv is compared with the reference and, if kills remain, a fresh root starts the next pass.
The table gives each kill's aimed and actual stage; the exit status is 1 when any pass differs.
"""
from __future__ import annotations

import codecs
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

RUNNING = re.compile(r"^\[pipeline\] (\S+): running")
SECONDS = re.compile(r"^\[pipeline\] seconds per stage: (.*)$")


def start(root: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PRICE_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "profile=tiny", f"root={root}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def reference_run(root: Path) -> tuple[bytes, dict[str, float], float]:
    t0 = time.time()
    proc = start(root)
    seconds = {}
    for raw in proc.stdout:
        if m := SECONDS.match(raw.decode(errors="replace").strip()):
            seconds = {k: float(v) for k, v in (part.rsplit(" ", 1) for part in m.group(1).split(", "))}
    if proc.wait() != 0:
        raise SystemExit(f"the uninterrupted run failed (exit {proc.returncode}); see {root}")
    return (root / "test_out.csv").read_bytes(), seconds, time.time() - t0


def run_until_killed(root: Path, aim: str, delay: float) -> tuple[str | None, bool]:
    """Run the pipeline; once `aim` starts (or a later stage, if `aim` is already done), wait `delay`
    seconds and SIGKILL the process group. Returns (the stage running at the kill, whether killed)."""
    proc = start(root)
    current, deadline = None, None
    os.set_blocking(proc.stdout.fileno(), False)  # bytes: a text pipe's read fails when nothing is there
    decoder, buffer = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    while True:
        chunk = proc.stdout.read()
        if chunk:
            buffer += decoder.decode(chunk)
            *lines, buffer = buffer.split("\n")
            for line in lines:
                if m := RUNNING.match(line.strip()):
                    current = m.group(1)
                    if deadline is None and (current == aim):
                        deadline = time.time() + delay
        if deadline is not None and time.time() >= deadline and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return current, True
        if proc.poll() is not None:
            rest = decoder.decode(proc.stdout.read() or b"", final=True)
            if proc.returncode != 0:
                raise SystemExit(f"a rerun after a kill failed (exit {proc.returncode}):\n{buffer}{rest}")
            return current, False
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv)
    kills, rng = int(args.get("kills", 20)), random.Random(int(args.get("seed", 0)))
    work = Path(args.get("work", "/tmp/kill_soak"))
    shutil.rmtree(work, ignore_errors=True)
    reference, seconds, ref_time = reference_run(work / "reference")
    stages = list(seconds)
    print(f"reference: {len(stages)} stages, {ref_time:.0f} s, test_out.csv {len(reference)} bytes", flush=True)

    rows, passes, done, t0 = [], [], 0, time.time()
    while done < kills:
        root = work / f"pass{len(passes)}"
        aims = stages[:kills - done] if kills - done < len(stages) else stages
        for aim in aims:
            stage, killed = run_until_killed(root, aim, rng.uniform(0, seconds[aim]))
            if killed:
                done += 1
                rows.append((done, len(passes), aim, stage))
                print(f"kill {done}: aimed at {aim}, landed in {stage}", flush=True)
        run_until_killed(root, "never", 0)  # finish the pass: a run with no kill
        same = (root / "test_out.csv").read_bytes() == reference
        passes.append(same)
        print(f"pass {len(passes) - 1}: test_out.csv {'identical' if same else 'DIFFERS'}", flush=True)

    print("\n| kill | pass | aimed at | landed in |\n| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    landed = sorted({r[3] for r in rows if r[3]})
    print(f"\n{done} kills over {len(passes)} passes in {time.time() - t0:.0f} s; stages hit: {', '.join(landed)}; "
          f"missed: {', '.join(s for s in stages if s not in landed) or 'none'}; "
          f"test_out.csv identical to the uninterrupted run in {sum(passes)} of {len(passes)} passes")
    return 0 if all(passes) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
