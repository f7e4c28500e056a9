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
    if module == "pipeline" and any(a.startswith("score=") for a in args):
        import score
        return score.parse_cli(args)
    if module == "pipeline":
        profile = next((a.split("=", 1)[1] for a in args if a.startswith("profile=")), "default")
        profile = "small" if profile == "P" else profile  # the README's placeholder for any profile
        root = next((Path(a.split("=", 1)[1]) for a in args if a.startswith("root=")), None)
        rest = [a for a in args if not a.startswith(("profile=", "stages=", "root="))]
        return pipeline.stage_configs(profile, rest, root)
    if module in ("heads.train", "heads.predict"):
        from heads.config import PROFILES as HEADS, HeadsConfig
        return parse_args(HeadsConfig, args, HEADS)
    if module == "ensemble.blend":
        from ensemble.config import PROFILES as ENSEMBLE, EnsembleConfig
        return parse_args(EnsembleConfig, args, ENSEMBLE)
    if module == "bench.real_data":
        own = [a for a in args if a.split("=", 1)[0] in ("train", "root", "test_rows", "download_images")]
        return pipeline.stage_configs("small", [a for a in args if a not in own])
    if module == "bench.fusion_small":
        from bench import fusion_small
        return fusion_small.parse(args)
    if module == "bench.score":
        import score
        from bench import score as bench_score, split_options
        _, rest = split_options(args, bench_score.DEFAULTS)
        return score.placement_overrides(rest) is not None
    if module == "bench.scale":  # its own options, then the stages' keys
        from bench import scale, split_options
        opts, rest = split_options(args, scale.DEFAULTS)
        return pipeline.stage_configs(opts["profile"], rest)
    if module == "bench.heads_workers":  # its own options, then heads keys
        from bench import split_options
        from heads.config import PROFILES as HEADS, HeadsConfig
        _, rest = split_options(args, importlib.import_module(module).DEFAULTS)
        return parse_args(HeadsConfig, rest, HEADS)
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
                   "fusion.train", "fusion.evaluate_by_groups", "fusion.predict_test", "fusion.compare",
                   "heads.train", "ensemble.blend", "bench.real_data"):
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


def test_the_defaults_the_readme_states_are_the_configs_defaults():
    """Each phrase below is in the README and states a default; the config must hold that value."""
    from clip_finetune.config import ClipConfig
    from data.config import SYNTHETIC_PROFILES
    from fusion.all_embeddings.config import CONFIG as ALL
    from heads.config import HeadsConfig
    from qwen3_finetune.config import QwenConfig

    clip, qwen, heads, demo = ClipConfig(), QwenConfig(), HeadsConfig(), SYNTHETIC_PROFILES["tiny"]
    stated = {
        "(2,000 train / 500 test rows)": (demo.n_train, demo.n_test) == (2000, 500),
        "backbone lr 1e-5 vs\nhead lr 1e-3": (clip.lr_backbone, clip.lr_head) == (1e-5, 1e-3),
        "first 12 of 24 blocks frozen": clip.freeze_blocks == 12,
        "early stopping, patience 3": clip.early_stopping_patience == 3,
        "seeded 10% slice": clip.selection_fraction == qwen.selection_fraction == ALL.selection_fraction == 0.1,
        "LoRA r=16, alpha 32": (qwen.lora_r, qwen.lora_alpha) == (16, 32),
        "up to 512 tokens": qwen.max_length == 512,
        "AdamW lr 2e-4 (head 1e-3)": (qwen.lr, qwen.head_lr) == (2e-4, 1e-3),
        "AdamW lr 1e-3, batch 256": (ALL.lr, ALL.batch_size) == (1e-3, 256),
        "early stopping (patience 30)": ALL.early_stopping_patience == 30,
        "mixture of 3 experts (2048 -> 1024 -> 512 -> 256 -> 1)": (ALL.n_experts, ALL.expert_dims) == (3, [1024, 512, 256]),
        "of the 10 nearest rows": heads.knn_k == 10,
        "of the 20 nearest rows": heads.neighbour_k == 20,
        "a 128-d SVD of the TF-IDF and a 64-d SVD": (heads.tfidf_svd_dims, heads.embedding_svd_dims) == (128, 64),
        "LightGBM (L1 on log price": heads.lgbm_objective == "l1",
    }
    flat = " ".join(README.split())
    for phrase, holds in stated.items():
        assert " ".join(phrase.split()) in flat, f"the README no longer says {phrase!r}"
        assert holds, f"the README says {phrase!r}, the config says otherwise"
