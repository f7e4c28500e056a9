"""The whole pipeline on a catalog smaller than the demo: every stage, the final table, skipping."""
from pathlib import Path

import pandas as pd
import pytest

import pipeline
from core.config import ConfigError
from core.io import read_json
from core.submission import check_submission

SMALL = ["synthetic.n_train=700", "synthetic.n_test=200", "clip.epochs=6",
         "all_embeddings.epochs=40", "qwen_clip.epochs=40"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    timings = pipeline.main(["profile=tiny", f"root={root}", *SMALL])
    return root, timings


def test_every_stage_runs_and_fusion_beats_the_constant_baseline_on_test_labels(demo_run):
    root, timings = demo_run
    assert list(timings) == ["synthetic", "prepare", "tiny_models", "siglip", "clip_train", "clip_extract", "qwen_train",
                             "qwen_extract", "qwen_predict", "fusion_qwen_clip", "fusion_all", "evaluate", "predict", "report"]
    table = pd.read_csv(root / "report.csv").set_index("model")
    baseline = table.loc["constant median (baseline)", "test_smape"]
    # 700 training rows and a few epochs: the margin is stated loosely (30% below the baseline)
    assert table.loc["fusion all_embeddings", "test_smape"] < 0.7 * baseline, table
    assert table.loc["fusion qwen_clip", "test_smape"] < 0.7 * baseline, table
    assert check_submission(root / "test_out.csv", root / "raw" / "test.csv") == []
    for name in ("CLIP head (image only)", "Qwen head (text only)", "fusion qwen_clip", "fusion all_embeddings"):
        assert Path(table.loc[name, "output"]).exists()


def test_rerun_skips_complete_stages_and_reruns_a_changed_one(demo_run):
    root, _ = demo_run
    assert list(pipeline.main(["profile=tiny", f"root={root}", *SMALL])) == ["report"]
    timings = pipeline.main(["profile=tiny", f"root={root}", *SMALL, "qwen_clip.lr=5e-4"])
    assert list(timings) == ["fusion_qwen_clip", "evaluate", "predict", "report"]
    assert read_json(root / "fusion" / "qwen_clip" / "config.json")["lr"] == 5e-4


def test_overrides_are_checked_and_routed(tmp_path):
    cfgs = pipeline.stage_configs("tiny", ["device=cpu", "clip.epochs=2"], tmp_path)
    assert cfgs["clip"].epochs == 2 and cfgs["qwen"].epochs != 2
    assert cfgs["clip"].device == cfgs["qwen"].device == cfgs["all_embeddings"].device == "cpu"
    assert cfgs["all_embeddings"].embeddings_dir == tmp_path / "embeddings"
    with pytest.raises(ConfigError, match="unknown key"):
        pipeline.stage_configs("tiny", ["nonsense=1"])
    with pytest.raises(ConfigError, match="no stage group"):
        pipeline.stage_configs("tiny", ["nope.epochs=1"])
    with pytest.raises(ConfigError, match="unknown stage"):
        pipeline.main(["profile=tiny", f"root={tmp_path}", "stages=fly"])
