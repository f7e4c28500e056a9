"""Image copies that fail to decode after data.prepare wrote them: counted, logged with sample_ids
and reasons, masked in every image cache, and never used to train or choose a checkpoint for an
image model."""
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from clip_finetune import train
from clip_finetune.config import PROFILES as CLIP_PROFILES
from core.embedding_cache import load_embeddings
from core.encode import DecodeFailures, describe_failures, encode_image_batches, image_loader
from core.tables import encoder_rows, holdout_fold, load_table
from siglip_extract import extract
from siglip_extract.config import PROFILES as SIGLIP_PROFILES


BROKEN_PRICE = 4321.0  # given to every broken train row, so that its target is recognisable wherever it goes


def corrupt_copy(src, dst, picks):
    """Copy the processed tables to `dst`, pointing the rows chosen by `picks(split, table)` at files
    that do not decode (a truncated PNG, random bytes); broken train rows get BROKEN_PRICE.
    Returns {split: broken sample_ids}."""
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
            if split == "train":
                table.at[i, "price"], table.at[i, "log_price"] = BROKEN_PRICE, np.log1p(BROKEN_PRICE)
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
    """The broken rows carry a price no other row has: it must never reach the loss nor any SMAPE."""
    data, bad = broken
    targets, scored = [], []

    def recording(loss):
        def wrapped(pred, target):
            targets.append(target.detach().cpu().numpy().copy())
            return loss(pred, target)
        return wrapped

    real_get_loss, real_smape = train.get_loss, train.smape
    monkeypatch.setattr(train, "get_loss", lambda *a, **k: recording(real_get_loss(*a, **k)))
    monkeypatch.setattr(train, "l1_log_loss", recording(train.l1_log_loss))
    monkeypatch.setattr(train, "smape", lambda y, p: scored.append(np.asarray(y).copy()) or real_smape(y, p))
    cfg = replace(CLIP_PROFILES["tiny"], model=str(tiny_models / "clip_tiny"), data_dir=data, out_dir=tmp_path,
                  embeddings_dir=tmp_path / "emb", predictions_dir=tmp_path / "pred", num_workers=0, epochs=2)
    train.main(cfg)
    seen = np.concatenate(targets)
    assert len(seen) > 0 and not np.isclose(seen, np.log1p(BROKEN_PRICE)).any()
    assert scored and not any((y == BROKEN_PRICE).any() for y in scored)
    history = pd.read_csv(tmp_path / "tiny" / "history.csv")
    assert history["masked_images"].sum() > 0  # the broken fit rows did reach the loader, and were left out
    preds = pd.read_csv(tmp_path / "tiny" / "val_predictions.csv", dtype={"sample_id": str})
    broken_holdout = preds[preds["sample_id"].isin(bad["train"])]
    assert len(broken_holdout) == 1 and not broken_holdout["has_usable_image"].any()
