"""Real sizes ask for a GPU: no CUDA device is one clear error, never days on the CPU."""
import pytest
import torch

from clip_finetune.config import PROFILES as CLIP, ClipConfig
from core.errors import PipelineError, run_cli
from core.runtime import pick_device
from qwen3_finetune.config import PROFILES as QWEN, QwenConfig
from siglip_extract.config import PROFILES as SIGLIP, SiglipConfig


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")


def test_cuda_without_a_gpu_is_one_message_with_the_build_and_the_cpu_setting(no_cuda):
    with pytest.raises(PipelineError) as err:
        pick_device("cuda")
    message = str(err.value)
    assert "no CUDA device found" in message
    assert "CUDA 13.0" in message  # what this torch was built for: the driver must support it
    assert "device=cpu" in message and "\n" not in message


def test_auto_and_cpu_still_run_on_the_cpu(no_cuda):
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")


def test_a_gpu_index_that_is_not_there_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(PipelineError, match="only 1 CUDA device"):
        pick_device("cuda:3")
    with pytest.raises(PipelineError, match="not a device"):
        pick_device("gpu")


def test_real_sizes_ask_for_cuda_and_the_small_profiles_take_what_there_is():
    for cls, profiles in ((ClipConfig, CLIP), (QwenConfig, QWEN), (SiglipConfig, SIGLIP)):
        assert cls().device == profiles["default"].device == "cuda", cls.__name__
        assert profiles["tiny"].device == profiles["small"].device == "auto", cls.__name__


def test_a_stage_on_the_default_profile_stops_before_any_work(no_cuda, tmp_path, capsys):
    from siglip_extract import extract

    missing = tmp_path / "no_tables_here"  # reading them would be a different error
    with pytest.raises(SystemExit) as exit_:
        run_cli(extract.main, SiglipConfig(data_dir=missing, embeddings_dir=tmp_path / "embeddings"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device=cuda: no CUDA device found") and err.count("\n") == 1
    assert not (tmp_path / "embeddings").exists()
