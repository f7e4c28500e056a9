"""The one module that knows the stages: their settings' ranges and known names, and what a finished
stage wrote, checked before the next run trusts it."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.config import ConfigError, field_types
from core.stages import (CHOICES, CLIP_HEAD, FUSION_BLOCKS, LOSSES, RANGES, RIDGE_FEATURES, TARGET_ENCODING_FIELDS,
                         TEXT_HEAD, Range, Stage, build_stages, missing_outputs, output_record, rule_for, stage_configs)

ROOT = Path(__file__).resolve().parents[1]


def test_the_known_names_are_the_stage_code_s_own():
    from core import losses
    from fusion import blocks
    from clip_finetune import extract_embeddings as clip_extract
    from heads import features, target_encoding
    from qwen3_finetune import predict as qwen_predict

    assert set(LOSSES) == set(losses.LOSSES)
    assert set(FUSION_BLOCKS) == set(blocks.BLOCKS)
    assert set(RIDGE_FEATURES) == set(features.RIDGE_FEATURES)
    assert set(TARGET_ENCODING_FIELDS) == set(target_encoding.FIELDS)
    assert (CLIP_HEAD, TEXT_HEAD) == (clip_extract.HEAD_MODEL, qwen_predict.MODEL_NAME)


@pytest.mark.parametrize("profile", ["default", "small", "tiny"])
def test_every_profile_passes_its_own_checks_and_every_number_has_a_range(profile, tmp_path):
    cfgs = stage_configs(profile, [], tmp_path)  # validates
    unruled = [f"{group}.{name}" for group, cfg in cfgs.items() for name in field_types(type(cfg))
               if isinstance(getattr(cfg, name), (int, float)) and not isinstance(getattr(cfg, name), bool)
               and rule_for(RANGES, group, name) is None]
    assert unruled == [], "give each numeric setting a range in core.stages.RANGES"


@pytest.mark.parametrize("token, named", [
    ("qwen.lr=-1", "qwen.lr=-1.0: must be > 0"),
    ("folds=1", "all_embeddings.folds='1': must be one of holdout, all"),
    ("heads.mlp_bins=1", "heads.mlp_bins=1: must be >= 2"),
    ("prepare.n_folds=1", "prepare.n_folds=1: must be >= 2"),
    ("clip.epochs=0", "clip.epochs=0: must be >= 1"),
    ("qwen.lora_dropout=1.5", "qwen.lora_dropout=1.5: must be in [0, 1]"),
    ("selection_fraction=1", "qwen.selection_fraction=1.0: must be in (0, 1)"),
    ("all_embeddings.lr=nan", "all_embeddings.lr=nan: must be > 0"),
    ("clip.grad_clip=0", "clip.grad_clip=0.0: must be > 0"),
    ("qwen.loss=smapee", "qwen.loss='smapee': must be one of"),
    ("all_embeddings.block=transformer", "all_embeddings.block='transformer': must be one of concat_mlp"),
    ("heads.heads=ridge,lgbmm", "lgbmm unknown"),
    ("device=gpu", "qwen.device='gpu': must be auto, cpu, cuda or cuda:N"),
    ("prepare.holdout_fold=5", "prepare.holdout_fold=5: must be below prepare.n_folds=5"),
    ("heads.knn_space=nowhere", "heads.knn_space='nowhere'"),
    ("all_embeddings.router_top_k=1", "all_embeddings.router_top_k=1"),
])
def test_a_bad_setting_is_refused_by_its_key(token, named, tmp_path):
    with pytest.raises(ConfigError) as err:
        stage_configs("tiny", [token], tmp_path)
    assert named in str(err.value)


def test_several_bad_settings_are_listed_together_and_zero_is_allowed_where_it_means_something(tmp_path):
    with pytest.raises(ConfigError) as err:
        stage_configs("tiny", ["qwen.lr=-1", "heads.mlp_bins=1"], tmp_path)
    assert "qwen.lr" in str(err.value) and "heads.mlp_bins" in str(err.value)
    cfgs = stage_configs("tiny", ["all_embeddings.grad_clip=0", "embedding_svd_dims=0", "calibration_bins=0", "stack_share=0",
                                  "qwen.l1_warmup_epochs=0", "stack_min_gain=-0.5", "device=cuda:1"], tmp_path)
    assert cfgs["all_embeddings"].grad_clip == 0 and cfgs["ensemble"].stack_min_gain == -0.5


def test_ranges_say_what_they_hold():
    assert [Range(0, low_open=True).holds(v) for v in (-1, 0, 1e-9, float("inf"))] == [False, False, True, False]
    assert [Range(0, 1, True, True).holds(v) for v in (0, 0.5, 1)] == [False, True, False]
    assert (str(Range(0, low_open=True)), str(Range(2)), str(Range(0, 1, low_open=True))) == ("> 0", ">= 2", "in (0, 1]")
    assert set(CHOICES["folds"]) == {"holdout", "all"}


def test_listing_the_stages_and_checking_settings_imports_no_torch(tmp_path):
    code = ("import sys; from core.stages import stage_configs, build_stages; "
            f"cfgs = stage_configs('tiny', [], {str(tmp_path)!r}); "
            f"from pathlib import Path; stages = build_stages(cfgs, Path({str(tmp_path)!r}), 'tiny'); "
            "assert len(stages) == 16, stages; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'open_clip', 'sklearn', 'lightgbm') if m in sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_scoring_and_the_pipeline_stand_on_the_stage_module_without_importing_each_other():
    source = (ROOT / "pipeline.py").read_text()
    assert "\nimport score" not in source and "\nfrom score" not in source  # only main's lazy route to scoring
    assert "pipeline" not in {line.split()[1] for line in (ROOT / "core" / "stages.py").read_text().splitlines()
                              if line.startswith(("import ", "from "))}


def test_a_stage_records_the_files_it_wrote_and_a_gone_or_changed_one_is_found(tmp_path):
    root = tmp_path / "run"
    run_dir = root / "fusion" / "qwen_clip"
    for name, text in {"config.json": "{}", "fold_0/best.pt": "weights", "log.txt": "appended by every run",
                       "test_out.csv": "written by the prediction stage", "eval/by_price_bin.csv": "x"}.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(text)
    outside = tmp_path / "elsewhere.csv"
    outside.write_text("a,b\n")
    stage = Stage("fusion_qwen_clip", "qwen_clip", (), None, outputs=(run_dir, outside, root / "not_written"))
    record = output_record(stage, root)
    assert record == {"<root>/fusion/qwen_clip/config.json": 2, "<root>/fusion/qwen_clip/fold_0/best.pt": 7,
                      str(outside): 4}
    assert missing_outputs(record, root) == []
    (run_dir / "log.txt").write_text("longer now")  # not the stage's own: never checked
    (run_dir / "fold_0" / "best.pt").write_text("other weights")
    outside.unlink()
    assert missing_outputs(record, root) == ["<root>/fusion/qwen_clip/fold_0/best.pt", str(outside)]
    copy = tmp_path / "copy"  # a root copied elsewhere keeps its record
    (copy / "fusion" / "qwen_clip" / "fold_0").mkdir(parents=True)
    (copy / "fusion" / "qwen_clip" / "config.json").write_text("{}")
    assert missing_outputs(record, copy) == ["<root>/fusion/qwen_clip/fold_0/best.pt", str(outside)]


def test_every_stage_that_writes_files_declares_them_under_the_root(tmp_path):
    cfgs = stage_configs("tiny", [], tmp_path)
    stages = {s.name: s for s in build_stages(cfgs, tmp_path, "tiny")}
    without = {name for name, s in stages.items() if not s.outputs}
    assert without == {"evaluate", "report"}
    for stage in stages.values():
        assert all(Path(p).is_relative_to(tmp_path) for p in stage.outputs), stage.name
    assert tmp_path / "data" / "train.parquet" in stages["prepare"].outputs
    assert tmp_path / "test_out.csv" in stages["ensemble"].outputs


def test_the_report_baseline_takes_one_median_per_fold():
    from pipeline import other_folds_median

    rng = np.random.default_rng(0)
    train = pd.DataFrame({"price": rng.lognormal(2.6, 1.0, 500), "fold": rng.integers(0, 5, 500)})
    naive = [train.loc[train["fold"] != f, "price"].median() for f in train["fold"]]
    assert np.allclose(other_folds_median(train["price"], train["fold"]), naive, rtol=0, atol=0)
