"""Tables (CSV, TSV, JSONL, Parquet) read row by row in bounded memory, never guessing a row."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import UnsupportedInputError
from .files import display
from .items import ItemFailure

MAX_RECORD_CHARS = 64 << 20  # a CSV/TSV line or JSONL record longer than this is refused, unread
TABLES = (".csv", ".tsv", ".jsonl", ".parquet")


def table_rows(path: Path, column: str | None, id_column: str | None) -> Iterator[tuple[int, Any, Any]]:
    """``(row or line number, value, id value)`` from a table, streamed, one per row (see the module).

    A JSONL line that is not a JSON object gives an :class:`ItemFailure` value.
    """
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        if csv.field_size_limit() < MAX_RECORD_CHARS:  # the default, 131,072 characters, aborts on long texts
            csv.field_size_limit(MAX_RECORD_CHARS)
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {"strict": True}
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(_limited(f, path), **dialect)
            try:
                _check_columns(path, reader.fieldnames or [], column, id_column)
                width = len(reader.fieldnames or [])
                for n, row in enumerate(reader, start=1):
                    cells = width + len(row.get(None) or []) - sum(v is None for k, v in row.items() if k is not None)
                    if cells != width:  # an unquoted separator in a cell, or a cut row: no cell is guessed
                        yield n, ItemFailure("invalid_row", "read", f"row {n} has {cells} cells, the header "
                                             f"{width}{' (quote cells that hold the separator)' if cells > width else ''}"), None
                        continue
                    yield n, row[column] if column else None, row[id_column] if id_column else None
            except csv.Error as exc:
                why = (f"a cell over {MAX_RECORD_CHARS} characters" if "field limit" in str(exc) else
                       f"{exc} (a quote that opens a cell must close it, and a closing quote must end the cell)")
                raise UnsupportedInputError(
                    f"{display(path.name)} is not valid CSV in the row starting at line {reader.line_num + 1}: {why}; "
                    "no row was guessed") from exc
    elif suffix == ".jsonl":
        with open(path, "rb") as f:
            n = 0
            while raw := f.readline(MAX_RECORD_CHARS + 1):
                n += 1
                if len(raw) > MAX_RECORD_CHARS and not raw.endswith(b"\n"):
                    while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                        pass  # skipped unread: bounded memory
                    yield n, ItemFailure("too_large", "read", f"line {n} is over {MAX_RECORD_CHARS} bytes"), None
                    continue
                line = raw.decode("utf-8", "surrogateescape")
                if n == 1:
                    line = line.removeprefix("\ufeff")
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as exc:
                    why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                    yield n, ItemFailure("invalid_json", "read", f"line {n} is not JSON: {why}"), None
                    continue
                if not isinstance(record, dict):
                    yield n, ItemFailure("invalid_json", "read", f"line {n} is a JSON {type(record).__name__}, "
                                         "not an object"), None
                    continue
                yield n, record.get(column), record.get(id_column) if id_column else None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        with open(path, "rb") as handle:  # a file object: pyarrow cannot name non-UTF-8 paths
            parquet = pq.ParquetFile(handle)
            _check_columns(path, parquet.schema_arrow.names, column, id_column)
            columns = [column or parquet.schema_arrow.names[0]] + ([id_column] if id_column else [])
            n = 0
            for batch in parquet.iter_batches(batch_size=4096, columns=columns):
                values = batch.column(0).to_pylist()
                keys = batch.column(1).to_pylist() if id_column else [None] * len(values)
                for value, key in zip(values, keys):
                    n += 1
                    yield n, value, key
    else:
        raise UnsupportedInputError(f"unsupported table {display(path.name)}: use {', '.join(TABLES)}")


def _limited(f: Any, path: Path) -> Iterator[str]:
    """The lines of a text file, refusing (before reading it whole) one over ``MAX_RECORD_CHARS``."""
    n = 0
    while line := f.readline(MAX_RECORD_CHARS + 1):
        n += 1
        if len(line) > MAX_RECORD_CHARS:
            raise UnsupportedInputError(
                f"{display(path.name)} line {n} is over {MAX_RECORD_CHARS} characters; split it, or use a .txt "
                "(one text per line, read in bounded memory)")
        yield line


def _check_columns(path: Path, names: Sequence[str], column: str, id_column: str | None) -> None:
    for wanted in (column, id_column):
        if wanted and wanted not in names:
            raise UnsupportedInputError(
                f"{display(path.name)} has no column {wanted!r}; columns: {', '.join(names)} "
                "(pass column= / id_column=; on the command line --column / --id-column)")
