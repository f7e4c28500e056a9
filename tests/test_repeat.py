"""The same command on the same machine writes the same bytes: two fresh processes run a reduced demo
(every stage, DataLoader workers, every head, both fusion models, the ensemble) into two roots, and
the submission, the report and every model's predictions must be byte-identical.

Separate processes with different PYTHONHASHSEED values, so that a seed taken from the clock or the
process id, an unseeded random generator, an order that follows set or dict hashing, or a result that
depends on which DataLoader worker finishes first shows up as different bytes."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# every stage of the demo on a smaller catalog with fewer epochs and rounds: about a tenth of `make demo`
REDUCED = ["profile=tiny", "synthetic.n_train=300", "synthetic.n_test=80", "clip.epochs=2", "qwen.epochs=1",
           "all_embeddings.epochs=4", "qwen_clip.epochs=4", "heads.mlp_epochs=2", "heads.lgbm_rounds=30",
           "ensemble.stack_rounds=50", "qwen.max_length=64", "heads.mlp_seeds=1"]


def run_demo(root: Path, hash_seed: int) -> None:
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "PRICE_NO_PROGRESS": "1"}
    done = subprocess.run([sys.executable, "-m", "pipeline", *REDUCED, f"root={root}"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def outputs(root: Path) -> dict[str, bytes]:
    """What a run hands on: the submission, the report and every model's prediction tables (the JSON
    sidecars hold the root's own paths and times, so they are left out)."""
    files = [root / "test_out.csv", root / "report.csv", *sorted((root / "predictions").rglob("*.parquet"))]
    return {str(path.relative_to(root)): path.read_bytes() for path in files}


def test_two_runs_of_one_command_write_the_same_bytes(tmp_path):
    run_demo(tmp_path / "first", hash_seed=1)
    run_demo(tmp_path / "second", hash_seed=2)
    first, second = outputs(tmp_path / "first"), outputs(tmp_path / "second")
    assert sorted(first) == sorted(second)
    assert any(name.startswith("predictions/ensemble/") for name in first), sorted(first)
    differ = [name for name in first if first[name] != second[name]]
    assert differ == [], f"these outputs differ between two identical runs: {differ}"
