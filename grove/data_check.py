"""Data files read through before any compute: every record parses, holds the columns the
template uses, and there are enough distinct rows to split into train and eval.

Run at config time on local files (flows/config/checks.py) and by load_data on the copies it
fetched of remote data, with the same messages: `file:line: what`. JSON lines and CSV are
streamed a line at a time (no datasets/pyarrow); parquet is read in batches of the needed columns.
"""

from __future__ import annotations

import csv
import json
from typing import Iterator

from grove.errors import UserError

FORMATS_HINT = "data files are JSON lines, a JSON array, CSV or parquet"


def _text_lines(path: str, shown: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; a binary file is named as such, with where. A byte-order
    mark (spreadsheets write one) is dropped, as the loaders training reads the file with do."""
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if b"\x00" in raw:
                raise UserError(f"{shown}:{lineno}: holds NUL bytes: a binary file, not text ({FORMATS_HINT})")
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{shown}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1}): a binary file? ({FORMATS_HINT})") from None


def _starts_with_bracket(path: str) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1] == b"["


def records(path: str, fmt: str, shown: str | None = None) -> Iterator[tuple[str, object]]:
    """(where, record) for every record of a local data file; `where` is `file:line` (JSON lines,
    CSV), `file:line (item N)` (a JSON array) or `file: row N` (parquet)."""
    shown = shown or path
    if fmt == "parquet":
        yield from _parquet_records(path, shown)
    elif fmt == "csv":
        yield from _csv_records(path, shown)
    elif _starts_with_bracket(path):
        text = "".join(line for _, line in _text_lines(path, shown))
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{shown}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        for index, item in enumerate(items):
            yield f"{shown} (item {index})", item
    else:
        for lineno, line in _text_lines(path, shown):
            if not line.strip():
                continue
            try:
                yield f"{shown}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{shown}:{lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None


def _csv_records(path: str, shown: str) -> Iterator[tuple[str, dict]]:
    reader = csv.reader(line for _, line in _text_lines(path, shown))
    try:
        header = next(reader, None)
        if header is None:
            return
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise UserError(f"{shown}:{reader.line_num}: {len(fields)} fields, the header has {len(header)}")
            yield f"{shown}:{reader.line_num}", dict(zip(header, fields))
    except csv.Error as exc:
        raise UserError(f"{shown}:{reader.line_num}: not valid CSV ({exc})") from None


def _parquet_records(path: str, shown: str) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        source = pq.ParquetFile(path)
        row = 0
        for batch in source.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                row += 1
                yield f"{shown}: row {row}", record
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors: a bad file, said in one line
        raise UserError(f"{shown}: not a readable parquet file ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def first_columns(path: str, fmt: str) -> list[str] | None:
    """Column names of a local file's first record (CSV: its header), for config-time hints."""
    if fmt == "parquet":
        return None
    if fmt == "csv":
        for _, line in _text_lines(path, path):
            return next(csv.reader([line]), [])
        return []
    for _, record in records(path, fmt):
        return sorted(record) if isinstance(record, dict) else []
    return []


def _check_record(where: str, record: object, columns: list[str]) -> str:
    if not isinstance(record, dict):
        raise UserError(f"{where}: a JSON {type(record).__name__} where one row (a JSON object) is expected")
    missing = [c for c in columns if record.get(c) is None]
    if missing:
        raise UserError(f"{where}: no value for column {missing[0]!r} (the template uses "
                        f"{', '.join(repr(c) for c in columns)}; this row has {sorted(record)})")
    nested = [c for c in columns if isinstance(record[c], (dict, list))]
    if nested:  # a JSON answer stored as an object: the model would learn Python's quotes, not JSON
        kind = "object" if isinstance(record[nested[0]], dict) else "array"
        shown = str(record[nested[0]])
        raise UserError(f"{where}: column {nested[0]!r} holds a JSON {kind}, which the template writes as "
                        f"Python shows it ({shown[:40]}{'...' if len(shown) > 40 else ''}), not as JSON; store "
                        f"it as a string of JSON text")
    # what makes two rows the same (tasks/load_data.py row_text)
    return json.dumps([record.get(c) for c in columns])


def check_data(files: list[str], fmt: str, columns: list[str], eval_size: float,
               eval_files: list[str] | None = None, max_samples: int | None = None,
               shown: dict[str, str] | None = None, answers: list[str] | None = None,
               blank_answers: list[str] | None = None) -> dict:
    """Read every record of the (local) files; raise UserError at the first problem. Rows after
    max_samples are read too (the loader parses whole files) but not counted. `answers`: a list
    that receives the counted rows' values of the template's last column; `blank_answers`, where
    (file:line) each counted row whose value there is empty or whitespace is."""
    name = (shown or {}).get
    seen: set[int] = set()
    rows = 0
    for path in files:
        for where, record in records(path, fmt, name(path, path)):
            marker = _check_record(where, record, columns)
            if max_samples is None or rows < max_samples:
                rows += 1
                seen.add(hash(marker))
                if answers is not None:
                    answers.append(str(record[columns[-1]]))
                if blank_answers is not None and not str(record[columns[-1]]).strip():
                    blank_answers.append(where)
    first = name(files[0], files[0]) + (f" (and {len(files) - 1} more files)" if len(files) > 1 else "")
    if eval_files:
        fresh: set[int] = set()
        for path in eval_files:
            for where, record in records(path, fmt, name(path, path)):
                marker = hash(_check_record(where, record, columns))
                if marker not in seen:
                    fresh.add(marker)
        if not seen:
            raise UserError(f"{first}: no rows to train on")
        if not fresh:
            raise UserError(f"{name(eval_files[0], eval_files[0])}: no eval rows left: every eval row is also "
                            f"a training row (eval is never done on trained text)")
        return {"rows": rows, "distinct": len(seen), "eval_distinct": len(fresh)}
    distinct = len(seen)
    size = int(eval_size) if eval_size >= 1 else eval_size
    if distinct < 2:
        raise UserError(f"{first}: {distinct} distinct row{'s' if distinct != 1 else ''} (of {rows} read); "
                        f"splitting into train and eval (eval size {size}) needs at least 2")
    if eval_size >= 1 and eval_size >= distinct:
        raise UserError(f"{first}: eval size {size} rows leaves nothing to train on: the data has "
                        f"{distinct} distinct rows")
    return {"rows": rows, "distinct": distinct}
