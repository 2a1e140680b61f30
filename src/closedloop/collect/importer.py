"""Table imports: rows of CSV or Parquet files, or of a database table that Ibis can read
(``ENGINE_URL#TABLE``), become Segment messages, one per row.

A shop's order export or a CRM's member list arrives as a table, not as events. The
``mapping`` of an ``ImportSpec`` says which columns hold the identity, the time and the
properties or traits; each row is then turned into the message a Segment library would have
sent and goes through the *same* gate (``validate_message``) and the *same* intake (dedup by
messageId, failed events, a ``loads`` row) as a JSONL file. The messageId is built from the
row's own key columns (``{import name}:{values}``), so re-importing a file — or a later
export that repeats old rows — adds only the rows not seen before. The same makes an import
killed half-way resumable: run it again, and the rows already written are duplicates.

Everything that can be checked without reading the data (the file exists, it has every mapped
column) is checked before anything is written: a wrong mapping must fail as a whole, not
after half the rows were loaded. Problems of single rows (a bad time, no identity) do not stop
the import; those rows land in ``failed_events`` at ``path:row N`` (N counts data rows from 1,
the header excluded).

CSV cells are read as text, never type-guessed: leading zeros of member numbers and the
``+86`` of phone numbers must survive. Only properties that are amounts or counts by name
(``NUMERIC_PROPERTIES``: revenue, price, quantity, ...) are turned into numbers, so that
``properties.revenue`` means the same in an imported order as in a tracked one.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import functools
import gzip
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from closedloop.collect.loader import (
    ChunkBuilder,
    Intake,
    LoadResult,
    Progress,
    gc_paused,
    load_jsonl,
)
from closedloop.collect.messages import Reason, parse_number
from closedloop.core.clock import Clock
from closedloop.core.definitions import ImportFormat, ImportMapping, ImportSpec, Source
from closedloop.core.engine import Engine
from closedloop.core.errors import InputError

#: Property names that hold amounts or counts in Segment's e-commerce spec (and ``amount``,
#: the usual column name for them): text cells that parse as numbers become floats.
NUMERIC_PROPERTIES = frozenset(
    {
        "revenue",
        "total",
        "subtotal",
        "value",
        "price",
        "quantity",
        "tax",
        "shipping",
        "discount",
        "amount",
    }
)

SUFFIXES = {
    ImportFormat.CSV: (".csv", ".csv.gz", ".csv.bz2"),
    ImportFormat.PARQUET: (".parquet", ".parq", ".pq"),
}
CSV_BLOCK_BYTES = 4 * 1024 * 1024


def import_table(
    engine: Engine,
    path: Path,
    spec: ImportSpec,
    source: Source,
    *,
    progress: Progress | None = None,
    chunk_rows: int = 100_000,
    clock: Clock | None = None,
) -> LoadResult:
    """Import a CSV or Parquet file (or a folder of them) as Segment messages.

    Raises ``InputError`` — before writing anything — when a file is missing or unreadable
    or lacks a mapped column. ``segment_jsonl`` specs are handed to ``load_jsonl``.
    """
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be at least 1")
    if spec.format is ImportFormat.SEGMENT_JSONL:
        return load_jsonl(
            engine,
            [path],
            source,
            import_name=spec.name,
            progress=progress,
            chunk_rows=chunk_rows,
            clock=clock,
        )
    mapping = spec.mapping
    if mapping is None:
        raise InputError(f"import {spec.name!r}: a {spec.format.value} import needs a `mapping`")
    files = _table_files(Path(path), spec.format)
    needed = sorted(mapping.columns())
    problems = []
    for f in files:
        names = _column_names(f, spec.format)
        missing = [c for c in needed if c not in names]
        if missing:
            shown = ", ".join(names[:30]) + (
                f", … ({len(names)} in all)" if len(names) > 30 else ""
            )
            problems.append(
                f"{f}: missing column(s) {', '.join(missing)} named in the mapping of import "
                f"{spec.name!r} (the file has: {shown or 'no columns'})"
            )
    if problems:
        raise InputError("; ".join(problems))

    intake = Intake(
        engine,
        source,
        import_name=spec.name,
        location=str(path),
        clock=clock,
        progress=progress,
    )
    builder = intake.builder()
    rows = _RowMessages(spec.name, mapping)
    with gc_paused():
        for f in files:
            reader = _read_csv if spec.format is ImportFormat.CSV else _read_parquet
            for batch in reader(f, needed, chunk_rows):
                for broken in batch.broken:
                    builder.fail(Reason.MALFORMED, broken.reason, broken.location, broken.text)
                rows.offer(builder, f"{f}:row ", batch)
                if builder.pending >= chunk_rows:
                    intake.write(builder.take())
        if builder.pending:
            intake.write(builder.take())
    return intake.finish()


# ---- tables of a database -----------------------------------------------------------------
def is_table_ref(text: str) -> bool:
    """True for ``ENGINE_URL#TABLE`` (a database table), false for a file path."""
    url, sep, table = text.rpartition("#")
    return bool(sep and table and "://" in url)


