"""Fingerprints follow the rows and the fields a stage reads, not file times or where the root lies."""
import os
import shutil
from pathlib import Path

import pandas as pd

import pipeline
from core.fingerprints import (file_digest, installed_versions, portable, stage_print, version_changes,
                               version_differences)
from core.io import write_json

TRAINING = {"tiny_models", "clip_train", "qwen_train", "fusion_qwen_clip", "fusion_all"}


def write_raw(raw: Path, train_rows: int = 6, test_rows: int = 4) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    text = lambda i: f"Item Name: thing {i}\nValue: {i}.0\nUnit: Ounce"
    pd.DataFrame({"sample_id": range(train_rows), "catalog_content": [text(i) for i in range(train_rows)],
                  "image_link": "", "price": [float(i + 1) for i in range(train_rows)]}).to_csv(raw / "train.csv", index=False)
    pd.DataFrame({"sample_id": range(100, 100 + test_rows), "catalog_content": [text(i) for i in range(test_rows)],
                  "image_link": ""}).to_csv(raw / "test.csv", index=False)


def keys(root: Path, *overrides: str) -> dict[str, str]:
    cfgs = pipeline.stage_configs("tiny", list(overrides), root)
    return pipeline.stage_keys(pipeline.build_stages(cfgs, root, "tiny"), cfgs, root)


def changed(before: dict, after: dict) -> set:
    return {name for name in before if before[name] != after[name]}


def test_file_digest_follows_the_bytes_not_the_file_times(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_bytes(b"sample_id,price\n1,2.5\n" * 100_000)  # several read blocks
    shutil.copy(a, b)
    os.utime(b, (1, 1))
    assert file_digest(a) == file_digest(b)
    b.write_bytes(a.read_bytes().replace(b"2.5", b"2.6", 1))
    assert file_digest(a) != file_digest(b)
    assert file_digest(tmp_path / "missing.csv") is None


def test_paths_under_the_root_count_relative_to_it(tmp_path):
    root = tmp_path / "run"
    settings = {"data_dir": root / "data", "model": str(root / "models" / "clip"), "raw_dir": "/elsewhere/raw",
                "hub": "Qwen/Qwen3-Embedding-0.6B", "device": "cpu", "sources": [str(root / "emb"), "qwen_text"]}
    assert portable(settings, root) == {"data_dir": "<root>/data", "model": "<root>/models/clip",
                                        "raw_dir": "/elsewhere/raw", "hub": "Qwen/Qwen3-Embedding-0.6B",
                                        "device": "cpu", "sources": ["<root>/emb", "qwen_text"]}
    assert portable(settings, root) == portable({**settings, "data_dir": tmp_path / "copy" / "data",
                                                 "model": str(tmp_path / "copy" / "models" / "clip"),
                                                 "sources": [str(tmp_path / "copy" / "emb"), "qwen_text"]},
                                                tmp_path / "copy")


def test_test_inputs_change_only_the_full_print():
    prepare = stage_print("prepare", {"seed": 1}, [], "train-digest", "test-digest")
    new_test = stage_print("prepare", {"seed": 1}, [], "train-digest", "other-test-digest")
    assert prepare.train == new_test.train and prepare.full != new_test.full
    trainer, trainer_new = (stage_print("fit", {"lr": 1}, [p]) for p in (prepare, new_test))
    assert trainer.train == trainer_new.train and trainer.full != trainer_new.full


def test_which_stages_a_new_test_file_a_touch_a_copy_or_a_train_row_reruns(tmp_path):
    root = tmp_path / "run"
    write_raw(root / "raw")
    before = keys(root)
    train_csv = root / "raw" / "train.csv"
    os.utime(train_csv, (1, 1))
    shutil.copy(train_csv, tmp_path / "copy.csv")
    shutil.copy(tmp_path / "copy.csv", train_csv)
    assert keys(root) == before  # touched and copied over itself: the same rows

    test = pd.read_csv(root / "raw" / "test.csv")
    test.loc[0, "catalog_content"] += " (new)"
    test.to_csv(root / "raw" / "test.csv", index=False)
    after_test = keys(root)
    assert changed(before, after_test) == set(before) - TRAINING - {"synthetic"}

    train = pd.read_csv(train_csv)
    train.loc[2, "price"] = 99.0
    train.to_csv(train_csv, index=False)
    assert changed(after_test, keys(root)) == set(before) - {"synthetic"}

    # the whole root copied elsewhere: the same keys
    shutil.copytree(root, tmp_path / "copy")
    assert keys(tmp_path / "copy") == keys(root)


def test_a_frozen_encoder_extraction_ignores_training_fields(tmp_path):
    write_raw(tmp_path / "raw")
    frozen = keys(tmp_path, "qwen.finetune=false", "clip.use_finetuned=false")
    retuned = keys(tmp_path, "qwen.finetune=false", "clip.use_finetuned=false", "qwen.lora_dropout=0.3",
                   "qwen.epochs=9", "clip.lr_head=0.5", "clip.wise_alpha=0.5")
    assert changed(frozen, retuned) == {"qwen_train", "clip_train"}
    assert changed(frozen, keys(tmp_path, "qwen.finetune=false", "clip.use_finetuned=false",
                                "qwen.max_length=64")) >= {"qwen_extract", "heads", "fusion_all"}
    # fine-tuned: the same training field reruns the extraction and what reads it
    tuned = keys(tmp_path)
    assert {"qwen_train", "qwen_extract", "qwen_predict", "fusion_all"} <= changed(
        tuned, keys(tmp_path, "qwen.lora_dropout=0.3"))


def test_version_differences_name_each_changed_package(tmp_path):
    installed = installed_versions()
    assert set(installed) >= {"python", "torch", "numpy", "pandas", "scikit-learn", "transformers", "peft",
                              "open_clip_torch", "lightgbm"}
    assert installed["numpy"] == __import__("numpy").__version__
    assert version_differences(installed) == {}
    assert version_differences({**installed, "numpy": "0.0.1"}) == {"numpy": ("0.0.1", installed["numpy"])}
    assert version_changes(tmp_path) == {}  # nothing recorded
    write_json(tmp_path / "pipeline_state.json", {"trained_with": {"profile": "tiny",
                                                                   "versions": {**installed, "torch": "1.0"}}})
    assert version_changes(tmp_path) == {"torch": ("1.0", installed["torch"])}
