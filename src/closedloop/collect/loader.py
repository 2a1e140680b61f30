"""The loader: Segment JSONL files into the event log, idempotently, in bounded memory.

Input is read in blocks of whole lines and cut into chunks of at most ``chunk_rows`` lines.
Each line goes through ``validate_message`` — the same gate the HTTP collector uses. Per
chunk the loader

1. drops messages whose ``messageId`` was already seen in the chunk or is already stored in
   ``events`` (a semi-join inside the warehouse against the chunk's ids, so memory stays
   bounded by the chunk, not by the size of the event log);
2. appends the new messages' external ids, then the messages, then the failures. External
   ids go first so that a crash between the two writes is repaired by re-running: the
   messages are then new again, and their external ids, anti-joined on their key, are not
   written twice;
3. reports progress.

At the end one ``loads`` row records the counts, which always add up:
``received = accepted + failed + duplicate``. Re-running a load writes nothing new to
``events``, ``event_external_ids`` or ``failed_events`` (a failure's id is derived from its
place and content); it records one more ``loads`` row saying everything was a duplicate.

Two halves, so that both the JSONL loader and the table importer share them:
``ChunkBuilder`` turns messages into Arrow tables (pure Python + pyarrow, no warehouse), and
``Intake`` writes built chunks to the warehouse and keeps the counts.
"""

from __future__ import annotations

import gc
import gzip
import io
import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import ibis
import pyarrow as pa
import pyarrow.compute as pc

import closedloop.collect.tables as tables
from closedloop.collect.messages import (
    EVENT_COLUMNS,
    EXTERNAL_ID_COLUMNS,
    FAILED_COLUMNS,
    MAX_MESSAGE_BYTES,
    MAX_PAYLOAD_BYTES,
    AcceptedMessage,
    Reason,
    RejectedMessage,
    check_message,
    failure_row,
)
from closedloop.core.catalogue import TableSpec
from closedloop.core.clock import Clock
from closedloop.core.definitions import Source
from closedloop.core.engine import Engine
from closedloop.core.errors import InputError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")
BLOCK_BYTES = 16 * 1024 * 1024  # read size; a line longer than this is refused unread
_BOM = b"\xef\xbb\xbf"
# Chunk columns come from the system allocator: building them with Arrow's default pool
# (mimalloc in these wheels) made whole loads ~8% slower when measured on this machine.
_POOL = pa.system_memory_pool()

Progress = Callable[[int], None]
Payload = bytes | str | Callable[[], str]


@dataclass(frozen=True)
class LoadResult:
    """What one load did; ``received == accepted + failed + duplicate`` always holds."""

    received: int
    accepted: int
    failed: int
    duplicate: int
    load_id: str

    def __add__(self, other: LoadResult) -> LoadResult:
        """Several loads reported as one (an import of many files): counts summed, ids listed."""
        return LoadResult(
            received=self.received + other.received,
            accepted=self.accepted + other.accepted,
            failed=self.failed + other.failed,
            duplicate=self.duplicate + other.duplicate,
            load_id=f"{self.load_id},{other.load_id}",
        )


def _arrow_schema(spec: TableSpec, order: Sequence[str]) -> pa.Schema:
    """The Arrow schema of a declared table, with its columns in ``order``."""
    declared = spec.schema.to_pyarrow()
    return pa.schema([declared.field(c) for c in order])


def payload_text(payload: bytes | str) -> str:
    """Raw input as text, bad UTF-8 replaced rather than refused (``failure_row`` cuts it).

    A raw line is cut to the limit before decoding, so a 100 MB line of garbage is not
    decoded whole just to keep its first 64 KB.
    """
    if isinstance(payload, str):
        return payload
    return payload[: MAX_PAYLOAD_BYTES + 4].decode("utf-8", "replace")


def new_load_id(started_at: datetime) -> str:
    """A load id that sorts by start time and is unique even for loads started together."""
    return f"ld_{started_at:%Y%m%dT%H%M%S}_{uuid.uuid4().hex[:8]}"


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a load runs.

    Parsing allocates millions of short-lived dicts and lists; each allocation burst makes
    the collector walk every live container, which costs about a quarter of the load time.
    Parsed JSON holds no reference cycles, so nothing is lost by collecting afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# ---- building chunks (no warehouse) -------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    """Validated input ready to write: events deduplicated within the chunk, failures keyed."""

    received: int
    failed: int
    duplicate: int
    events: pa.Table
    external_ids: pa.Table
    failures: pa.Table


