"""Check a submission file against the test CSV.

    python -m data.check_submission PRED_CSV TEST_CSV

Exits 0 with a one-line summary when the file has header `sample_id,price` and exactly one
finite, positive price for every test id; exits 1 listing every problem otherwise. It judges what
a grader's CSV reader accepts: a UTF-8 byte-order mark (Excel writes one) and one blank line at
the end pass, each with a warning.
"""
from __future__ import annotations

import sys
from pathlib import Path

from core.submission import SubmissionError, review_submission


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
        review = review_submission(pred_csv, test_csv)
    except SubmissionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for warning in review.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if review.problems:
        print(f"INVALID {pred_csv}:", file=sys.stderr)
        for problem in review.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    prices = review.prices
    print(f"OK {pred_csv}: {len(prices)} test ids, prices {min(prices):.4g} to {max(prices):.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
