"""Writing and checking `test_out.csv` (header `sample_id,price`, one positive price per test id)."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import PipelineError
from core.io import atomic_save, atomic_write_text, escaped, undecodable_bytes

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
        # streamed: only the ids (and any row that is not UTF-8) are kept, never the catalog text
        ids, not_utf8, start = [], [], reader.line_num + 1
        for row in reader:
            if undecodable_bytes("".join(row)):
                not_utf8.append((start, row))
            if len(row) > id_column:
                ids.append(row[id_column].strip())
            start = reader.line_num + 1
    _not_utf8(test_csv, not_utf8, id_column)
    return ids


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
    # the rows are streamed (a catalogue's output has millions): only ids, prices and problems are kept
    reader = enumerate(csv.reader(io.StringIO(text, newline="")), start=1)
    _, header = next(reader, (1, None))
    if header is None or [h.strip() for h in header] != HEADER:
        _not_utf8(pred_csv, [(1, header or []), *((n, r) for n, r in reader if undecodable_bytes("".join(r)))], 0)
        problems.append(f"{pred_csv}: header must be exactly 'sample_id,price', got {','.join(header) if header else 'an empty file'!r}")
        return review
    seen: dict[str, int] = {}
    repeated, unknown, bad_price, not_utf8, blanks = [], [], [], [], []

    def check_row(line_no: int, row: list[str]) -> None:
        if len(row) != 2:
            bad_price.append(f"line {line_no}: expected 2 fields, got {len(row)}")
            return
        sid, value = row[0].strip(), row[1].strip()
        if sid in seen:
            repeated.append(f"sample_id {sid} on lines {seen[sid]} and {line_no}")
            return
        seen[sid] = line_no
        if sid not in expected_set:
            unknown.append(f"sample_id {sid} (line {line_no})")
        if value == "":
            bad_price.append(f"line {line_no} (sample_id {sid}): price is missing")
            return
        try:
            price = float(value)
        except ValueError:
            bad_price.append(f"line {line_no} (sample_id {sid}): price {value!r} is not a number")
            return
        if not math.isfinite(price):
            bad_price.append(f"line {line_no} (sample_id {sid}): price {value} is not finite")
        elif price <= 0:
            bad_price.append(f"line {line_no} (sample_id {sid}): price {value} is not positive")
        else:
            review.prices.append(price)

    for line_no, row in reader:
        if undecodable_bytes("".join(row)):
            not_utf8.append((line_no, row))
        if row == []:  # a blank line is judged once we know whether it ends the file
            blanks.append(line_no)
            continue
        for blank in blanks:
            check_row(blank, [])
        blanks = []
        check_row(line_no, row)
    _not_utf8(pred_csv, [(1, header), *not_utf8], 0)
    if len(blanks) == 1:
        review.warnings.append(f"{pred_csv}: one blank line at the end; graders skip it, but the exact format has none")
    else:
        for blank in blanks:
            check_row(blank, [])
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
    path, text = Path(path), buf.getvalue()
    if test_csv is None and test_ids is None:
        atomic_write_text(path, text)
        return path

    def write_checked(tmp: Path) -> None:
        # the very file that is moved into place is the one checked
        tmp.write_text(text, encoding="utf-8")
        problems = check_submission(tmp, test_csv, test_ids=test_ids, strict=True)
        if problems:
            raise SubmissionError(f"refusing to write {path}:\n  "
                                  + "\n  ".join(p.replace(str(tmp), str(path)) for p in problems))

    atomic_save(write_checked, path)
    return path
