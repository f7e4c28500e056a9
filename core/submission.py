"""Writing and checking `test_out.csv` (header `sample_id,price`, one positive price per test id)."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import PipelineError
from core.io import atomic_write_text, escaped, undecodable_bytes

HEADER = ["sample_id", "price"]
BOM = "\ufeff"


class SubmissionError(PipelineError, ValueError):
    pass


def _not_utf8(path: Path, rows, id_column: int | None, max_listed: int = 5) -> None:
    """Raise naming each (line, row) of `rows` that holds bytes that are not valid UTF-8."""
    path, bad = Path(path), []
    for line, row in rows:
        shown = undecodable_bytes("".join(row))
        if shown:
            if line == 1:
                bad.append(f"{path.name} line 1 (the header): byte(s) {shown}")
            else:
                sid = row[id_column].strip() if id_column is not None and id_column < len(row) else "?"
                bad.append(f"{path.name} line {line} (sample_id {escaped(sid)}): byte(s) {shown}")
    if bad:
        more = f"\n  ... and {len(bad) - max_listed} more" if len(bad) > max_listed else ""
        raise SubmissionError(f"{path}: expected UTF-8 text, but {len(bad)} row(s) hold bytes that are not valid "
                              "UTF-8 (the file was probably saved as Latin-1 or Windows-1252; save it as UTF-8):\n  "
                              + "\n  ".join(bad[:max_listed]) + more)


def _read_test_ids(test_csv: Path) -> list[str]:
    csv.field_size_limit(1 << 30)
    with open(test_csv, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or "sample_id" not in header:
            _not_utf8(test_csv, [(1, header or [])], None)
            raise SubmissionError(f"{test_csv}: no sample_id column (header: {header})")
        id_column = header.index("sample_id")
        rows, start = [], reader.line_num + 1
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1
    _not_utf8(test_csv, rows, id_column)
    return [row[id_column].strip() for _, row in rows if len(row) > id_column]


@dataclass
class SubmissionReview:
    problems: list[str] = field(default_factory=list)  # any one makes the file invalid
    warnings: list[str] = field(default_factory=list)  # a grader reads past these, a strict check does not
    prices: list[float] = field(default_factory=list)  # every valid price read


def review_submission(pred_csv: Path, test_csv: Path | None = None, test_ids=None,
                      max_listed: int = 10) -> SubmissionReview:
    """Every problem in `pred_csv`, and the departures from the exact format that a grader's CSV
    reader accepts: a UTF-8 byte-order mark (what Excel writes) and one blank line at the end.
    Bytes that are not valid UTF-8 raise SubmissionError naming the line and sample_id."""
    if test_ids is None:
        test_ids = _read_test_ids(Path(test_csv))
    expected = [str(i) for i in test_ids]
    expected_set = set(expected)
    review = SubmissionReview()
    problems = review.problems

    def add(kind: str, items: list[str]):
        if items:
            shown = "; ".join(items[:max_listed])
            more = f" (and {len(items) - max_listed} more)" if len(items) > max_listed else ""
            problems.append(f"{pred_csv}: {kind}: {shown}{more}")

    text = Path(pred_csv).read_bytes().decode("utf-8", "surrogateescape")
    if text.startswith(BOM):
        text = text[len(BOM):]
        review.warnings.append(f"{pred_csv}: starts with a UTF-8 byte-order mark (as Excel writes); "
                               "graders read past it, but the exact format has none")
    rows = list(enumerate(csv.reader(io.StringIO(text, newline="")), start=1))
    _not_utf8(pred_csv, rows, 0)
    if len(rows) > 1 and rows[-1][1] == [] and (len(rows) < 3 or rows[-2][1] != []):
        rows.pop()
        review.warnings.append(f"{pred_csv}: one blank line at the end; graders skip it, but the exact format has none")
    header = rows[0][1] if rows else None
    if header is None or [h.strip() for h in header] != HEADER:
        problems.append(f"{pred_csv}: header must be exactly 'sample_id,price', got {','.join(header) if header else 'an empty file'!r}")
        return review
    seen: dict[str, int] = {}
    repeated, unknown, bad_price = [], [], []
    for line_no, row in rows[1:]:
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
        else:
            review.prices.append(price)
    missing = [f"sample_id {sid}" for sid in expected if sid not in seen]
    add("test ids missing", missing)
    add("ids repeated", repeated)
    add("ids not in the test set", unknown)
    add("bad prices", bad_price)
    return review


def check_submission(pred_csv: Path, test_csv: Path | None = None, test_ids=None, max_listed: int = 10,
                     strict: bool = False) -> list[str]:
    """Every problem found in `pred_csv` as a message; an empty list means the file is valid.
    `strict` also counts the warnings of `review_submission` (a byte-order mark, a trailing blank line)."""
    review = review_submission(pred_csv, test_csv, test_ids=test_ids, max_listed=max_listed)
    return review.problems + (review.warnings if strict else [])


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
            problems = check_submission(tmp, test_csv, test_ids=test_ids, strict=True)
        finally:
            tmp.unlink(missing_ok=True)
        if problems:
            raise SubmissionError(f"refusing to write {path}:\n  " + "\n  ".join(problems))
    atomic_write_text(path, buf.getvalue())
    return path
