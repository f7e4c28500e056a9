"""The whole pipeline on a catalog smaller than the demo: every stage, the final table, skipping."""
import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pipeline
from core.config import ConfigError
from core.fingerprints import installed_versions, version_changes
from core.io import read_json, write_json
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
                             "qwen_extract", "qwen_predict", "heads", "fusion_qwen_clip", "fusion_all", "evaluate",
                             "predict", "ensemble", "report"]
    table = pd.read_csv(root / "report.csv").set_index("model")
    baseline = table.loc["constant median (baseline)", "test_smape"]
    # 700 training rows and a few epochs: the margin is stated loosely (30% below the baseline)
    assert table.loc["all_embeddings", "test_smape"] < 0.7 * baseline, table
    assert table.loc["qwen_clip", "test_smape"] < 0.7 * baseline, table
    assert table.loc["ensemble", "test_smape"] < 0.6 * baseline, table
    assert set(table.index) >= {"clip_head", "text_head", "ridge", "knn", "lgbm", "qwen_clip", "all_embeddings", "ensemble"}
    # what each figure is: a head on text alone is out of fold on every row; one that reads a fine-tuned
    # encoder's vectors is scored only on the fold that encoder never saw (140 of 700 rows)
    assert table.loc["knn", "figure"] == "out_of_fold" and table.loc["knn", "rows"] == 700
    assert table.loc["lgbm", "figure"] == "out_of_fold, fold 0 only" and table.loc["lgbm", "rows"] == 140
    assert table.loc["text_head", "figure"] == "holdout, fold 0 only"
    assert check_submission(root / "test_out.csv", root / "raw" / "test.csv") == []


def test_the_image_source_carries_signal_the_text_lacks(demo_run, tmp_path):
    """The demo's images hold price factors (colour, shape, a premium frame) that the text never states:
    the two-source fusion model must beat the same model on the text vectors alone."""
    import dataclasses

    from fusion import train as fusion_train

    root, _ = demo_run  # runs before the tests that change the demo's settings
    cfg = dataclasses.replace(pipeline.stage_configs("tiny", SMALL, root)["qwen_clip"], out_dir=tmp_path,
                              predictions_dir=tmp_path / "predictions")
    both = fusion_train.main(dataclasses.replace(cfg, run_name="both"))["val_smape_mean"]
    text_only = fusion_train.main(dataclasses.replace(cfg, run_name="text", sources=["qwen_text"]))["val_smape_mean"]
    assert both < text_only - 2, (both, text_only)

def test_rerun_skips_complete_stages_and_reruns_a_changed_one(demo_run):
    root, _ = demo_run
    assert list(pipeline.main(["profile=tiny", f"root={root}", *SMALL])) == ["report"]
    timings = pipeline.main(["profile=tiny", f"root={root}", *SMALL, "qwen_clip.lr=5e-4"])
    assert list(timings) == ["fusion_qwen_clip", "evaluate", "predict", "ensemble", "report"]
    assert read_json(root / "fusion" / "qwen_clip" / "config.json")["lr"] == 5e-4


def test_placement_and_extraction_fields_never_retrain_an_encoder(demo_run):
    root, _ = demo_run
    pipeline.main(["profile=tiny", f"root={root}", *SMALL])  # settle whatever an earlier test changed
    # where it runs and how much inference holds at once: nothing reruns
    assert list(pipeline.main(["profile=tiny", f"root={root}", *SMALL, "device=cpu", "clip.extract_batch_size=64",
                               "qwen.eval_batch_size=16", "chunk_size=256"])) == ["report"]
    # an extraction-only field reruns that extraction and what reads it, never the fine-tune
    timings = pipeline.main(["profile=tiny", f"root={root}", *SMALL, "clip.wise_alpha=0.5"])
    assert "clip_train" not in timings and "qwen_train" not in timings
    assert list(timings)[0] == "clip_extract" and "fusion_all" in timings
    timings = pipeline.main(["profile=tiny", f"root={root}", *SMALL, "clip.wise_alpha=0.5", "qwen.storage_dtype=float32"])
    assert list(timings)[0] == "qwen_extract" and "qwen_train" not in timings


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