def open_table_ref(text: str) -> tuple[Any, Any]:
    """``(connection, table)`` for ``ENGINE_URL#TABLE``, connected read-only where possible.

    DuckDB files are opened read-only, so an import never writes to — or locks for writing —
    a shop's own database; a ``schema.table`` name reads that schema (PostgreSQL).
    """
    import ibis

    url, _, name = text.rpartition("#")
    try:
        if url.startswith("duckdb://"):
            # Ibis's form: duckdb:///relative.duckdb, duckdb:////absolute/path.duckdb
            path = url[len("duckdb:///") :] if url.startswith("duckdb:///") else ""
            if not path or not Path(path).is_file():
                raise InputError(f"{text}: no DuckDB database file at {path or '(none)'}")
            con = ibis.duckdb.connect(path, read_only=True)
        else:
            con = ibis.connect(url)
    except InputError:
        raise
    except Exception as e:  # any backend's connection error, said plainly
        raise InputError(f"{text}: cannot connect to {url} ({type(e).__name__}: {e})") from None
    schema, _, table = name.rpartition(".")
    try:
        t = con.table(table, database=schema) if schema else con.table(table)
    except Exception as e:
        with contextlib.suppress(Exception):
            con.disconnect()
        raise InputError(f"{text}: no table {name!r} in {url} ({type(e).__name__})") from None
    return con, t


def import_ibis_table(
    engine: Engine,
    table: Any,
    spec: ImportSpec,
    source: Source,
    *,
    location: str,
    progress: Progress | None = None,
    chunk_rows: int = 100_000,
    clock: Clock | None = None,
) -> LoadResult:
    """Import the rows of an Ibis table (of any backend) as Segment messages.

    Rows are read in the order of the mapping's ``message_id_from`` columns, so a row's
    number — its place in failed events, ``TABLE:row N`` — is the same on every run, and a
    re-run finds the same failures (their ids derive from place and content) and adds nothing.
    Memory stays bounded by ``chunk_rows``: the backend streams Arrow batches.
    """
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be at least 1")
    mapping = spec.mapping
    if mapping is None:
        raise InputError(f"import {spec.name!r}: a table import needs a `mapping`")
    needed = sorted(mapping.columns())
    names = list(table.columns)
    missing = [c for c in needed if c not in names]
    if missing:
        raise InputError(
            f"{location}: missing column(s) {', '.join(missing)} named in the mapping of import "
            f"{spec.name!r} (the table has: {', '.join(names[:30]) or 'no columns'})"
        )
    expr = table.select(needed).order_by(list(mapping.message_id_from))
    intake = Intake(
        engine, source, import_name=spec.name, location=location, clock=clock, progress=progress
    )
    builder = intake.builder()
    rows = _RowMessages(spec.name, mapping)
    first = 1
    with gc_paused():
        try:
            batches = expr.to_pyarrow_batches(chunk_size=chunk_rows)
            for rb in batches:
                n = rb.num_rows
                columns = {c: rb.column(c).to_pylist() for c in needed}
                rows.offer(builder, f"{location}:row ", _Batch(columns, range(first, first + n)))
                first += n
                if builder.pending >= chunk_rows:
                    intake.write(builder.take())
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{location}: cannot read the table ({e})") from None
        if builder.pending:
            intake.write(builder.take())
    return intake.finish()


