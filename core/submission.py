"""Writing and checking `test_out.csv` (header `sample_id,price`, one positive price per test id)."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from core.errors import PipelineError
from core.io import atomic_write_text

HEADER = ["sample_id", "price"]


class SubmissionError(PipelineError, ValueError):
    pass


def _read_test_ids(test_csv: Path) -> list[str]:
    csv.field_size_limit(1 << 30)
    with open(test_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "sample_id" not in reader.fieldnames:
            raise SubmissionError(f"{test_csv}: no sample_id column (header: {reader.fieldnames})")
        return [row["sample_id"].strip() for row in reader]


def check_submission(pred_csv: Path, test_csv: Path | None = None, test_ids=None, max_listed: int = 10) -> list[str]:
    """Every problem found in `pred_csv` as a message; an empty list means the file is valid."""
    if test_ids is None:
        test_ids = _read_test_ids(Path(test_csv))
    expected = [str(i) for i in test_ids]
    expected_set = set(expected)
    problems: list[str] = []

    def add(kind: str, items: list[str]):
        if items:
            shown = "; ".join(items[:max_listed])
            more = f" (and {len(items) - max_listed} more)" if len(items) > max_listed else ""
            problems.append(f"{pred_csv}: {kind}: {shown}{more}")

    with open(pred_csv, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != HEADER:
            return [f"{pred_csv}: header must be exactly 'sample_id,price', got {','.join(header) if header else 'an empty file'!r}"]
        seen: dict[str, int] = {}
        repeated, unknown, bad_price = [], [], []
        for line_no, row in enumerate(reader, start=2):
            if len(row) != 2:
                bad_price.append(f"line {line_no}: expected 2 fields, got {len(row)}")
                continue
            sid, text = row[0].strip(), row[1].strip()
            if sid in seen:
                repeated.append(f"sample_id {sid} on lines {seen[sid]} and {line_no}")
                continue
            seen[sid] = line_no
            if sid not in expected_set:
                unknown.append(f"sample_id {sid} (line {line_no})")
            if text == "":
                bad_price.append(f"line {line_no} (sample_id {sid}): price is missing")
                continue
            try:
                price = float(text)
            except ValueError:
                bad_price.append(f"line {line_no} (sample_id {sid}): price {text!r} is not a number")
                continue
            if not math.isfinite(price):
                bad_price.append(f"line {line_no} (sample_id {sid}): price {text} is not finite")
            elif price <= 0:
                bad_price.append(f"line {line_no} (sample_id {sid}): price {text} is not positive")
    missing = [f"sample_id {sid}" for sid in expected if sid not in seen]
    add("test ids missing", missing)
    add("ids repeated", repeated)
    add("ids not in the test set", unknown)
    add("bad prices", bad_price)
    return problems


def write_submission(path: Path, sample_ids, prices, test_csv: Path | None = None, test_ids=None) -> Path:
    """Write `sample_id,price` atomically; refuse non-finite or non-positive prices and, given
    `test_csv` or `test_ids`, any file that fails `check_submission`. A rejected file never
    replaces a good one."""
    sample_ids = [str(s) for s in sample_ids]
    prices = np.asarray(prices, dtype=np.float64)
    if len(sample_ids) != len(prices):
        raise SubmissionError(f"{len(sample_ids)} sample_ids but {len(prices)} prices")
    bad = np.flatnonzero(~np.isfinite(prices) | (prices <= 0))
    if bad.size:
        examples = ", ".join(f"{sample_ids[i]}={prices[i]!r}" for i in bad[:5])
        raise SubmissionError(f"refusing to write {path}: {bad.size} non-finite or non-positive prices ({examples})")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HEADER)
    for sid, price in zip(sample_ids, prices):
        writer.writerow([sid, repr(float(price))])
    path = Path(path)
    if test_csv is not None or test_ids is not None:
        tmp = path.with_name(f".{path.name}.check")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(buf.getvalue(), encoding="utf-8")
        try:
            problems = check_submission(tmp, test_csv, test_ids=test_ids)
        finally:
            tmp.unlink(missing_ok=True)
        if problems:
            raise SubmissionError(f"refusing to write {path}:\n  " + "\n  ".join(problems))
    atomic_write_text(path, buf.getvalue())
    return path
