"""The spool loader: the one process that owns the warehouse moves spooled intake into it.

Each pass reads the records that appeared in the spool's segments since the offsets it last
recorded, re-validates every message line through the shared gate (``ChunkBuilder``), writes
them with ``Intake`` — which drops every messageId the warehouse already holds — and only
then records the new offsets. The order makes every crash harmless:

* killed before the warehouse write: nothing written, the records are read again;
* killed after it, before the offsets are saved: the records are read again and every one
  of their messages is a duplicate of what was just written, so nothing is loaded twice;
* a collector killed mid-write leaves a torn record that was never acknowledged; once the
  segment's writer is gone the loader stops at it and retires the segment.

A finished segment (writer gone, everything read) is deleted after its offset is saved.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import msgspec

from closedloop.collect.ingest import UNKNOWN_SOURCE
from closedloop.collect.loader import ChunkBuilder, Intake, LoadResult, gc_paused
from closedloop.collect.messages import Reason
from closedloop.collect.spool import (
    Offsets,
    Record,
    decode_body,
    read_records,
    segment_names,
    writer_gone,
)
from closedloop.core.clock import Clock
from closedloop.core.definitions import DataClass, Source
from closedloop.core.engine import Engine

log = logging.getLogger(__name__)
_decode = msgspec.json.Decoder().decode
PASS_BYTES = 64 * 1024 * 1024  # read at most this much spool per pass (~140,000 messages)
# Messages per warehouse write. Each write costs a probe of the key index and a DuckDB
# commit (before the index: a semi-join against the whole event log), so small chunks cost
# more CPU per message (measured with the semi-join: 8.7 µs at 10,000 rows, 4.8 at 50,000,
# 3.9 at 200,000); a few chunks per pass still let one be written while the next is built.
CHUNK_ROWS = 50_000
MAX_CHUNKS_IN_FLIGHT = 2  # built chunks waiting for the writer (bounds memory)


@dataclass
class PassResult:
    """What one pass did: records read, and the load counts summed over its sources."""

    records: int
    received: int = 0
    accepted: int = 0
    failed: int = 0
    duplicate: int = 0


class SpoolLoader:
    """Moves a spool folder's records into the warehouse, idempotently."""

    def __init__(
        self,
        engine: Engine,
        sources: list[Source],
        folder: Path,
        *,
        pass_bytes: int = PASS_BYTES,
        chunk_rows: int = CHUNK_ROWS,
        clock: Clock | None = None,
        dedup_window: timedelta | None = None,
        indexed: bool | None = None,
    ) -> None:
        self.engine = engine
        self.indexed = indexed  # Intake's choice of dedup path (None: by the engine)
        self.sources = {s.name: s for s in sources}
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pass_bytes = pass_bytes
        self.chunk_rows = chunk_rows
        self.clock = clock or Clock()
        self.dedup_window = dedup_window
        self.offsets = Offsets(self.folder)
        # A writer killed between creating its segment and naming it leaves an empty
        # ``.seg.new`` that nothing will ever write to again: remove those left unlocked.
        for orphan in self.folder.glob("*.seg.new"):
            if writer_gone(orphan):
                orphan.unlink(missing_ok=True)
        present = set(segment_names(self.folder))
        for stale in [name for name in self.offsets.positions if name not in present]:
            del self.offsets.positions[stale]

    def _source(self, name: str) -> Source:
        if name == UNKNOWN_SOURCE.name:
            return UNKNOWN_SOURCE
        known = self.sources.get(name)
        if known is not None:
            return known
        # A source removed from the project after its events were acknowledged: they are
        # still loaded under its name rather than lost.
        return Source.model_construct(
            name=name,
            channel="unknown",
            data_class=DataClass.FIRST_PARTY,
            write_key="",
            description="",
        )

    def run_once(self) -> PassResult:
        """One pass over the spool; returns how much it moved."""
        budget = self.pass_bytes
        batch: list[Record] = []
        advanced: dict[str, int] = {}
        finished: list[str] = []
        for name in segment_names(self.folder):
            if budget <= 0:
                break
            path = self.folder / name
            gone = writer_gone(path)  # before reading: then what we read is all there is
            start = self.offsets.get(name)
            try:
                records, end, bad = read_records(path, start, budget)
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if gone and not bad and not records and end < size:
                # Nothing whole past ``end`` and no one left to finish it: a record cut short
                # by its writer's death (read_records only calls it "bad" when corrupt).
                bad = True
            if bad and gone:
                log.warning(
                    "spool %s: torn or corrupt data at %d ignored (never acknowledged)", name, end
                )
            batch.extend(records)
            budget -= end - start
            if end != start:
                advanced[name] = end
            if gone and (bad or end >= size):
                finished.append(name)
        result = PassResult(records=len(batch))
        if batch:
            for r in self._load(batch):
                result.received += r.received
                result.accepted += r.accepted
                result.failed += r.failed
                result.duplicate += r.duplicate
        if advanced or finished:
            self.offsets.positions.update(advanced)
            self.offsets.save()
        if finished:
            for name in finished:
                with contextlib.suppress(FileNotFoundError):
                    (self.folder / name).unlink()
                self.offsets.positions.pop(name, None)
            self.offsets.save()
        return result

    def _load(self, records: list[Record]) -> list[LoadResult]:
        # The collector judged these messages with a serialiser of its own, at whatever stack
        # depth its worker had; here the gate re-encodes nested properties with the standard
        # library. A higher recursion limit for the pass makes sure nesting the collector
        # accepted (its decoder stops near 1,000 levels) is never refused here instead.
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 20_000))
        try:
            return self._load_records(records)
        finally:
            sys.setrecursionlimit(limit)

    def _load_records(self, records: list[Record]) -> list[LoadResult]:
        # Pipelined: while one thread validates lines and builds the next chunk (Python, holds
        # the GIL), another writes the previous chunk into the warehouse (DuckDB releases the
        # GIL while it inserts). The writer runs chunks one at a time, in order, so each
        # chunk's messageId dedup sees every chunk written before it; offsets are saved only
        # after every write of the pass has returned (``run_once``), so a crash anywhere in
        # here still only means re-reading records whose messages are then duplicates.
        with ThreadPoolExecutor(1, thread_name_prefix="loader-write") as writer:
            pending: deque[Future[None]] = deque()

            def write(intake: Intake, builder: ChunkBuilder) -> None:
                while len(pending) >= MAX_CHUNKS_IN_FLIGHT:
                    pending.popleft().result()
                pending.append(writer.submit(intake.write, builder.take()))

            intakes = self._build(records, write)
            for intake, builder in intakes.values():
                if builder.pending:
                    write(intake, builder)
            while pending:
                pending.popleft().result()
        return [intake.finish() for intake, _ in intakes.values()]

    def _build(
        self, records: list[Record], write: Callable[[Intake, ChunkBuilder], None]
    ) -> dict[str, tuple[Intake, ChunkBuilder]]:
        """Validate the records' lines into per-source chunks, handing each full one to ``write``."""
        intakes: dict[str, tuple[Intake, ChunkBuilder]] = {}
        with gc_paused():
            for rec in records:
                header, lines = decode_body(rec.body)
                source_name = str(header.get("s"))
                if source_name not in intakes:
                    intake = Intake(
                        self.engine,
                        self._source(source_name),
                        import_name="http",
                        location=f"spool:{self.folder}",
                        clock=self.clock,
                        dedup_window=self.dedup_window,
                        indexed=self.indexed,
                    )
                    intakes[source_name] = (intake, intake.builder())
                builder = intakes[source_name][1]
                for code, reason, location, message_id, payload in header.get("f", []):
                    builder.fail(Reason(code), reason, location, payload, message_id)
                place = f"spool:{rec.segment}@{rec.offset}#"
                for number, line in enumerate(lines):
                    try:
                        raw = _decode(line)  # msgspec wrote it; msgspec reads it, 2x json
                    except (msgspec.MsgspecError, ValueError, RecursionError) as e:  # corrupt
                        builder.fail(
                            Reason.MALFORMED,
                            f"spooled line unreadable: {e}",
                            f"{place}{number}",
                            line,
                        )
                        continue
                    builder.offer(raw, place, number, line, len(line))
                    if builder.pending >= self.chunk_rows:
                        write(intakes[source_name][0], builder)
        return intakes

    def run(self, stop: threading.Event, *, idle_seconds: float = 0.05) -> None:
        """Pass after pass until ``stop`` is set; sleeps briefly when the spool is empty."""
        while not stop.is_set():
            moved = self.run_once()
            if moved.records == 0:
                stop.wait(idle_seconds)


def main(argv: list[str] | None = None) -> None:
    """``python -m closedloop.collect.drain --project DIR [--spool DIR]``: run the loader."""
    import argparse
    import signal

    import closedloop.collect.tables  # noqa: F401 - declares the tables written here
    from closedloop.core.definitions import load_project

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--project", default=".")
    parser.add_argument("--spool", default=None)
    parser.add_argument(
        "--dedup-window-days",
        type=float,
        default=None,
        help="recognise a messageId as a duplicate of events received this many days back "
        "(default: forever)",
    )
    args = parser.parse_args(argv)
    window = None if args.dedup_window_days is None else timedelta(days=args.dedup_window_days)
    project = load_project(args.project)
    folder = Path(args.spool) if args.spool else project.root / "spool"
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    logging.basicConfig(level=logging.INFO, format="loader: %(message)s")
    with Engine(project.engine_url) as engine:
        loader = SpoolLoader(engine, list(project.config.sources), folder, dedup_window=window)
        loader.run(stop)


if __name__ == "__main__":
    main()