def test_a_catalog_without_one_usable_image_completes(tmp_path, capsys):
    """Every image link broken: the image stages step aside in one line each, nothing invents image
    vectors, fusion and the heads use the text, and the submission is written and checked."""
    root = tmp_path / "noimg"
    pipeline.main(["profile=tiny", f"root={root}", "synthetic.n_train=300", "synthetic.n_test=60",
                   "synthetic.missing_image_rate=1.0", "all_embeddings.epochs=5", "qwen_clip.epochs=5", "qwen.epochs=2"])
    out = capsys.readouterr().out
    from core.embedding_cache import skipped_reason

    for source in ("clip_image", "siglip_image"):
        assert skipped_reason(root / "embeddings", source)
    assert skipped_reason(root / "embeddings", "siglip_text") is None
    assert check_submission(root / "test_out.csv", root / "raw" / "test.csv") == []
    table = pd.read_csv(root / "report.csv").set_index("model")
    assert "clip_head" not in table.index and "all_embeddings" in table.index
    # the text sources, and the heads' target encodings for the scored fold (fusion's fold source)
    assert read_json(root / "predictions" / "all_embeddings" / "meta.json")["sources"] == [
        "siglip_text", "qwen_text", "text_target_encoding_fold0"]



# ---------------------------------------------------------------- a trained root: content prints, copies, versions
# These build on the demo run above (they come last: the tests above change its settings and this settles them).

@pytest.fixture(scope="module")
def copied_run(demo_run, tmp_path_factory):
    """(the demo root, a copy of it made with cp -r after the demo settled)."""
    root, _ = demo_run
    pipeline.main(["profile=tiny", f"root={root}", *SMALL])
    copy = tmp_path_factory.mktemp("copied") / "run"
    shutil.copytree(root, copy)
    return root, copy


@contextlib.contextmanager
def moved_away(path: Path):
    """The folder is not where it was while the block runs: whatever reads it fails."""
    away = path.with_name(path.name + "_away")
    path.rename(away)
    try:
        yield
    finally:
        away.rename(path)


def train_vectors(root: Path) -> dict:
    from core.embedding_cache import load_embeddings
    from core.tables import load_table

    ids = load_table(root / "data", "train")["sample_id"]
    return {s: load_embeddings(root / "embeddings", s, "train", ids).values
            for s in ("siglip_text", "clip_image", "qwen_text", "text_tabular")}


def test_a_copied_root_is_up_to_date_and_reads_nothing_of_the_original(copied_run):
    root, copy = copied_run
    with moved_away(root):
        assert list(pipeline.main(["profile=tiny", f"root={copy}", *SMALL])) == ["report"]
    assert (copy / "test_out.csv").read_bytes() == (root / "test_out.csv").read_bytes()
    assert read_json(copy / "pipeline_state.json")["trained_with"] == {"profile": "tiny", "versions": installed_versions()}


def test_a_touched_or_copied_train_file_reruns_nothing(copied_run):
    _, copy = copied_run
    train_csv = copy / "raw" / "train.csv"
    os.utime(train_csv, (1, 1))
    assert list(pipeline.main(["profile=tiny", f"root={copy}", *SMALL])) == ["report"]
    shutil.copy(train_csv, copy / "train_backup.csv")
    shutil.copy(copy / "train_backup.csv", train_csv)  # the same rows, a new file time
    assert list(pipeline.main(["profile=tiny", f"root={copy}", *SMALL])) == ["report"]


