"""`python -m bench.gpu_check --smoke`: the GPU check's code, run on the CPU with tiny models."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["clip_tensors", "clip_jpeg", "siglip_tensors", "siglip_jpeg", "qwen_train_none", "qwen_extract_none",
        "qwen_train_4bit", "qwen_extract_4bit", "fusion_epoch"]


def test_smoke_run_prints_and_writes_every_row(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PRICE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", f"out={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads(out.read_text())
    assert table["smoke"] and table["device"].startswith("cpu") and table["torch"]
    assert [row["key"] for row in table["rows"]] == ROWS
    for row in table["rows"]:
        assert row["error"] is None, (row["key"], row["error"])
        assert row["rate"] > 0 and row["seconds"] > 0, row
        assert row["peak_gib"] is None  # no GPU memory on the CPU
    by_key = {row["key"]: row for row in table["rows"]}
    assert by_key["qwen_train_none"]["unit"] == "tokens/s" and by_key["qwen_train_none"]["mfu"] is None
    assert by_key["qwen_extract_4bit"]["unit"] == "rows/s"
    assert by_key["fusion_epoch"]["seconds_per_epoch"] > 0
    # the final table repeats every row after the header
    final = done.stdout.split("GPU check:")[1]
    for row in table["rows"]:
        assert row["what"] in final


def test_a_failing_row_shows_its_error_and_the_next_row_still_runs(capsys):
    from bench.gpu_check import run_row

    def fails():
        raise ImportError("No module named 'bitsandbytes'")

    table = {"rows": []}
    cpu = torch.device("cpu")
    failed = run_row(table, "qwen_train_4bit", "4-bit QLoRA train", fails, cpu)
    passed = run_row(table, "fusion_epoch", "fusion epoch", lambda: {"rate": 5.0, "unit": "rows/s"}, cpu)
    assert failed["error"] == "ImportError: No module named 'bitsandbytes'" and failed["rate"] is None
    assert passed["error"] is None and passed["rate"] == 5.0
    late = run_row(table, "qwen_extract_4bit", "qwen_extract", lambda: {"rate": 1.0, "unit": "rows/s"}, cpu,
                   deadline=0.0)
    assert late["error"].startswith("TimeoutError: skipped") and late["rate"] is None
    assert [row["key"] for row in table["rows"]] == ["qwen_train_4bit", "fusion_epoch", "qwen_extract_4bit"]
    printed = capsys.readouterr().out.splitlines()
    assert "error: ImportError: No module named 'bitsandbytes'" in printed[0] and "5.0 rows/s" in printed[1]


def test_the_full_size_check_refuses_to_run_on_the_cpu():
    from bench import gpu_check
    from core.errors import PipelineError

    assert gpu_check.parse(["--smoke"]).smoke and gpu_check.parse(["--smoke"]).device == "cpu"
    with pytest.raises(PipelineError, match="needs a CUDA device"):
        gpu_check.main(gpu_check.parse(["device=cpu"]))
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="no CUDA device found"):
            gpu_check.main(gpu_check.parse([]))


def test_mfu_peak_is_chosen_by_device_name():
    from bench.gpu_check import peak_bf16_flops

    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("Tesla T4") is None


def test_extraction_rows_have_catalog_like_lengths():
    import numpy as np

    from bench.gpu_check import catalog_token_lengths

    lengths = catalog_token_lengths(20_000, 512)
    assert lengths.min() >= 8 and lengths.max() == 512
    assert 140 < np.median(lengths) < 180 and 0.08 < (lengths == 512).mean() < 0.16
