"""The submission writer and `python -m data.check_submission`: every rejection."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.submission import SubmissionError, check_submission, review_submission, write_submission
from data.check_submission import main as check_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def test_csv(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text('sample_id,catalog_content,image_link\n1,"Item Name: a\nValue: 1",x\n2,b,y\n3,c,z\n')
    return path


def write(tmp_path, text):
    path = tmp_path / "pred.csv"
    path.write_text(text)
    return path


def test_valid_file_passes(tmp_path, test_csv, capsys):
    pred = write(tmp_path, "sample_id,price\n1,1.5\n3,2\n2,1e3\n")
    assert check_submission(pred, test_csv) == []
    assert check_main([str(pred), str(test_csv)]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize("body,expected", [
    ("sample_id,price\n1,1\n2,1\n", "test ids missing: sample_id 3"),
    ("sample_id,price\n1,1\n2,1\n3,1\n2,1\n", "sample_id 2 on lines 3 and 5"),
    ("sample_id,price\n1,1\n2,1\n3,1\n9,1\n", "ids not in the test set: sample_id 9"),
    ("sample_id,price\n1,\n2,1\n3,1\n", "price is missing"),
    ("sample_id,price\n1,abc\n2,1\n3,1\n", "'abc' is not a number"),
    ("sample_id,price\n1,inf\n2,1\n3,1\n", "is not finite"),
    ("sample_id,price\n1,nan\n2,1\n3,1\n", "is not finite"),
    ("sample_id,price\n1,0\n2,1\n3,1\n", "is not positive"),
    ("sample_id,price\n1,-3\n2,1\n3,1\n", "is not positive"),
    ("id,price\n1,1\n2,1\n3,1\n", "header must be exactly"),
    ("", "header must be exactly"),
])
def test_each_rejection(tmp_path, test_csv, capsys, body, expected):
    pred = write(tmp_path, body)
    problems = check_submission(pred, test_csv)
    assert any(expected in p for p in problems), problems
    assert check_main([str(pred), str(test_csv)]) == 1
    assert expected in capsys.readouterr().err


def test_cli_exit_codes(tmp_path, test_csv):
    good = write(tmp_path, "sample_id,price\n1,1\n2,1\n3,1\n")
    run = lambda *a: subprocess.run([sys.executable, "-m", "data.check_submission", *map(str, a)], cwd=ROOT,
                                    capture_output=True, text=True)
    assert run(good, test_csv).returncode == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("sample_id,price\n1,1\n")
    result = run(bad, test_csv)
    assert result.returncode == 1 and "missing" in result.stderr


def test_writer_refuses_bad_prices_and_keeps_the_old_file(tmp_path, test_csv):
    out = tmp_path / "test_out.csv"
    write_submission(out, [1, 2, 3], [1.0, 2.0, 3.0], test_csv=test_csv)
    before = out.read_text()
    for prices in ([1.0, 0.0, 3.0], [1.0, np.nan, 3.0], [1.0, np.inf, 3.0], [-1.0, 2.0, 3.0]):
        with pytest.raises(SubmissionError):
            write_submission(out, [1, 2, 3], prices, test_csv=test_csv)
    with pytest.raises(SubmissionError, match="missing"):
        write_submission(out, [1, 2], [1.0, 2.0], test_csv=test_csv)
    assert out.read_text() == before
    assert check_submission(out, test_csv) == []


def write_bytes(tmp_path, data: bytes, name="pred.csv"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("data,warning", [
    (b"\xef\xbb\xbfsample_id,price\n1,1.5\n2,2\n3,3\n", "byte-order mark"),
    (b"sample_id,price\n1,1.5\n2,2\n3,3\n\n", "blank line at the end"),
    (b"sample_id,price\r\n1,1.5\r\n2,2\r\n3,3\r\n\r\n", "blank line at the end"),
])
def test_excel_bom_and_one_trailing_blank_line_pass_with_a_warning(tmp_path, test_csv, capsys, data, warning):
    pred = write_bytes(tmp_path, data)
    assert check_submission(pred, test_csv) == []
    assert check_main([str(pred), str(test_csv)]) == 0
    out = capsys.readouterr()
    assert "OK" in out.out and "3 test ids, prices 1.5 to 3" in out.out
    assert f"warning: {pred}" in out.err and warning in out.err


def test_bom_and_blank_line_together_give_two_warnings(tmp_path, test_csv):
    pred = write_bytes(tmp_path, b"\xef\xbb\xbfsample_id,price\n1,1\n2,1\n3,1\n\n")
    review = review_submission(pred, test_csv)
    assert review.problems == [] and len(review.warnings) == 2


@pytest.mark.parametrize("data,expected", [
    (b"sample_id,price\n1,1\n2,1\n3,1\n\n\n", "line 6: expected 2 fields, got 0"),  # two blank lines
    (b"sample_id,price\n1,1\n\n2,1\n3,1\n", "line 3: expected 2 fields, got 0"),  # a blank line inside
    (b"\xef\xbb\xbfsample_id,price\n1,1\n2,1\n", "test ids missing: sample_id 3"),  # a BOM hides nothing else
    (b"\xef\xbb\xbfid,price\n1,1\n2,1\n3,1\n", "header must be exactly"),
    (b"\xef\xbb\xbf", "header must be exactly"),
])
def test_the_tolerance_stops_there(tmp_path, test_csv, capsys, data, expected):
    pred = write_bytes(tmp_path, data)
    assert any(expected in p for p in check_submission(pred, test_csv)), check_submission(pred, test_csv)
    assert check_main([str(pred), str(test_csv)]) == 1
    assert expected in capsys.readouterr().err


def test_strict_check_and_the_writer_allow_neither(tmp_path, test_csv):
    for data in (b"\xef\xbb\xbfsample_id,price\n1,1\n2,1\n3,1\n", b"sample_id,price\n1,1\n2,1\n3,1\n\n"):
        problems = check_submission(write_bytes(tmp_path, data), test_csv, strict=True)
        assert len(problems) == 1 and ("byte-order mark" in problems[0] or "blank line" in problems[0])
    out = write_submission(tmp_path / "test_out.csv", [1, 2, 3], [1.0, 2.0, 3.0], test_csv=test_csv)
    data = out.read_bytes()
    assert data.startswith(b"sample_id,price\n") and not data.endswith(b"\n\n")
    assert check_submission(out, test_csv, strict=True) == []


@pytest.mark.parametrize("data,where", [
    (b"sample_id,price\n1,1\n2,1\xa0\n3,1\n", "line 3 (sample_id 2)"),
    (b"sample_id,price\n1,1\n2\xe9,1\n3,1\n", r"line 3 (sample_id 2\xe9)"),
    (b"sample_id,pr\xefce\n1,1\n2,1\n3,1\n", "line 1 (the header)"),
])
def test_non_utf8_submission_names_file_line_and_id(tmp_path, test_csv, capsys, data, where):
    pred = write_bytes(tmp_path, data)
    with pytest.raises(SubmissionError) as err:
        check_submission(pred, test_csv)
    message = str(err.value)
    assert message.startswith(f"{pred}: expected UTF-8") and f"pred.csv {where}: byte(s) \\x" in message
    assert check_main([str(pred), str(test_csv)]) == 1
    assert f"pred.csv {where}" in capsys.readouterr().err


def test_non_utf8_test_csv_names_file_line_and_id(tmp_path):
    test_csv = write_bytes(tmp_path, b'sample_id,catalog_content,image_link\n1,"a\nb",x\n2,caf\xe9,y\n', "test.csv")
    pred = write_bytes(tmp_path, b"sample_id,price\n1,1\n2,1\n")
    with pytest.raises(SubmissionError, match=r"UTF-8.*\n  test.csv line 4 \(sample_id 2\): byte\(s\) \\xe9"):
        check_submission(pred, test_csv)


def test_a_refused_submission_names_its_path_and_leaves_no_temporary_file(tmp_path, test_csv):
    out = tmp_path / "out" / "test_out.csv"
    with pytest.raises(SubmissionError) as refused:
        write_submission(out, [1, 2], [1.0, 2.0], test_csv=test_csv)
    assert str(refused.value) == f"refusing to write {out}:\n  {out}: test ids missing: sample_id 3"
    assert list(out.parent.iterdir()) == []
    write_submission(out, [1, 2, 3], [1.0, 2.0, 3.0], test_csv=test_csv)
    assert [p.name for p in out.parent.iterdir()] == ["test_out.csv"]
