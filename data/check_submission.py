"""Check a submission file against the test CSV.

    python -m data.check_submission PRED_CSV TEST_CSV

Exits 0 with a one-line summary when the file has header `sample_id,price` and exactly one
finite, positive price for every test id; exits 1 listing every problem otherwise.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from core.submission import SubmissionError, check_submission


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m data.check_submission PRED_CSV TEST_CSV", file=sys.stderr)
        return 2
    pred_csv, test_csv = Path(argv[0]), Path(argv[1])
    for path in (pred_csv, test_csv):
        if not path.exists():
            print(f"error: {path}: file not found", file=sys.stderr)
            return 1
    try:
        problems = check_submission(pred_csv, test_csv)
    except SubmissionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if problems:
        print(f"INVALID {pred_csv}:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    with open(pred_csv, newline="") as f:
        prices = [float(row["price"]) for row in csv.DictReader(f)]
    print(f"OK {pred_csv}: {len(prices)} test ids, prices {min(prices):.4g} to {max(prices):.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
