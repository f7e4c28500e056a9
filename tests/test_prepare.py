"""`data.prepare` validation, parsing, the shared split, and `data.synthetic` round trips."""
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.io import read_json
from core.tables import TRAIN_COLUMNS, load_table
from data import prepare, synthetic
from data.config import PrepareConfig, SyntheticConfig
from data.prepare import DataValidationError, assign_folds, read_competition_csv

HEADER = "sample_id,catalog_content,image_link,price\n"


def write_csv(tmp_path, body, header=HEADER, name="train.csv"):
    path = tmp_path / name
    path.write_text(header + body)
    return path


def test_good_csv_with_multiline_field_reads(tmp_path):
    path = write_csv(tmp_path, '1,"Item Name: a\nValue: 2\nUnit: oz",x.png,3.5\n2,b,y.png,4\n')
    df = read_competition_csv(path, with_price=True)
    assert df["sample_id"].tolist() == ["1", "2"] and df["line"].tolist() == [2, 5]
    assert df["price"].tolist() == [3.5, 4.0]


def test_missing_column_names_the_file_and_column(tmp_path):
    path = write_csv(tmp_path, "1,a,x\n", header="sample_id,catalog_content,image_link\n")
    with pytest.raises(DataValidationError, match=r"train.csv: missing column\(s\) \['price'\]"):
        read_competition_csv(path, with_price=True)


@pytest.mark.parametrize("price_text,shown", [("", "''"), ("abc", "'abc'"), ("0", "'0'"), ("-2.5", "'-2.5'"), ("nan", "'nan'")])
def test_bad_price_names_file_line_id_and_column(tmp_path, price_text, shown):
    path = write_csv(tmp_path, f'1,"two\nlines",x,3\n77,b,y,{price_text}\n')
    with pytest.raises(DataValidationError) as err:
        read_competition_csv(path, with_price=True)
    message = str(err.value)
    assert "train.csv line 4 (sample_id 77), column 'price'" in message and shown in message


def test_duplicate_sample_id_names_both_lines(tmp_path):
    path = write_csv(tmp_path, "5,a,x,1\n6,b,y,2\n5,c,z,3\n")
    with pytest.raises(DataValidationError, match=r"line 4 \(sample_id 5\), column 'sample_id': duplicate of line 2"):
        read_competition_csv(path, with_price=True)


def test_all_bad_rows_are_listed_at_once(tmp_path):
    path = write_csv(tmp_path, "1,a,x,zero\n2,b,y,-1\n3,c,z,4\n")
    with pytest.raises(DataValidationError, match="2 bad row"):
        read_competition_csv(path, with_price=True)


def test_folds_are_balanced_and_stratified_by_price():
    prices = np.exp(np.random.default_rng(0).normal(2.6, 1.0, 5000))
    folds = assign_folds(prices, n_folds=5, n_bins=10, seed=1)
    assert np.bincount(folds).tolist() == [1000] * 5
    medians = [np.median(prices[folds == k]) for k in range(5)]
    assert max(medians) / min(medians) < 1.05
    assert (assign_folds(prices, 5, 10, seed=1) == folds).all()
    assert (assign_folds(prices, 5, 10, seed=2) != folds).any()


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a = synthetic.main(SyntheticConfig(out_dir=tmp_path / "a", n_train=60, n_test=20, seed=5, image_size=16))
    b = synthetic.main(SyntheticConfig(out_dir=tmp_path / "b", n_train=60, n_test=20, seed=5, image_size=16))
    c = synthetic.main(SyntheticConfig(out_dir=tmp_path / "c", n_train=60, n_test=20, seed=6, image_size=16))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_synthetic_looks_like_the_competition(demo_catalog):
    raw = demo_catalog / "raw"
    train, test = pd.read_csv(raw / "train.csv"), pd.read_csv(raw / "test.csv")
    assert list(train.columns) == ["sample_id", "catalog_content", "image_link", "price"]
    assert list(test.columns) == ["sample_id", "catalog_content", "image_link"]
    labels = pd.read_csv(raw / "test_labels.csv")
    assert labels["sample_id"].tolist() == test["sample_id"].tolist() and (labels["price"] > 0).all()
    prices = train["price"]
    assert 0.3 < prices.min() < 3 and 7 < prices.median() < 25 and prices.max() > 150
    assert train["catalog_content"].str.contains("Value: nan\nUnit: None").any()


