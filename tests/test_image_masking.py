"""Images that fail to decode: counted, logged with sample_ids and reasons, masked in every image
cache, and never used to train or choose a checkpoint for an image model."""
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from clip_finetune import train
from clip_finetune.config import PROFILES as CLIP_PROFILES
from core.embedding_cache import load_embeddings
from core.encode import DecodeFailures, describe_failures, encode_image_batches, find_undecodable, image_loader
from core.tables import encoder_rows, holdout_fold, load_table
from siglip_extract import extract
from siglip_extract.config import PROFILES as SIGLIP_PROFILES


def corrupt_copy(src, dst, picks):
    """Copy the processed tables to `dst`, pointing the rows chosen by `picks(split, table)` at files
    that do not decode (a truncated PNG, random bytes). Returns {split: broken sample_ids}."""
    dst.mkdir(parents=True)
    shutil.copy(src / "prepare.json", dst / "prepare.json")
    broken = {}
    for split in ("train", "test"):
        table = pd.read_parquet(src / f"{split}.parquet")
        rows = picks(split, table)
        for k, i in enumerate(rows):
            path = dst / f"broken_{split}_{k}.png"
            good = open(table.at[i, "image_path"], "rb").read()
            path.write_bytes(good[: len(good) // 3] if k % 2 == 0 else np.random.default_rng(k).bytes(300))
            table.at[i, "image_path"] = str(path)
        table.to_parquet(dst / f"{split}.parquet", index=False)
        broken[split] = table.loc[rows, "sample_id"].astype(str).tolist()
    return broken


@pytest.fixture(scope="module")
def broken(demo_catalog, tmp_path_factory):
    data = demo_catalog / "data"
    train_table = load_table(data, "train")
    fit, select = encoder_rows(train_table, holdout_fold(data), CLIP_PROFILES["tiny"].selection_fraction,
                               CLIP_PROFILES["tiny"].seed)
    holdout = (train_table["fold"] == holdout_fold(data)).to_numpy()
    with_image = train_table["has_image"].to_numpy()

    def picks(split, table):
        if split == "test":
            return list(np.flatnonzero(table["has_image"].to_numpy())[:2])
        # rows the model would train on, choose its checkpoint on, and be scored on
        return [int(np.flatnonzero(m & with_image)[j]) for m, n in ((fit, 3), (select, 2), (holdout, 1)) for j in range(n)]

    out = tmp_path_factory.mktemp("broken")
    return out / "data", corrupt_copy(data, out / "data", picks)


def test_loader_masks_counts_and_explains_each_failed_image(broken):
    data, bad = broken
    table = load_table(data, "test")
    paths, has_image = table["image_path"].to_numpy(), table["has_image"].to_numpy()
    loader = image_loader(paths, has_image, lambda img: torch.zeros(3, 4, 4), 4, 16, 0, torch.device("cpu"))
    failures = DecodeFailures()
    present = np.concatenate([p for _, p in encode_image_batches(lambda x: x.flatten(1), loader, torch.device("cpu"),
                                                                 None, failures)])
    is_bad = table["sample_id"].astype(str).isin(bad["test"]).to_numpy()
    assert is_bad.sum() == 2
    np.testing.assert_array_equal(present, has_image & ~is_bad)
    assert sorted(failures.reasons) == sorted(np.flatnonzero(is_bad).tolist())
    assert all(("Error" in reason) for reason in failures.reasons.values())
    message = describe_failures(failures.reasons, table["sample_id"])
    assert message.startswith("2 image(s) failed to decode") and all(sid in message for sid in bad["test"])
    # the up-front check finds the same rows, also when split across two ranks
    assert find_undecodable(paths, has_image) == failures.reasons
    halves = {**find_undecodable(paths, has_image, rank=0, world_size=2), **find_undecodable(paths, has_image, rank=1, world_size=2)}
    assert halves == failures.reasons


def test_siglip_masks_and_logs_images_that_fail_to_decode(broken, tiny_models, tmp_path, capsys):
    data, bad = broken
    cfg = replace(SIGLIP_PROFILES["tiny"], model=str(tiny_models / "siglip_tiny"), data_dir=data, embeddings_dir=tmp_path,
                  num_workers=0, chunk_size=64, split="test")
    extract.main(cfg)
    log = capsys.readouterr().out
    table = load_table(data, "test")
    cached = load_embeddings(tmp_path, "siglip_image", "test", table["sample_id"])
    is_bad = table["sample_id"].astype(str).isin(bad["test"]).to_numpy()
    np.testing.assert_array_equal(cached.present, table["has_image"].to_numpy() & ~is_bad)
    assert not cached.values[is_bad].any()
    line = [ln for ln in log.splitlines() if "failed to decode" in ln]
    assert len(line) == 1 and "2 image(s)" in line[0] and all(sid in line[0] for sid in bad["test"]), log


def test_clip_never_trains_or_selects_on_a_masked_row(broken, tiny_models, tmp_path, monkeypatch):
    data, bad = broken
    table = load_table(data, "train")
    bad_paths = set(table.loc[table["sample_id"].astype(str).isin(bad["train"]), "image_path"])
    loaders = []
    real_loader = train.image_loader

    def spy(paths, has_image, *args, **kwargs):
        loaders.append((list(paths), np.asarray(has_image, bool)))
        return real_loader(paths, has_image, *args, **kwargs)

    monkeypatch.setattr(train, "image_loader", spy)
    cfg = replace(CLIP_PROFILES["tiny"], model=str(tiny_models / "clip_tiny"), data_dir=data, out_dir=tmp_path,
                  embeddings_dir=tmp_path / "emb", predictions_dir=tmp_path / "pred", num_workers=0, epochs=1)
    metrics = train.main(cfg)
    assert metrics["images_failed_to_decode"] == len(bad["train"]) == 6
    fit_paths, select_paths = loaders[0][0], loaders[1][0]
    assert not bad_paths & (set(fit_paths) | set(select_paths))  # the broken rows never reach training or selection
    assert loaders[0][1].all() and loaders[1][1].all()  # nor does any row without an image
    for paths, flagged in loaders:  # no loader is told a broken file is an image
        assert not any(p in bad_paths for p, f in zip(paths, flagged) if f)
    assert metrics["fit_images"] + metrics["select_images"] + metrics["val_images"] == \
        int(table["has_image"].sum()) - len(bad["train"])
    preds = pd.read_csv(tmp_path / "tiny" / "val_predictions.csv", dtype={"sample_id": str})
    broken_holdout = preds[preds["sample_id"].isin(bad["train"])]
    assert len(broken_holdout) == 1 and not broken_holdout["has_usable_image"].any()
