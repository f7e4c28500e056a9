"""The tiny models are the same in every process, so the demo and the tests repeat exactly."""
import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(folder: Path, data_dir: Path):
    code = ("from data.tiny_models import TinyModelsConfig, main; "
            f"main(TinyModelsConfig(out_dir=__import__('pathlib').Path({str(folder)!r}), "
            f"data_dir=__import__('pathlib').Path({str(data_dir)!r})))")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "tiny_models.json"}


def test_two_processes_build_identical_models_and_tokenizers(demo_catalog, tmp_path):
    a = build(tmp_path / "a", demo_catalog / "data")
    b = build(tmp_path / "b", demo_catalog / "data")
    assert "qwen3_tiny/tokenizer.json" in a and "siglip_tiny/open_clip_model.safetensors" in a
    assert a == b