# ---- files and columns --------------------------------------------------------------------
def _table_files(path: Path, fmt: ImportFormat) -> list[Path]:
    suffixes = SUFFIXES[fmt]
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(suffixes))
        if not files:
            raise InputError(f"{path}: folder holds no {'/'.join(suffixes)} files")
        return files
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    return [path]


def _column_names(path: Path, fmt: ImportFormat) -> list[str]:
    """The columns of a file, read from its header or footer only."""
    if fmt is ImportFormat.PARQUET:
        try:
            names: list[str] = pq.ParquetFile(path).schema_arrow.names
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{path}: not a readable Parquet file ({e})") from None
        return names
    opener: Callable[..., Any] = open
    if path.name.endswith(".gz"):
        opener = gzip.open
    elif path.name.endswith(".bz2"):
        opener = bz2.open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), None)
    except (UnicodeDecodeError, OSError, csv.Error) as e:
        raise InputError(f"{path}: cannot read the CSV header ({e}); is it UTF-8?") from None
    if not header:
        raise InputError(f"{path}: the file is empty; expected a header row")
    return header


# ---- reading ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Broken:
    """A CSV row that could not be split into the header's columns."""

    location: str
    reason: str
    text: str


@dataclass
class _Batch:
    """Rows of one file: column values by name, the 1-based number of each row, broken rows."""

    columns: dict[str, list[Any]]
    numbers: Sequence[int]
    broken: list[_Broken] = field(default_factory=list)


def _read_parquet(path: Path, needed: list[str], chunk_rows: int) -> Iterator[_Batch]:
    try:
        pf = pq.ParquetFile(path)
        first = 1
        for rb in pf.iter_batches(batch_size=chunk_rows, columns=needed):
            n = rb.num_rows
            columns = {c: rb.column(c).to_pylist() for c in needed}
            yield _Batch(columns, range(first, first + n))
            first += n
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: cannot read the Parquet file ({e})") from None