def test_a_new_test_file_reruns_what_reads_test_rows_and_no_training(copied_run):
    """The training stages are kept, and stay valid: the extractions rerun on the same train rows and
    give back the same train vectors, and the kept fusion runs predict the new test rows."""
    root, copy = copied_run
    before = train_vectors(copy)
    test_csv = copy / "raw" / "test.csv"
    test = pd.read_csv(test_csv, dtype={"sample_id": str})
    changed_ids = test["sample_id"].iloc[:20]
    test.loc[:19, "catalog_content"] = test.loc[:19, "catalog_content"].str.replace("Value: ", "Value: 1", n=1)
    test.to_csv(test_csv, index=False)
    with moved_away(root):
        timings = pipeline.main(["profile=tiny", f"root={copy}", *SMALL])
    assert list(timings) == ["prepare", "siglip", "clip_extract", "qwen_extract", "qwen_predict", "heads", "evaluate",
                             "predict", "ensemble", "report"]
    after = train_vectors(copy)
    for source in before:
        assert np.array_equal(before[source], after[source]), source
    assert check_submission(copy / "test_out.csv", test_csv) == []
    for model in ("ridge", "all_embeddings"):  # the new rows were predicted, by the kept runs too
        old, new = (pd.read_parquet(r / "predictions" / model / "test.parquet").set_index("sample_id")["log_pred"]
                    for r in (root, copy))
        assert (old.loc[changed_ids] != new.loc[changed_ids]).mean() > 0.5, model
    assert list(pipeline.main(["profile=tiny", f"root={copy}", *SMALL])) == ["report"]


def test_other_package_versions_are_reported_in_one_line(copied_run, capsys):
    _, copy = copied_run
    state = read_json(copy / "pipeline_state.json")
    recorded = state["trained_with"]["versions"]
    state["trained_with"]["versions"] = {**recorded, "numpy": "0.0.1"}
    write_json(copy / "pipeline_state.json", state)
    try:
        assert version_changes(copy) == {"numpy": ("0.0.1", recorded["numpy"])}
        capsys.readouterr()
        assert list(pipeline.main(["profile=tiny", f"root={copy}", *SMALL])) == ["report"]
        warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
        assert len(warnings) == 1 and f"numpy 0.0.1 -> {recorded['numpy']}" in warnings[0]
    finally:
        state["trained_with"]["versions"] = recorded
        write_json(copy / "pipeline_state.json", state)


def test_a_stage_whose_outputs_are_gone_reruns_and_writes_them_again(copied_run, capsys):
    """data/ deleted from a finished root: prepare reruns (the run does not skip ahead and fail on the
    missing tables) and writes the same tables; with the ensemble's files gone too, the submission is
    written again, byte for byte the same."""
    root, _ = copied_run
    submission = (root / "test_out.csv").read_bytes()
    tables = {name: (root / "data" / name).read_bytes() for name in ("train.parquet", "test.parquet")}
    assert "<root>/data/train.parquet" in read_json(root / "pipeline_state.json")["prepare"]["outputs"]
    shutil.rmtree(root / "data")
    shutil.rmtree(root / "predictions" / "ensemble")
    (root / "test_out.csv").unlink()
    capsys.readouterr()
    assert list(pipeline.main(["profile=tiny", f"root={root}", *SMALL])) == ["prepare", "ensemble", "report"]
    out = capsys.readouterr().out
    assert ("[pipeline] prepare: 3 of the files it wrote are gone or changed (<root>/data/prepare.json, "
            "<root>/data/test.parquet, <root>/data/train.parquet)") in out
    assert "[pipeline] ensemble: 5 of the files it wrote are gone or changed" in out
    assert {name: (root / "data" / name).read_bytes() for name in tables} == tables
    assert (root / "test_out.csv").read_bytes() == submission
    assert list(pipeline.main(["profile=tiny", f"root={root}", *SMALL])) == ["report"]


def test_the_report_shows_a_fusion_model_expert_load(copied_run):
    _, copy = copied_run
    meta_path = copy / "predictions" / "all_embeddings" / "meta.json"
    write_json(meta_path, {**read_json(meta_path), "expert_load": [0.312, 0.349, 0.339]})
    pipeline.main(["profile=tiny", f"root={copy}", *SMALL, "stages=report"])
    table = pd.read_csv(copy / "report.csv", keep_default_na=False).set_index("model")
    assert table.loc["all_embeddings", "expert_load"] == "0.31/0.35/0.34"
    assert table.loc["ridge", "expert_load"] == ""