class ChunkBuilder:
    """Collects messages of one chunk and turns them into Arrow tables, column by column."""

    def __init__(self, source: Source, *, load_id: str, received_at: datetime) -> None:
        self.source = source
        self.load_id = load_id
        self.received_at = received_at
        self.pending = 0  # received into the current chunk
        self._reset()
        self._events_schema = _arrow_schema(tables.EVENTS, EVENT_COLUMNS)
        self._external_schema = _arrow_schema(tables.EVENT_EXTERNAL_IDS, EXTERNAL_ID_COLUMNS)
        self._failed_schema = _arrow_schema(tables.FAILED_EVENTS, FAILED_COLUMNS)

    def _reset(self) -> None:
        self.pending = 0
        self._failed = 0
        self._duplicate = 0
        self._rows: list[tuple[Any, ...]] = []
        self._external: list[dict[str, str | None]] = []
        self._failures: dict[str, dict[str, Any]] = {}
        self._seen: set[str] = set()  # message ids of this chunk only

    def offer(
        self, raw: object, place: str, number: int, payload: Payload, size: int | None = None
    ) -> None:
        """Validate one parsed message and queue it, or its failure at ``{place}{number}``.

        The location string is only built for a refused message, and ``payload`` (the raw
        input kept with a failure) may be a callable so that it too is only built then.
        """
        self.pending += 1
        result = check_message(raw, self.source, self.received_at, self.load_id, size)
        if isinstance(result, AcceptedMessage):
            mid = result.message_id
            if mid in self._seen:
                self._duplicate += 1
                return
            self._seen.add(mid)
            self._rows.append(result.values)
            if result.external_ids:
                self._external.extend(result.external_ids)
        else:
            rejected = RejectedMessage(
                result.reason_code, result.reason, f"{place}{number}", result.message_id
            )
            self._queue_failure(rejected, payload)

    def fail(
        self,
        code: Reason,
        reason: str,
        location: str,
        payload: Payload,
        message_id: str | None = None,
    ) -> None:
        """Record input that never became a message (an unparseable line, a broken row)."""
        self.pending += 1
        self._queue_failure(RejectedMessage(code, reason, location, message_id), payload)

    def _queue_failure(self, rejected: RejectedMessage, payload: Payload) -> None:
        self._failed += 1
        text = payload_text(payload() if callable(payload) else payload)
        row = failure_row(
            rejected,
            source=self.source.name,
            payload=text,
            failed_at=self.received_at,
            load_id=self.load_id,
        )
        self._failures[row["failure_id"]] = row

    def take(self) -> Chunk:
        """The queued chunk as Arrow tables; the builder starts a new chunk."""
        columns = list(zip(*self._rows, strict=True)) if self._rows else [()] * len(EVENT_COLUMNS)
        events = pa.Table.from_arrays(
            [
                pa.array(col, type=f.type, memory_pool=_POOL)
                for col, f in zip(columns, self._events_schema, strict=True)
            ],
            schema=self._events_schema,
        )
        chunk = Chunk(
            received=self.pending,
            failed=self._failed,
            duplicate=self._duplicate,
            events=events,
            external_ids=pa.Table.from_pylist(self._external, schema=self._external_schema),
            failures=pa.Table.from_pylist(
                list(self._failures.values()), schema=self._failed_schema
            ),
        )
        self._reset()
        return chunk