def _read_csv(path: Path, needed: list[str], chunk_rows: int) -> Iterator[_Batch]:
    """Batches of text cells; rows with the wrong number of fields come out as ``broken``.

    Arrow reports a broken row through a callback, with its number (header = 1, blank lines
    not counted) when it reads serially, and skips it. The callback runs while a block is
    parsed — possibly a block ahead of the batch being handed out — so broken row numbers
    are collected as they come, and good rows are numbered stepping over them. Every row,
    good or broken, is thereby named by its data row number.
    """
    reported: list[tuple[int | None, str, str]] = []

    def on_invalid(row: Any) -> str:
        reason = f"row has {row.actual_columns} fields; the header has {row.expected_columns}"
        reported.append((row.number, reason, str(row.text)))
        return "skip"

    try:
        reader = pacsv.open_csv(
            path,
            # Serial reading is what makes Arrow report the numbers of broken rows.
            read_options=pacsv.ReadOptions(use_threads=False, block_size=CSV_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(
                newlines_in_values=True, invalid_row_handler=on_invalid
            ),
            convert_options=pacsv.ConvertOptions(
                include_columns=needed,
                column_types={c: pa.string() for c in needed},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
        next_row = 1  # the data row number the next good row gets
        skip: set[int] = set()  # broken data rows not yet stepped over
        for rb in _then_empty(reader, needed):
            broken = []
            for number, reason, text in reported:
                if number is None:  # pragma: no cover - only when Arrow reads in parallel
                    broken.append(_Broken(f"{path}:near row {next_row}", reason, text))
                else:
                    skip.add(number - 1)
                    broken.append(_Broken(f"{path}:row {number - 1}", reason, text))
            reported.clear()
            numbers: list[int] = []
            while len(numbers) < rb.num_rows:
                if next_row in skip:
                    skip.discard(next_row)
                else:
                    numbers.append(next_row)
                next_row += 1
            columns = {c: rb.column(c).to_pylist() for c in needed}
            yield _Batch(columns, numbers, broken)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: cannot read the CSV file ({e})") from None


def _then_empty(reader: Any, needed: list[str]) -> Iterator[Any]:
    """The reader's batches, then one empty batch so broken rows at the very end are seen."""
    yield from reader
    yield pa.RecordBatch.from_pydict({c: pa.array([], pa.string()) for c in needed})


# ---- rows into messages -------------------------------------------------------------------
def _cell(value: Any) -> Any:
    """A cell as a JSON value: empty text and NaN are missing; times become ISO 8601 text."""
    if value is None:
        return None
    if isinstance(value, str):
        return None if not value or value.isspace() else value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _id_part(value: Any) -> str | None:
    """One column's contribution to a messageId: text as-is, 123.0 written as 123."""
    value = _cell(value)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _row_payload(columns: dict[str, list[Any]], i: int) -> str:
    """The mapped cells of one row as JSON: what a failed row keeps for repair."""
    return json.dumps({c: v[i] for c, v in columns.items()}, default=str, ensure_ascii=False)


class _RowMessages:
    """Turns the rows of a batch into Segment messages, as the mapping says."""

    def __init__(self, import_name: str, mapping: ImportMapping) -> None:
        self.prefix = f"{import_name}:"
        self.m = mapping

    def offer(self, builder: ChunkBuilder, place: str, batch: _Batch) -> None:
        m = self.m
        cols = batch.columns
        ts_col = cols[m.timestamp]
        id_cols = [(c, cols[c]) for c in m.message_id_from]
        uid_col = cols[m.user_id] if m.user_id else None
        aid_col = cols[m.anonymous_id] if m.anonymous_id else None
        props = [(name, cols[c], name in NUMERIC_PROPERTIES) for name, c in m.properties.items()]
        traits = [(name, cols[c]) for name, c in m.traits.items()]
        track = m.type == "track"
        for i, number in enumerate(batch.numbers):
            payload = functools.partial(_row_payload, cols, i)
            timestamp = _cell(ts_col[i])
            if timestamp is None:
                reason = f"row has no time: column `{m.timestamp}` is empty"
                builder.fail(Reason.MISSING_FIELD, reason, f"{place}{number}", payload)
                continue
            parts = [_id_part(values[i]) for _, values in id_cols]
            if None in parts:
                empty = id_cols[parts.index(None)][0]
                reason = f"row has no messageId: column `{empty}` (in message_id_from) is empty"
                builder.fail(Reason.MISSING_FIELD, reason, f"{place}{number}", payload)
                continue
            msg: dict[str, Any] = {
                "type": m.type,
                "messageId": self.prefix + "|".join(cast(list[str], parts)),
                "timestamp": timestamp,
            }
            if track:
                msg["event"] = m.event
            if uid_col is not None and (uid := _cell(uid_col[i])) is not None:
                msg["userId"] = uid
            if aid_col is not None and (aid := _cell(aid_col[i])) is not None:
                msg["anonymousId"] = aid
            properties = {}
            for name, values, numeric in props:
                value = _cell(values[i])
                if value is None:
                    continue
                if numeric and isinstance(value, str):
                    number_value = parse_number(value)
                    if number_value is not None:
                        value = number_value
                properties[name] = value
            if properties:
                msg["properties"] = properties
            row_traits = {}
            for name, values in traits:
                value = _cell(values[i])
                if value is not None:
                    row_traits[name] = value
            if row_traits:
                # identify carries the user's traits itself; other calls in context.traits.
                if track:
                    msg["context"] = {"traits": row_traits}
                else:
                    msg["traits"] = row_traits
            builder.offer(msg, place, number, payload)
