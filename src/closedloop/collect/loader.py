"""The loader: Segment JSONL files into the event log, idempotently, in bounded memory.

Input is read in blocks of whole lines and cut into chunks of at most ``chunk_rows`` lines.
Each line goes through ``validate_message`` — the same gate the HTTP collector uses. Per
chunk the loader

1. drops messages whose ``messageId`` was already seen in the chunk or was written before
   (within ``dedup_window``, forever by default): on an engine with transactions by probing
   the key index (``intake_keys``, see "the key index" below), whose cost per chunk does
   not grow with the event log; elsewhere (Spark) by a semi-join against ``events``;
2. writes the new messages, their external ids, their keys and the new failures — in one
   transaction, so a crash leaves all or nothing and re-running repairs it;
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
import math
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from hashlib import blake2b
from pathlib import Path
from typing import Any, cast

import ibis
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import sqlglot as sg
import sqlglot.expressions as sge

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


# ---- the key index: exactly-once without reading the event log -----------------------------
# Semi-joining each chunk's ids against the whole ``events`` table makes every chunk cost a
# scan of the log: loading N events costs O(N²/chunk). ``intake_keys`` instead holds one
# 96-bit hash per messageId (and per failure id) written, and every writer process keeps
# those hashes in a vectorised hash table (``KeyTable``), so a chunk is probed in a few numpy
# passes over the chunk, whatever the size of the log. The table in the warehouse is the
# truth; the process's copy is read whole once (at its first write), then kept in step by
# reading only rows of writes it has not seen (``seq`` above its high-water mark). Keys,
# events, external ids and failures of a chunk are written in ONE transaction, so a crash
# anywhere leaves all of them or none, and a writer lock (a process lock, and PostgreSQL's
# advisory lock) makes "probe, then write" atomic among writers.
# Rejected by measurement on this machine: DuckDB's ART primary key with ``INSERT .. ON
# CONFLICT DO NOTHING RETURNING`` cost 0.33-0.42 s per 50,000-row chunk already at 2M keys
# (a semi-join of the same chunk: 0.07-0.1 s) and 8-12 µs per key to build; random ids
# leave zone maps (hash buckets, month partitions) nothing to prune for a 50,000-id probe.
# bench/dedup.py: per-chunk cost at 1M, 5M and 20M events against the semi-join.
_MESSAGE = b"m"
_FAILURE = b"f"
_MAX_FILL = 0.7  # linear probing stays short below this fill
_KEY_DTYPE = np.dtype([("hi", ">i8"), ("lo", ">i4")])
_ADVISORY_LOCK = 0x636C5F6B657973  # PostgreSQL: one writer of intake_keys at a time
_Ints = npt.NDArray[np.int64]
_Ints32 = npt.NDArray[np.int32]
_Seconds = npt.NDArray[np.uint32]


def key_hashes(
    kind: bytes, ids: pa.Array | pa.ChunkedArray | Sequence[str]
) -> tuple[_Ints, _Ints32]:
    """The 96-bit keys of ``ids`` of one kind: blake2b of the id's UTF-8 bytes, personalised
    with the kind (so a message id and a failure id never share a key), as int64 and int32.

    96 bits make a collision among 10^10 ids about 10^-9 likely. Hashing happens here, not in
    SQL, so every backend (and a backend upgrade) computes the same keys.
    """
    if not isinstance(ids, pa.Array | pa.ChunkedArray):
        ids = pa.array(ids, pa.string())
    raw = ids.cast(pa.binary()).to_pylist()  # bytes straight from Arrow: no str, no encode
    digests = b"".join([blake2b(i, digest_size=12, person=kind).digest() for i in raw])
    pairs = np.frombuffer(digests, dtype=_KEY_DTYPE)
    return pairs["hi"].astype(np.int64), pairs["lo"].astype(np.int32)


def _seconds(times: pa.ChunkedArray | pa.Array) -> _Seconds:
    """Timestamps as whole seconds since 1970 (at least 1: 0 marks an empty slot)."""
    micros = pc.fill_null(times.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
    seconds: _Seconds = np.clip(micros // 1_000_000, 1, np.iinfo(np.uint32).max).astype(np.uint32)
    return seconds


class KeyTable:
    """A hash set of 96-bit keys, each with the second it was last received, in numpy arrays.

    Open addressing with linear probing, at most 70% full: a probe or an insert of n keys
    is a few vectorised passes over those n keys (each pass resolves most of the rest), so
    its cost does not depend on how many keys are held. A key's home slot is the top bits
    of its hash, so keys sorted by hash are in slot order: filling an empty table (a
    process's first read of ``intake_keys``, a growth) is one sort and one running maximum.
    16 bytes a slot: 20M keys take 0.5 GB (32M slots).
    """

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._alloc(capacity)
        self.size = 0

    def _alloc(self, keys: int) -> None:
        bits = max(4, (math.ceil(keys / _MAX_FILL) - 1).bit_length())  # a power of 2 slots
        self._hi: _Ints = np.zeros(1 << bits, np.int64)
        self._lo: _Ints32 = np.zeros(1 << bits, np.int32)
        self._at: _Seconds = np.zeros(1 << bits, np.uint32)
        self._mask = (1 << bits) - 1
        self._shift = np.uint64(64 - bits)

    def _home(self, hi: _Ints) -> _Ints:
        home: _Ints = (hi.view(np.uint64) >> self._shift).astype(np.int64)
        return home

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        return int(self._hi.nbytes + self._lo.nbytes + self._at.nbytes)

    def lookup(self, hi: _Ints, lo: _Ints32) -> _Seconds:
        """When each key was last received (seconds since 1970), 0 where never."""
        found: _Seconds = np.zeros(len(hi), np.uint32)
        todo = np.arange(len(hi))
        slot = self._home(hi)
        while todo.size:
            at = self._at[slot]
            used = at != 0
            hit = used & (self._hi[slot] == hi[todo]) & (self._lo[slot] == lo[todo])
            found[todo[hit]] = at[hit]
            more = used & ~hit
            todo, slot = todo[more], (slot[more] + 1) & self._mask
        return found

    def add(self, hi: _Ints, lo: _Ints32, at: _Seconds) -> None:
        """Insert keys; a key already held keeps the later of its two times."""
        if self.size + len(hi) > _MAX_FILL * len(self._at):
            old = self._at != 0
            hi = np.concatenate([self._hi[old], hi])
            lo = np.concatenate([self._lo[old], lo])
            at = np.concatenate([self._at[old], at])
            self._alloc(len(hi))  # at least twice the slots: amortised growth
            self.size = 0
        if self.size == 0:
            self._fill(hi, lo, at)
        else:
            self._place(hi, lo, at)

    def _fill(self, hi: _Ints, lo: _Ints32, at: _Seconds) -> None:
        """Fill the empty table: sorted by hash, slot i of the run holds max(home, i)."""
        order = np.argsort(hi.view(np.uint64))
        hi, lo, at = hi[order], lo[order], at[order]
        if len(hi) > 1 and (hi[1:] == hi[:-1]).any():
            # A key written twice (loaded again after its window) or, about never, two keys
            # sharing 64 bits: order by the whole key and keep each key once, latest time.
            order = np.lexsort((lo, hi.view(np.uint64)))
            hi, lo, at = hi[order], lo[order], at[order]
            starts = np.flatnonzero(
                np.concatenate([[True], (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])])
            )
            hi, lo, at = hi[starts], lo[starts], np.maximum.reduceat(at, starts)
        step = np.arange(len(hi))
        where = np.maximum.accumulate(self._home(hi) - step) + step if len(hi) else step
        fits = where <= self._mask
        self._hi[where[fits]], self._lo[where[fits]], self._at[where[fits]] = (
            hi[fits],
            lo[fits],
            at[fits],
        )
        self.size = int(fits.sum())
        if not fits.all():  # the run passed the last slot: those wrap round to the start
            self._place(hi[~fits], lo[~fits], at[~fits])

    def _place(self, hi: _Ints, lo: _Ints32, at: _Seconds) -> None:
        todo = np.arange(len(hi))
        slot = self._home(hi)
        while todo.size:
            now = self._at[slot]
            free = now == 0
            same = ~free & (self._hi[slot] == hi[todo]) & (self._lo[slot] == lo[todo])
            if same.any():
                np.maximum.at(self._at, slot[same], at[todo[same]])
            # Of several keys reaching one free slot the first takes it; the others look at
            # the same slot again (it may now hold their own key: a repeat in the batch).
            claim = np.flatnonzero(free)
            slots, first = np.unique(slot[claim], return_index=True)
            winners = todo[claim[first]]
            self._hi[slots], self._lo[slots], self._at[slots] = (
                hi[winners],
                lo[winners],
                at[winners],
            )
            self.size += len(winners)
            done = same
            done[claim[first]] = True
            slot = np.where(free | same, slot, (slot + 1) & self._mask)
            todo, slot = todo[~done], slot[~done]


@contextmanager
def _transaction(engine: Engine) -> Iterator[None]:
    """One transaction; on PostgreSQL also the advisory lock that orders writers."""
    engine.con.raw_sql("BEGIN TRANSACTION")
    try:
        if engine.backend == "postgres":
            lock = sg.select(sg.func("pg_advisory_xact_lock", sge.Literal.number(_ADVISORY_LOCK)))
            engine.con.raw_sql(lock).close()
        yield
    except BaseException:
        engine.con.raw_sql("ROLLBACK")
        raise
    engine.con.raw_sql("COMMIT")


@dataclass
class _Latest:
    """The last write (seq) committed to a warehouse whose every writer is in this process
    (a DuckDB file: one read-write process at a time); None until the first write here."""

    seq: int | None = None


class KeyStore:
    """This process's copy of one warehouse's ``intake_keys``, kept in step with it."""

    def __init__(self, lock: threading.Lock, latest: _Latest | None) -> None:
        self.keys = KeyTable()
        self.seq = 0  # the highest write (seq) held
        self.lock = lock  # held around probe + write by every writer of this warehouse here
        self.latest = latest  # None where other processes may write too (PostgreSQL)
        self.ready = False

    @contextmanager
    def rolled_back_on_error(self) -> Iterator[None]:
        """Forget this copy when the write's transaction fails: what it took in inside
        (a first load, a backfill) may have been rolled back; the next write reloads."""
        try:
            yield
        except BaseException:
            self.keys, self.seq, self.ready = KeyTable(), 0, False
            raise

    def catch_up(self, engine: Engine) -> None:
        """Take in the keys written since the last look (all of them the first time).

        Called inside the write's transaction, under the writer lock: what it reads is
        everything committed before, and nothing can be added until the write commits.
        """
        if not self.ready:
            self._load(engine)
            self.ready = True
            return
        if self.latest is not None and self.latest.seq == self.seq:
            return  # nobody else wrote since: no query needed
        t = engine.con.table(tables.INTAKE_KEYS.name)  # exists: made by the first load
        fresh = engine.to_arrow(t.filter(t.seq > self.seq))
        self._take(fresh)

    def _take(self, rows: pa.Table) -> None:
        if not rows.num_rows:
            return
        self.keys.add(
            rows["key_hi"].to_numpy().astype(np.int64),
            rows["key_lo"].to_numpy().astype(np.int32),
            _seconds(rows["received_at"]),
        )
        top = pc.max(rows["seq"]).as_py()
        self.seq = max(self.seq, int(top))

    def _load(self, engine: Engine) -> None:
        name = tables.INTAKE_KEYS.name
        fresh = not engine.exists(name)
        engine.ensure(tables.INTAKE_KEYS)
        if engine.backend == "postgres" and fresh:
            # The catch-up reads rows by seq: PostgreSQL needs an index for that.
            index = sge.Create(
                kind="INDEX",
                exists=True,
                this=sge.Index(
                    this=sg.to_identifier(f"{name}_seq"),
                    table=sge.to_table(name),
                    params=sge.IndexParameters(columns=[sge.Ordered(this=sg.column("seq"))]),
                ),
            )
            engine.con.raw_sql(index).close()
        rows = engine.to_arrow(engine.table(name))
        if rows.num_rows:
            self.keys = KeyTable(rows.num_rows)
            self._take(rows)
        else:
            self._backfill(engine)

    def _backfill(self, engine: Engine) -> None:
        """Key every event and failure of a warehouse loaded before ``intake_keys`` existed.

        Runs in the first write's transaction when ``intake_keys`` is empty: if it is
        interrupted nothing is kept and the next write does it again; once it committed
        the table is not empty and it never runs again.
        """
        parts: list[pa.Table] = []
        for spec, id_col, at_col, kind in (
            (tables.EVENTS, "message_id", "received_at", _MESSAGE),
            (tables.FAILED_EVENTS, "failure_id", "failed_at", _FAILURE),
        ):
            if not engine.exists(spec.name):
                continue
            t = engine.table(spec.name)
            t = t.filter(t[id_col].notnull()).group_by(id_col).aggregate(at=t[at_col].max())
            ids = engine.to_arrow(t)
            for batch in ids.to_batches(1_000_000):
                hi, lo = key_hashes(kind, batch[id_col])
                parts.append(_key_rows(hi, lo, batch["at"], 1))
        # The loader before intake_keys wrote external ids, then events: a crash between the
        # two left external ids of messages that are not in events. Drop them; the re-run
        # that loads those messages writes them again, once.
        if engine.exists("event_external_ids"):
            ext = engine.table("event_external_ids")
            events = engine.table("events")
            orphans = ext.anti_join(events, "message_id").count()
            if int(engine.to_arrow(orphans.as_table()).column(0)[0].as_py()):
                engine.replace("event_external_ids", ext.semi_join(events, "message_id"))
        if parts:
            rows = pa.concat_tables(parts)
            engine.append(tables.INTAKE_KEYS.name, rows)
            self.keys = KeyTable(rows.num_rows)
            self._take(rows)


def _key_rows(hi: _Ints, lo: _Ints32, at: pa.Array | pa.ChunkedArray, seq: int) -> pa.Table:
    schema = tables.INTAKE_KEYS.schema.to_pyarrow()
    return pa.table(
        [
            pa.array(hi, pa.int64()),
            pa.array(lo, pa.int32()),
            at.cast(schema.field("received_at").type),
            pa.array(np.full(len(hi), seq, np.int64)),
        ],
        schema=schema,
    )


_STORES: weakref.WeakKeyDictionary[Engine, KeyStore] = weakref.WeakKeyDictionary()
_FILE_LOCKS: dict[str, tuple[threading.Lock, _Latest]] = {}
_REGISTRY_LOCK = threading.Lock()


def key_store(engine: Engine) -> KeyStore:
    """The key store of ``engine``'s warehouse in this process.

    Engines on the same warehouse URL share one writer lock (an in-memory ``duckdb://`` is a
    warehouse of its own per engine); each keeps its own copy, kept in step by ``seq``.
    """
    with _REGISTRY_LOCK:
        store = _STORES.get(engine)
        if store is None:
            if engine.url in ("duckdb://", "duckdb:///:memory:"):
                lock, latest = threading.Lock(), _Latest()
            else:
                lock, latest = _FILE_LOCKS.setdefault(engine.url, (threading.Lock(), _Latest()))
            local = engine.backend == "duckdb"
            store = _STORES[engine] = KeyStore(lock, latest if local else None)
        return store


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
        indexed: bool | None = None,
    ) -> None:
        self.engine = engine
        self.source = source
        # The key index needs transactions (keys and rows written together); without them
        # (Spark) each chunk is semi-joined against the log. ``indexed=False`` forces that
        # path (the benchmark's baseline).
        self.indexed = engine.can("transactions") if indexed is None else indexed
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
        accepted = self._write_indexed(chunk) if self.indexed else self._write_scanning(chunk)
        self.received += chunk.received
        self.accepted += accepted
        self.failed += chunk.failed
        self.duplicate += chunk.received - chunk.failed - accepted
        if self.progress is not None and chunk.received:
            self.progress(chunk.received)
        # While gc_paused() holds the collector off, free the young cycles the query
        # expressions above leave behind; cheap, since the chunk's rows are already gone.
        gc.collect(0)

    def _cutoff(self) -> datetime | None:
        return None if self.dedup_window is None else self.clock.now() - self.dedup_window

    def _write_indexed(self, chunk: Chunk) -> int:
        """Probe the key index, then write keys, external ids, events and failures at once."""
        engine = self.engine
        store = key_store(engine)
        cutoff = self._cutoff()
        # Seconds, rounded down: an event received in the cutoff's own second still counts.
        floor = 1 if cutoff is None else max(1, int(cutoff.timestamp()))
        events, external, failures = chunk.events, chunk.external_ids, chunk.failures
        m_hi, m_lo = key_hashes(_MESSAGE, events["message_id"])
        f_hi, f_lo = key_hashes(_FAILURE, failures["failure_id"])
        with store.lock:
            with store.rolled_back_on_error(), _transaction(engine):
                store.catch_up(engine)
                last = store.keys.lookup(m_hi, m_lo)
                new = last < floor
                new_failure = store.keys.lookup(f_hi, f_lo) == 0
                if not new.all():
                    events = events.filter(pa.array(new))
                if external.num_rows and len(events) != chunk.events.num_rows:
                    external = external.filter(
                        pc.is_in(external["message_id"], events["message_id"])
                    )
                # A message loaded before, outside the window, is loaded again: its external ids
                # may be stored already (the only case that reads event_external_ids).
                again = new & (last != 0)
                failures = failures.filter(pa.array(new_failure))
                seq = store.seq + 1
                keys = pa.concat_tables(
                    [
                        _key_rows(m_hi[new], m_lo[new], events["received_at"], seq),
                        _key_rows(f_hi[new_failure], f_lo[new_failure], failures["failed_at"], seq),
                    ]
                )
                if keys.num_rows:
                    with engine.temporary(keys) as fresh_keys:
                        name = tables.INTAKE_KEYS.name
                        engine.con.insert(name, engine.conform(name, fresh_keys))
                if external.num_rows:
                    with engine.temporary(external) as fresh:
                        if again.any():
                            stored = engine.table("event_external_ids")
                            key = list(tables.EVENT_EXTERNAL_IDS.key)
                            engine.append("event_external_ids", fresh.anti_join(stored, key))
                        else:
                            engine.append("event_external_ids", fresh)
                if events.num_rows:
                    engine.append("events", events)
                if failures.num_rows:
                    engine.append("failed_events", failures)
            if keys.num_rows:  # committed: now this process's copy may hold them
                store.keys.add(
                    keys["key_hi"].to_numpy(),
                    keys["key_lo"].to_numpy(),
                    _seconds(keys["received_at"]),
                )
                store.seq = seq
            if store.latest is not None:
                store.latest.seq = store.seq
        return int(events.num_rows)

    def _write_scanning(self, chunk: Chunk) -> int:
        """The portable path (no transactions): semi-join the chunk's ids against the log.

        Each chunk scans ``events``; external ids go first, so that a crash between the two
        writes is repaired by re-running: the messages are then new again, and their
        external ids, anti-joined on their key, are not written twice.
        """
        engine = self.engine
        events = chunk.events
        found = pa.array([], pa.string())
        if events.num_rows:
            with engine.temporary(events.select(["message_id"])) as ids:
                stored = engine.table("events")
                cutoff = self._cutoff()
                if cutoff is not None:
                    stored = stored.filter(stored.received_at >= cutoff)
                semi = ids.semi_join(stored, "message_id")
                found = engine.to_arrow(semi)["message_id"].combine_chunks()
            if len(found):
                events = events.filter(pc.invert(pc.is_in(events["message_id"], value_set=found)))
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
        return int(events.num_rows)

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