# ---- writing chunks -----------------------------------------------------------------------
class Intake:
    """One load in progress: writes chunks, deduplicating against the warehouse, and counts.

    Everything that reaches the warehouse from a file or a table goes through here, so the
    dedup rule and the accounting are written once.
    """

    def __init__(
        self,
        engine: Engine,
        source: Source,
        *,
        import_name: str,
        location: str,
        clock: Clock | None = None,
        progress: Progress | None = None,
        dedup_window: timedelta | None = None,
    ) -> None:
        self.engine = engine
        self.source = source
        # None: a messageId is a duplicate of any stored event, forever. A window limits
        # the look-back to events received within it (cheaper on a huge log; a replay of
        # something older than the window is then loaded again).
        self.dedup_window = dedup_window
        self.import_name = import_name
        self.location = location
        self.clock = clock or Clock()
        self.progress = progress
        self.started_at = self.clock.now()
        self.load_id = new_load_id(self.started_at)
        self.received = self.accepted = self.failed = self.duplicate = 0

    def builder(self) -> ChunkBuilder:
        return ChunkBuilder(self.source, load_id=self.load_id, received_at=self.started_at)

    def write(self, chunk: Chunk) -> None:
        """Append the chunk's new external ids, events and failures; update the counts."""
        engine = self.engine
        events = chunk.events
        duplicate = chunk.duplicate
        found = pa.array([], pa.string())
        if events.num_rows:
            # Ids of this chunk the warehouse already holds: at most one chunk's worth comes
            # back, whatever the size of the event log.
            with engine.temporary(events.select(["message_id"])) as ids:
                stored = engine.table("events")
                if self.dedup_window is not None:
                    cutoff = self.clock.now() - self.dedup_window
                    stored = stored.filter(stored.received_at >= cutoff)
                semi = ids.semi_join(stored, "message_id")
                found = engine.to_arrow(semi)["message_id"].combine_chunks()
            if len(found):
                events = events.filter(pc.invert(pc.is_in(events["message_id"], value_set=found)))
                duplicate += chunk.events.num_rows - events.num_rows
        external = chunk.external_ids
        if external.num_rows and len(found):
            external = external.filter(pc.invert(pc.is_in(external["message_id"], value_set=found)))
        if external.num_rows:
            with engine.temporary(external) as new:
                stored = engine.table("event_external_ids")
                key = list(tables.EVENT_EXTERNAL_IDS.key)
                engine.append("event_external_ids", new.anti_join(stored, key))
        if events.num_rows:
            with engine.temporary(events) as new:
                engine.append("events", new)
        if chunk.failures.num_rows:
            with engine.temporary(chunk.failures) as new:
                stored = engine.table("failed_events")
                engine.append("failed_events", new.anti_join(stored, "failure_id"))
        self.received += chunk.received
        self.accepted += events.num_rows
        self.failed += chunk.failed
        self.duplicate += duplicate
        if self.progress is not None and chunk.received:
            self.progress(chunk.received)
        # While gc_paused() holds the collector off, free the young cycles the query
        # expressions above leave behind; cheap, since the chunk's rows are already gone.
        gc.collect(0)

    def finish(self) -> LoadResult:
        """Record the load in ``loads`` and return its counts."""
        result = LoadResult(
            received=self.received,
            accepted=self.accepted,
            failed=self.failed,
            duplicate=self.duplicate,
            load_id=self.load_id,
        )
        if result.received != result.accepted + result.failed + result.duplicate:
            raise AssertionError(f"load {self.load_id}: counts do not add up: {result}")
        row = {
            "load_id": self.load_id,
            "import_name": self.import_name,
            "source": self.source.name,
            "location": self.location,
            "received": result.received,
            "accepted": result.accepted,
            "failed": result.failed,
            "duplicate": result.duplicate,
            "started_at": self.started_at,
            "finished_at": self.clock.now(),
        }
        schema = tables.LOADS.schema.to_pyarrow()
        with self.engine.temporary(pa.Table.from_pylist([row], schema=schema)) as new:
            self.engine.append("loads", new)
        return result