def test_synthetic_then_prepare_round_trip(demo_catalog):
    data = demo_catalog / "data"
    train, test = load_table(data, "train"), load_table(data, "test")
    raw_train = pd.read_csv(demo_catalog / "raw" / "train.csv", dtype={"sample_id": str})
    assert set(TRAIN_COLUMNS) <= set(train.columns)
    assert train["sample_id"].tolist() == raw_train["sample_id"].tolist()
    assert np.allclose(train["price"], raw_train["price"]) and np.allclose(train["log_price"], np.log1p(train["price"]))
    assert set(train["fold"]) == {0, 1, 2, 3, 4}
    assert (train["split"] == "val").sum() == (train["fold"] == 0).sum()
    # units spelled many ways come out canonical; broken and corrupt images are counted, not fatal
    assert set(train["unit"]) <= {"ounce", "fl_oz", "count", "pound", "none"}
    report = read_json(data / "parse_report.json")
    assert report["train"]["images_missing"] == int((~train["has_image"]).sum()) > 0
    assert all(Path(p).exists() for p in train.loc[train["has_image"], "image_path"])
    fl = train[train["unit"] == "fl_oz"].iloc[0]
    assert fl["unit_volume"] == pytest.approx(fl["value"] * 29.5735) and fl["unit_weight"] == 0
    assert len(test) == 150 and "price" not in test.columns


def test_prepare_skips_when_complete_and_reruns_on_config_change(demo_catalog, tmp_path):
    cfg = PrepareConfig(raw_dir=demo_catalog / "raw", out_dir=tmp_path / "p", download_workers=2)
    first = prepare.main(cfg)
    mtime = (tmp_path / "p" / "train.parquet").stat().st_mtime_ns
    assert prepare.main(cfg) == first
    assert (tmp_path / "p" / "train.parquet").stat().st_mtime_ns == mtime
    prepare.main(PrepareConfig(raw_dir=cfg.raw_dir, out_dir=cfg.out_dir, seed=7, download_workers=2))
    assert (tmp_path / "p" / "train.parquet").stat().st_mtime_ns != mtime


def test_prepare_reads_raw_files_by_content_not_by_time(demo_catalog, tmp_path):
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(demo_catalog / "raw", raw)
    cfg = PrepareConfig(raw_dir=raw, out_dir=tmp_path / "p", download_workers=2)
    prepare.main(cfg)
    written = (tmp_path / "p" / "train.parquet").stat().st_mtime_ns
    (raw / "train.csv").touch()  # a new time, the same bytes: nothing to redo
    prepare.main(cfg)
    assert (tmp_path / "p" / "train.parquet").stat().st_mtime_ns == written
    text = (raw / "train.csv").read_text(encoding="utf-8")
    (raw / "train.csv").write_text(text + "\n", encoding="utf-8")
    prepare.main(cfg)  # new bytes (a trailing blank line): parsed again
    assert (tmp_path / "p" / "train.parquet").stat().st_mtime_ns != written


def test_missing_input_files_say_what_to_do(tmp_path):
    with pytest.raises(DataValidationError, match="raw_dir=FOLDER"):
        prepare.main(PrepareConfig(raw_dir=tmp_path / "nowhere", out_dir=tmp_path / "out"))


