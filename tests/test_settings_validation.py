"""Settings are checked before any work: a bad value, an unknown stage or a missing GPU stops the run
before the root's state is read or written, and before torch is imported."""
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline
from core.config import ConfigError
from core.errors import PipelineError
from core.io import write_json

ROOT = Path(__file__).resolve().parents[1]


def trained_looking_root(root: Path) -> bytes:
    """A root whose state says every stage finished; returns the state file's bytes."""
    write_json(root / "pipeline_state.json", {"prepare": {"fingerprint": "abc", "complete": True, "seconds": 1.0},
                                              "heads": {"fingerprint": "def", "complete": True, "seconds": 2.0},
                                              "run_with": {"profile": "tiny", "overrides": []}})
    return (root / "pipeline_state.json").read_bytes()


@pytest.mark.parametrize("token, named", [("qwen.lr=-1", "qwen.lr"), ("folds=1", "folds"),
                                          ("heads.mlp_bins=1", "heads.mlp_bins"), ("stages=bogus", "stages=bogus")])
def test_a_refused_run_names_the_key_and_leaves_the_root_as_it_was(token, named, tmp_path):
    state = trained_looking_root(tmp_path)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        pipeline.main(["profile=tiny", f"root={tmp_path}", token])
    assert (tmp_path / "pipeline_state.json").read_bytes() == state
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline_state.json"]  # no lock taken, nothing written


def test_a_repeated_pipeline_key_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="profile= is given more than once"):
        pipeline.main(["profile=tiny", f"root={tmp_path}", "profile=default"])


def test_an_unknown_stage_is_refused_before_torch_is_imported(tmp_path):
    code = ("import sys, pipeline\n"
            "from core.config import ConfigError\n"
            "try:\n"
            f"    pipeline.main(['profile=tiny', 'root={tmp_path}', 'stages=bogus'])\n"
            "except ConfigError as exc:\n"
            "    assert 'bogus' in str(exc), exc\n"
            "else:\n"
            "    raise SystemExit('stages=bogus was accepted')\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    result = subprocess.run([sys.executable, "-m", "pipeline", "profile=tiny", f"root={tmp_path}", "qwen.lr=-1"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "qwen.lr=-1.0: must be > 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_default_profile_without_cuda_stops_before_the_state_exists(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)  # the default profile's root is checkpoints/ under the working folder
    with pytest.raises(PipelineError, match="device=cpu") as err:
        pipeline.main([])
    assert "no CUDA device" in str(err.value)
    assert not (tmp_path / "checkpoints" / "pipeline_state.json").exists()
    assert not (tmp_path / "checkpoints").exists()


def test_stages_not_on_cuda_need_no_gpu(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for profile, overrides in (("tiny", []), ("small", []), ("default", ["device=cpu"])):
        cfgs = pipeline.stage_configs(profile, overrides, tmp_path)
        stages = pipeline.build_stages(cfgs, tmp_path, profile)
        assert pipeline.cuda_groups(stages, cfgs, None) == [], profile
        pipeline.check_devices(stages, cfgs, None)
    # the default profile asks every encoder and fusion model for CUDA; stages= limits the check to those it runs
    cfgs = pipeline.stage_configs("default", [], tmp_path)
    stages = pipeline.build_stages(cfgs, tmp_path, "default")
    assert {"clip", "qwen", "siglip", "qwen_clip", "all_embeddings"} <= set(pipeline.cuda_groups(stages, cfgs, None))
    assert pipeline.cuda_groups(stages, cfgs, ["prepare", "heads", "ensemble"]) == []
    # the prediction stage runs both fusion models: either one on CUDA needs the GPU
    cfgs = pipeline.stage_configs("tiny", ["qwen_clip.device=cuda"], tmp_path)
    stages = pipeline.build_stages(cfgs, tmp_path, "tiny")
    assert pipeline.cuda_groups(stages, cfgs, ["predict"]) == ["qwen_clip"]
    with pytest.raises(PipelineError, match="device=cpu"):
        pipeline.check_devices(stages, cfgs, ["predict"])
