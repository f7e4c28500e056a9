"""The submission writer and `python -m data.check_submission`: every rejection."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.submission import SubmissionError, check_submission, write_submission
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
