"""`--help` on the pipeline and on every stage lists each key with its default and the comment
beside it in the stage's config.py."""
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from core.config import describe, field_comments, field_types

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Example:
    # a section heading, not a field's comment
    lr: float = 1e-3  # the peak learning rate
    #                   after the warmup
    epochs: int = 10
    # about the next field, above it
    dims: list[int] = field(default_factory=lambda: [8,  # a comment inside the default
                                                     16])
    name: str = "run#1"  # a hash inside a string is no comment


def test_the_comment_after_each_field_is_read_from_the_source():
    assert field_comments(Example) == {"lr": "the peak learning rate after the warmup",
                                       "dims": "a comment inside the default",
                                       "name": "a hash inside a string is no comment"}
    text = describe(Example, {"default": Example(lr=0.5)})
    assert "  lr = 0.5  # the peak learning rate after the warmup" in text.splitlines()
    assert "  epochs = 10" in text.splitlines()


def test_pipeline_help_lists_every_stage_key_with_its_default_and_comment():
    result = subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("  stages=  # ") for line in lines)
    assert "  lr = 0.0002  # LoRA adapters" in lines  # qwen's
    assert "  mlp_bins = 40" in lines and "  n_folds = 5  # folds for k-fold; every later stage reads this column " \
        "and nothing else to split" in lines
    tiny = subprocess.run([sys.executable, "-m", "pipeline", "profile=tiny", "--help"], cwd=ROOT, capture_output=True,
                          text=True)
    assert "  lr = 0.003  # LoRA adapters" in tiny.stdout.splitlines()  # the tiny profile's default


STAGE_MODULES = {  # module -> (its config class, a line its help must hold)
    "data.synthetic": ("data.config:SyntheticConfig", "  n_train = 3000"),
    "data.prepare": ("data.config:PrepareConfig", "  n_folds = 5  # folds for k-fold;"),
    "data.tiny_models": ("data.tiny_models:TinyModelsConfig", "  data_dir = checkpoints/demo/data  # texts the"),
    "siglip_extract.extract": ("siglip_extract.config:SiglipConfig", "  split = 'both'  # train | test | both"),
    "clip_finetune.train": ("clip_finetune.config:ClipConfig", "  lr_backbone = 1e-05  # far below the head's"),
    "clip_finetune.extract_embeddings": ("clip_finetune.config:ClipConfig", "  wise_alpha = 1.0  # WiSE-FT"),
    "qwen3_finetune.train": ("qwen3_finetune.config:QwenConfig", "  lr = 0.0002  # LoRA adapters"),
    "qwen3_finetune.extract_embeddings": ("qwen3_finetune.config:QwenConfig", "  pooling = 'last'  # last"),
    "qwen3_finetune.predict": ("qwen3_finetune.config:QwenConfig", "  max_length = 512  # tokens"),
    "qwen3_finetune.evaluate": ("qwen3_finetune.config:QwenConfig", "  grad_accum = 4  # optimizer step"),
    "heads.train": ("heads.config:HeadsConfig", "  mlp_learning_rate = 0.003  # the one-cycle peak"),
    "heads.predict": ("heads.config:HeadsConfig", "  knn_space = 'tfidf'  # tfidf"),
    "fusion.train": ("fusion.config:FusionConfig", "  architecture = 'hierarchical'  # hierarchical"),
    "fusion.qwen_clip.train": ("fusion.config:FusionConfig", "  architecture = 'block'  # hierarchical"),
    "fusion.all_embeddings.train": ("fusion.config:FusionConfig", "  n_experts = 3"),
    "fusion.evaluate_by_groups": ("fusion.config:FusionConfig", "  hidden_dim = 512  # branch output width"),
    "fusion.predict_test": ("fusion.config:FusionConfig", "  seed = 42"),
    "ensemble.blend": ("ensemble.config:EnsembleConfig", "  scale_steps = 81  # grid points"),
}


# each module run as `python -m MODULE --help`, all in one fresh interpreter (torch imported once)
HELP_RUNNER = """
import contextlib, io, json, runpy, sys
out = {}
for module in sys.argv[1:]:
    sys.argv = [module, "--help"]
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = "no exit"
    except SystemExit as exc:
        code = exc.code
    out[module] = [code, text.getvalue()]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def stage_helps():
    import json

    result = subprocess.run([sys.executable, "-c", HELP_RUNNER, *STAGE_MODULES], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PRICE_NO_PROGRESS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_every_stage_help_lists_its_keys_defaults_and_comments(module, stage_helps):
    import importlib

    target, expected = STAGE_MODULES[module]
    owner, _, name = target.partition(":")
    cls = getattr(importlib.import_module(owner), name)
    code, text = stage_helps[module]
    assert code in (0, None), (code, text)
    lines = text.splitlines()
    assert any(line.startswith(expected) for line in lines), text
    comments = field_comments(cls)
    for key in field_types(cls):
        line = next((line for line in lines if line.startswith(f"  {key} = ")), None)
        assert line is not None, key
        assert key not in comments or line.endswith(f"  # {comments[key]}"), line