def write_bytes(tmp_path, data: bytes, name="train.csv"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("row,where,shown", [
    (b'2,"caf\xe9\ncr\xe8me",y.png,4\n', "line 3 (sample_id 2), column 'catalog_content'", r"\xe9"),
    (b"2\xff,b,y.png,4\n", r"line 3 (sample_id 2\xff), column 'sample_id'", r"\xff"),
])
def test_non_utf8_byte_names_file_line_id_and_column(tmp_path, row, where, shown):
    path = write_bytes(tmp_path, HEADER.encode() + b"1,a,x.png,3\n" + row + b"3,c,z.png,5\n")
    with pytest.raises(DataValidationError) as err:
        read_competition_csv(path, with_price=True)
    message = str(err.value)
    assert f"train.csv {where}" in message and "UTF-8" in message and shown in message
    assert "1 bad row" in message  # the good rows around it are not blamed


def test_non_utf8_byte_in_the_header_names_line_1(tmp_path):
    path = write_bytes(tmp_path, b"sample_id,catalog_content,image_link,pr\xefce\n1,a,x,3\n")
    with pytest.raises(DataValidationError, match=r"train.csv line 1 \(the header\).*UTF-8"):
        read_competition_csv(path, with_price=True)


def test_excel_byte_order_mark_is_read_past(tmp_path):
    path = write_bytes(tmp_path, b"\xef\xbb\xbf" + HEADER.encode() + b"1,caf\xc3\xa9,x.png,3\n")
    df = read_competition_csv(path, with_price=True)
    assert df["sample_id"].tolist() == ["1"] and df["catalog_content"].tolist() == ["caf\u00e9"]


def small_raw(folder: Path, n_train=20, test_header="sample_id,catalog_content,image_link\n", test_price=""):
    """A tiny competition folder whose image links point nowhere (images are not needed here)."""
    folder.mkdir(parents=True, exist_ok=True)
    train = "".join(f'{i},"Item Name: thing {i}\nValue: {i}\nUnit: Ounce",img{i}.png,{1.5 * i + 1}\n' for i in range(n_train))
    test = "".join(f"t{i},Item Name: other {i},timg{i}.png{test_price}\n" for i in range(5))
    (folder / "train.csv").write_text(HEADER + train)
    (folder / "test.csv").write_text(test_header + test)
    return folder


def test_test_csv_with_prices_warns_and_drops_them(tmp_path, capsys):
    raw = small_raw(tmp_path / "raw", test_header=HEADER, test_price=",9.5")
    prepare.main(PrepareConfig(raw_dir=raw, out_dir=tmp_path / "out", download_images=False, download_workers=1))
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "test.csv has a 'price' column" in log and "swapped" in log
    assert "swapped" in capsys.readouterr().out
    test = load_table(tmp_path / "out", "test")
    assert "price" not in test.columns and len(test) == 5


def test_test_csv_without_prices_does_not_warn(tmp_path):
    raw = small_raw(tmp_path / "raw")
    prepare.main(PrepareConfig(raw_dir=raw, out_dir=tmp_path / "out", download_images=False, download_workers=1))
    assert "swapped" not in (tmp_path / "out" / "log.txt").read_text()


@pytest.mark.parametrize("bad_train", [
    HEADER.encode() + b"1,caf\xe9,x.png,3\n",  # not UTF-8
    HEADER.encode() + b"1,a,x.png,-3\n",  # a bad price
])
def test_failed_run_on_bad_csv_keeps_the_good_output(tmp_path, bad_train):
    raw = small_raw(tmp_path / "raw")
    out = tmp_path / "out"
    cfg = PrepareConfig(raw_dir=raw, out_dir=out, download_images=False, download_workers=1)
    prepare.main(cfg)
    before = load_table(out, "train")
    (raw / "train.csv").write_bytes(bad_train)
    with pytest.raises(DataValidationError, match="train.csv line 2"):
        prepare.main(cfg)
    assert read_json(out / "prepare.json")["complete"] is True
    pd.testing.assert_frame_equal(load_table(out, "train"), before)
    assert len(load_table(out, "test")) == 5


def test_sample_ids_are_kept_as_written_and_surrounding_spaces_are_refused_with_the_row(tmp_path):
    path = write_csv(tmp_path, "007,a,x.png,3\n8.0,b,y.png,4\n")
    assert read_competition_csv(path, with_price=True)["sample_id"].tolist() == ["007", "8.0"]
    path = write_csv(tmp_path, '007,a,x.png,3\n" 9 ",b,y.png,4\n10\t,c,z.png,5\n')
    with pytest.raises(DataValidationError) as err:
        read_competition_csv(path, with_price=True)
    message = str(err.value)
    assert "2 bad row" in message
    assert "train.csv line 3 (sample_id 9), column 'sample_id': ' 9 ' has surrounding spaces" in message
    assert "train.csv line 4 (sample_id 10), column 'sample_id': '10\\t' has surrounding spaces" in message


def test_rows_with_an_empty_catalog_content_are_counted(tmp_path):
    raw = small_raw(tmp_path / "raw")
    text = (raw / "train.csv").read_text().replace('"Item Name: thing 3\nValue: 3\nUnit: Ounce"', '""')
    (raw / "train.csv").write_text(text.replace('"Item Name: thing 4\nValue: 4\nUnit: Ounce"', '"  "'))
    (raw / "test.csv").write_text("sample_id,catalog_content,image_link\nt0,,a.png\nt1,Item Name: x,b.png\n")
    meta = prepare.main(PrepareConfig(raw_dir=raw, out_dir=tmp_path / "out", download_images=False, download_workers=1))
    assert meta["empty_catalog_content"] == {"train": 2, "test": 1}
    report = read_json(tmp_path / "out" / "parse_report.json")
    assert report["train"]["empty_catalog_content"] == 2 and report["test"]["empty_catalog_content"] == 1
    assert "empty catalog_content: 2 in train, 1 in test" in (tmp_path / "out" / "log.txt").read_text()
    assert meta["image_dir"] == str(raw.resolve())
    assert meta["image_unusable_share"] == {"train": 1.0, "test": 1.0}  # no image file exists here
    assert meta["image_unusable_reasons"]["train"] == {"failed:file not found": 20}


def test_a_complete_prepare_whose_image_copies_are_gone_runs_again(demo_catalog, tmp_path):
    import shutil

    cfg = PrepareConfig(raw_dir=demo_catalog / "raw", out_dir=tmp_path / "p", download_workers=2)
    prepare.main(cfg)
    shutil.rmtree(tmp_path / "p" / "images")
    prepare.main(cfg)
    table = load_table(tmp_path / "p", "train")
    assert table["has_image"].any() and all(Path(p).exists() for p in table.loc[table["has_image"], "image_path"])