# ---- JSONL --------------------------------------------------------------------------------
def jsonl_files(paths: Sequence[Path]) -> list[Path]:
    """The files to load: each path, or the JSONL files of a folder in name order.

    Every path is checked before anything is read, so a typo in the last of ten paths does
    not leave nine loaded and one missing.
    """
    files: list[Path] = []
    problems: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f for f in p.iterdir() if f.is_file() and f.name.endswith(JSONL_SUFFIXES)
            )
            if not found:
                problems.append(f"{p}: folder holds no {'/'.join(JSONL_SUFFIXES)} files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            problems.append(f"{p}: no such file")
    if problems:
        raise InputError("; ".join(problems))
    return files


def _open(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _blocks(path: Path, block_bytes: int) -> Iterator[tuple[int, bytes, bool]]:
    """Whole-line blocks of a file: ``(number of the first line, block, over_long)``.

    Memory stays bounded by about two blocks whatever the file holds: a line longer than a
    whole block — no valid message is; the limit is 32 KB — is not accumulated but comes
    alone, cut to its first 64 KB (kept as the failure's payload), with ``over_long`` set.
    """
    with _open(path) as f:
        line = 1
        rest = b""
        while data := f.read(block_bytes):
            if rest:
                data = rest + data
                rest = b""
            cut = data.rfind(b"\n") + 1
            if cut == 0 and len(data) < block_bytes:  # only at the end of the file
                rest = data
                continue
            if cut == 0:
                head = data[: MAX_PAYLOAD_BYTES + 4]
                while more := f.read(block_bytes):  # skip to the end of the line
                    newline = more.find(b"\n")
                    if newline >= 0:
                        rest = more[newline + 1 :]
                        break
                yield line, head, True
                line += 1
                continue
            block, rest = data[:cut], data[cut:]
            yield line, block, False
            line += block.count(b"\n")
        if rest:
            yield line, rest, False


# The C scanner behind json.loads, called directly: json.loads' own wrapping (type checks,
# encoding detection, whitespace regexes) costs as much as scanning a short message.
_scan = cast(Callable[[str, int], tuple[Any, int]], vars(json.JSONDecoder())["scan_once"])


def parse_line(line: bytes) -> object:
    """One JSON value from a stripped line; raises ValueError (or RecursionError) if it is not."""
    text = line.decode("utf-8")
    try:
        value, end = _scan(text, 0)
    except StopIteration as e:
        raise json.JSONDecodeError("Expecting value", text, e.value) from None
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def _parse_block(
    builder: ChunkBuilder,
    name: str,
    first_line: int,
    block: bytes,
    chunk_rows: int,
    over_long: bool = False,
) -> Iterator[Chunk]:
    """Validate the lines of one block, yielding a chunk whenever ``chunk_rows`` are queued.

    An ``over_long`` block is the head of a single line too long to be a message.
    """
    place = f"{name}:"
    if over_long:
        reason = (
            f"line is longer than {BLOCK_BYTES:,} bytes; "
            f"a message may have at most {MAX_MESSAGE_BYTES:,}"
        )
        builder.fail(Reason.TOO_LARGE, reason, f"{place}{first_line}", block)
        if builder.pending >= chunk_rows:
            yield builder.take()
        return
    offer = builder.offer
    for number, line in enumerate(block.split(b"\n"), first_line):
        line = line.strip()
        if not line:
            continue
        if number == 1 and line.startswith(_BOM):
            line = line[len(_BOM) :].strip()
        try:
            raw = parse_line(line)
        except UnicodeDecodeError:
            builder.fail(Reason.MALFORMED, "line is not UTF-8 text", f"{place}{number}", line)
        except json.JSONDecodeError as e:
            reason = f"line is not JSON: {e.msg} at column {e.colno}"
            builder.fail(Reason.MALFORMED, reason, f"{place}{number}", line)
        except (ValueError, RecursionError) as e:  # an integer of 5,000 digits, deep nesting
            reason = f"line is not usable JSON: {e}"
            builder.fail(Reason.MALFORMED, reason, f"{place}{number}", line)
        else:
            offer(raw, place, number, line, len(line))
        if builder.pending >= chunk_rows:
            yield builder.take()


def load_jsonl(
    engine: Engine,
    paths: Sequence[Path],
    source: Source,
    *,
    import_name: str,
    progress: Progress | None = None,
    chunk_rows: int = 50_000,
    clock: Clock | None = None,
) -> LoadResult:
    """Load Segment messages, one JSON object per line, from ``paths`` into ``events``.

    A path may be a folder (its ``.jsonl``/``.ndjson``/``.json`` files, optionally gzipped,
    in name order). Blank lines are skipped and not counted; every other line is received
    and ends up accepted, failed (kept in ``failed_events`` at ``path:LINE``) or duplicate.
    ``progress`` is called after each chunk with the number of lines received in it.
    """
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be at least 1")
    if isinstance(paths, str | Path):  # one path, not a sequence of one-letter paths
        paths = [Path(paths)]
    files = jsonl_files(paths)
    intake = Intake(
        engine,
        source,
        import_name=import_name,
        location=", ".join(str(p) for p in paths),
        clock=clock,
        progress=progress,
    )
    builder = intake.builder()
    with gc_paused():
        for path in files:
            for first_line, block, over_long in _blocks(path, BLOCK_BYTES):
                chunks = _parse_block(builder, str(path), first_line, block, chunk_rows, over_long)
                for chunk in chunks:
                    intake.write(chunk)
        if builder.pending:
            intake.write(builder.take())
    return intake.finish()


def list_failed(
    engine: Engine,
    *,
    source: str | None = None,
    reason: Reason | str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The most recent failed events, optionally of one source and one reason code."""
    t = engine.table("failed_events")
    if source is not None:
        t = t.filter(t.source == source)
    if reason is not None:
        t = t.filter(t.reason_code == str(reason))
    t = t.order_by([ibis.desc("failed_at"), "load_id", "location"]).limit(limit)
    rows: list[dict[str, Any]] = engine.to_arrow(t).to_pylist()
    return rows
