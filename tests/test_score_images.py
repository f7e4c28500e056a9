"""Scoring reads new rows' images as the trained run read its own: relative links from the run's
image root wherever NEW.csv lies, `image_dir=` for another folder, and a WARNING on stderr (once
while pricing, once with the summary) when clearly more new rows than trained rows lack an image."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pipeline
import score
from core.io import read_json
from data.config import PrepareConfig
from test_score import assert_root_prices, prices, trained_root, write_csv


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_root(tmp_path_factory)


def root_slice(root: Path, rows: int | None = 50) -> pd.DataFrame:
    """The root's own raw test rows as written (the first `rows`, or all): image links relative to the raw folder."""
    return pd.read_csv(root / "raw" / "test.csv", dtype=str, keep_default_na=False).iloc[:rows]


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("WARNING")]


def test_the_roots_test_csv_or_a_slice_of_it_saved_elsewhere_prices_as_the_root(trained, tmp_path, capsys):
    rows = root_slice(trained, None)
    assert rows["image_link"].str.startswith("images/").mean() > 0.9  # relative links, read from the raw folder
    whole = score.score_file(trained, write_csv(rows, tmp_path / "elsewhere" / "test.csv"), tmp_path / "whole.csv")
    # the same rows in the same batches: the same floats
    assert np.array_equal(prices(whole).to_numpy(), prices(trained / "test_out.csv").to_numpy())
    part = score.score_file(trained, write_csv(rows.iloc[:50], tmp_path / "elsewhere" / "slice.csv"),
                            tmp_path / "slice.csv")
    assert_root_prices(part, trained)
    captured = capsys.readouterr()
    assert not warnings_in(captured.err)
    assert f"relative image links are read from {(trained / 'raw').resolve()}" in captured.out


def test_image_dir_names_the_folder_relative_links_are_read_from(trained, tmp_path, capsys):
    rows = root_slice(trained, 30)
    new_csv = write_csv(rows, tmp_path / "new" / "slice.csv")
    moved = tmp_path / "moved_images"
    shutil.copytree(trained / "raw" / "images", moved / "images")
    out = score.score_file(trained, new_csv, tmp_path / "prices.csv", image_dir=moved)
    assert_root_prices(out, trained)  # the same image bytes from another folder
    assert f"relative image links are read from {moved.resolve()}" in capsys.readouterr().out
    with pytest.raises(score.ScoringError, match=r"image_dir=.*nowhere: no such folder"):
        pipeline.main([f"root={trained}", f"score={new_csv}", f"out={tmp_path / 'again.csv'}",
                       f"image_dir={tmp_path / 'nowhere'}"])
    parsed = score.parse_cli([f"root={trained}", f"score={new_csv}", "out=x.csv", f"image_dir={moved}"])
    assert parsed["image_dir"] == moved


def test_rows_whose_images_are_missing_get_a_warning_naming_both_shares_and_the_fix(trained, tmp_path, capsys):
    rows = root_slice(trained)
    rows["image_link"] = "images/gone_" + rows["sample_id"] + ".png"  # files that do not exist
    new_csv = write_csv(rows, tmp_path / "gone.csv")
    out = tmp_path / "prices.csv"
    pipeline.main([f"root={trained}", f"score={new_csv}", f"out={out}", "score_chunk_rows=25"])
    assert len(prices(out)) == 50  # priced all the same, from text alone
    trained_share = max(read_json(trained / "data" / "prepare.json")["image_unusable_share"].values())
    captured = capsys.readouterr()
    found = warnings_in(captured.err)
    assert len(found) == 2  # as soon as the first chunk shows it, and with the summary
    assert found[0].startswith("WARNING: 100% of 25 new rows") and found[1].startswith("WARNING: 100% of 50 new rows")
    for line in found:
        assert f"against {trained_share:.0%} in the trained run" in line and "give image_dir=FOLDER" in line
        assert str((trained / "raw").resolve()) in line
    assert f"100% of rows without a usable image (the trained run: {100 * trained_share:.0f}%)" in captured.out


@pytest.mark.parametrize("new, run, warned", [(0.05, 0.02, False), (0.13, 0.02, True), (0.11, 0.02, False),
                                              (0.55, 0.40, False), (0.65, 0.40, True), (0.15, 0.0, True)])
def test_the_warning_needs_a_share_clearly_above_the_runs(new, run, warned):
    assert (score.image_warning(new, run, Path("/images"), 100) is not None) == warned


def test_the_default_image_root_is_the_recorded_one_or_the_runs_settings(tmp_path):
    recorded, raw = tmp_path / "recorded", tmp_path / "raw"
    recorded.mkdir()
    cfg = PrepareConfig(raw_dir=raw)
    assert score.trained_image_root(cfg, {"image_dir": str(recorded)}) == recorded
    # a recorded folder that is gone (a root copied elsewhere) or none recorded: the run's settings
    assert score.trained_image_root(cfg, {"image_dir": str(tmp_path / "gone")}) == raw.resolve()
    assert score.trained_image_root(PrepareConfig(raw_dir=raw, image_dir=recorded), {}) == recorded.resolve()
