"""Every command the README shows is a real entry point whose arguments its config accepts.

The commands themselves run in the stage tests (with the tiny profile); here each README line is
parsed exactly as its script would parse it, so a renamed key or module breaks this test."""
import importlib
import re
import shlex
from pathlib import Path

import pytest

import pipeline
from core.config import parse_args

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        lines += [line.split("  #")[0].strip() for line in block.splitlines()]
    lines += re.findall(r"`((?:python -m|torchrun) [^`]+)`", README)
    return [line for line in lines if line.startswith(("python -m", "torchrun", "make"))]


def parse_command(module: str, args: list[str]):
    """Parse `args` the way `python -m module` does, without running the stage."""
    from clip_finetune.config import PROFILES as CLIP, ClipConfig
    from data.config import PREPARE_PROFILES, SYNTHETIC_PROFILES, PrepareConfig, SyntheticConfig
    from fusion import compare, train
    from qwen3_finetune.config import PROFILES as QWEN, QwenConfig
    from siglip_extract.config import PROFILES as SIGLIP, SiglipConfig

    if "--help" in args:
        return True
    stage = {"data.synthetic": (SyntheticConfig, SYNTHETIC_PROFILES), "data.prepare": (PrepareConfig, PREPARE_PROFILES),
             "siglip_extract.extract": (SiglipConfig, SIGLIP), "clip_finetune.train": (ClipConfig, CLIP),
             "clip_finetune.extract_embeddings": (ClipConfig, CLIP)}
    stage.update({f"qwen3_finetune.{m}": (QwenConfig, QWEN) for m in ("train", "evaluate", "predict", "extract_embeddings")})
    if module in stage:
        return parse_args(stage[module][0], args, stage[module][1])
    if module in ("fusion.train", "fusion.evaluate_by_groups", "fusion.all_embeddings.train"):
        return train.parse_cli(args)
    if module == "fusion.predict_test":
        return train.parse_cli([a for a in args if not a.startswith("output=")])
    if module == "fusion.compare":
        return compare.runs(args)
    if module == "data.check_submission":
        assert len(args) == 2
        return True
    if module == "pipeline":
        profile = next((a.split("=", 1)[1] for a in args if a.startswith("profile=")), "default")
        root = next((Path(a.split("=", 1)[1]) for a in args if a.startswith("root=")), None)
        rest = [a for a in args if not a.startswith(("profile=", "stages=", "root="))]
        return pipeline.stage_configs(profile, rest, root)
    if module.startswith("bench."):
        bench = importlib.import_module(module)
        cls = next(v for k, v in vars(bench).items() if k.endswith("Config") and isinstance(v, type))
        return parse_args(cls, args)
    raise AssertionError(f"README command for unknown module {module}")


COMMANDS = readme_commands()


def test_the_readme_shows_the_commands_of_every_stage():
    modules = {shlex.split(c)[2] if c.startswith("python") else shlex.split(c)[3] for c in COMMANDS if not c.startswith("make")}
    for needed in ("pipeline", "data.prepare", "data.synthetic", "data.check_submission", "siglip_extract.extract",
                   "clip_finetune.train", "clip_finetune.extract_embeddings", "qwen3_finetune.train",
                   "qwen3_finetune.evaluate", "qwen3_finetune.predict", "qwen3_finetune.extract_embeddings",
                   "fusion.train", "fusion.evaluate_by_groups", "fusion.predict_test", "fusion.compare"):
        assert needed in modules
    assert "make demo" in COMMANDS and "make test" in COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_each_readme_command_parses(command):
    words = shlex.split(command)
    if words[0] == "make":
        assert re.search(rf"^{words[1]}:", (ROOT / "Makefile").read_text(), re.M)
        return
    if words[0] == "torchrun":
        words = words[1:]
        assert words[0].startswith("--nproc_per_node=")
        words = ["python"] + words[1:]
    assert words[1] == "-m"
    module, args = words[2], words[3:]
    assert importlib.util.find_spec(module) is not None, module
    assert parse_command(module, args)
