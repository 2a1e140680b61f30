"""The spool and its loader, piece by piece: framing, torn tails, locks, rotation, offsets."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

from closedloop.collect.drain import SpoolLoader
from closedloop.collect.spool import (
    HEADER,
    Offsets,
    SpoolWriter,
    decode_body,
    encode_record,
    read_records,
    segment_names,
    writer_gone,
)
from closedloop.core.engine import Engine
from tests.collect.conftest import WEB, rows


def line(i: int) -> bytes:
    m = {"type": "track", "event": "E", "userId": f"u{i}", "messageId": f"m{i}"}
    return json.dumps(m).encode()


def record(*ids: int) -> bytes:
    return encode_record({"s": "web", "f": []}, [line(i) for i in ids])


def test_record_round_trip_and_framing() -> None:
    r = record(1, 2)
    length, crc = HEADER.unpack_from(r)
    body = r[HEADER.size :]
    assert length == len(body) and crc == zlib.crc32(body)
    header, lines = decode_body(body)
    assert header == {"s": "web", "f": []} and lines == [line(1), line(2)]


def test_torn_and_corrupt_tails_stop_reading(tmp_path: Path) -> None:
    seg = tmp_path / "a.seg"
    good = record(1) + record(2)
    seg.write_bytes(good + record(3)[:-5])  # the last record cut short by a crash
    recs, end, bad = read_records(seg, 0, 1 << 20)
    assert [decode_body(r.body)[1] for r in recs] == [[line(1)], [line(2)]]
    assert end == len(good) and not bad  # incomplete: maybe still being written
    corrupt = bytearray(record(3))
    corrupt[-1] ^= 0xFF
    seg.write_bytes(good + bytes(corrupt))
    recs, end, bad = read_records(seg, 0, 1 << 20)
    assert len(recs) == 2 and end == len(good) and bad
    recs, end, _ = read_records(seg, len(record(1)), 1 << 20)  # from an offset
    assert [decode_body(r.body)[1] for r in recs] == [[line(2)]]


def test_a_torn_tail_left_by_a_dead_writer_is_retired(tmp_path: Path) -> None:
    """A writer killed mid-write leaves a record cut short, never acknowledged.

    While a writer lives such a tail may still be growing; once it is gone the loader loads
    the whole records before it and retires the segment instead of waiting for the rest of
    a record that will never come (the tail cut inside the header or inside the body).
    """
    spool = tmp_path / "spool"
    spool.mkdir()
    good = record(1) + record(2)
    (spool / "00000000000000000001-1-aaaaaaaa.seg").write_bytes(good + record(3)[:-5])
    (spool / "00000000000000000002-1-bbbbbbbb.seg").write_bytes(record(4) + record(5)[:3])
    with Engine(f"duckdb:///{tmp_path / 'w.duckdb'}") as engine:
        loader = SpoolLoader(engine, [WEB], spool)
        loaded = [loader.run_once() for _ in range(3)]
        assert sum(r.accepted for r in loaded) == 3
        assert segment_names(spool) == []
        assert sorted(r["message_id"] for r in rows(engine, "events")) == ["m1", "m2", "m4"]


def test_writer_holds_its_segment_until_closed(tmp_path: Path) -> None:
    async def go() -> Path:
        w = SpoolWriter(tmp_path)
        await asyncio.gather(*(w.append(record(i)) for i in range(50)))
        path = w.path
        assert not writer_gone(path)  # the writer lives: the segment is not finished
        w.close()
        return path

    path = asyncio.run(go())
    assert writer_gone(path)
    recs, _, _ = read_records(path, 0, 1 << 24)
    users = sorted(int(json.loads(decode_body(r.body)[1][0])["userId"][1:]) for r in recs)
    assert users == list(range(50))


def test_a_dead_writer_releases_its_segment(tmp_path: Path) -> None:
    code = (
        "import asyncio, os, sys\n"
        "from pathlib import Path\n"
        "from closedloop.collect.spool import SpoolWriter, encode_record\n"
        "w = SpoolWriter(Path(sys.argv[1]))\n"
        "asyncio.run(w.append(encode_record({'s': 'web', 'f': []}, [b'{}'])))\n"
        "print(w.path, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, check=False, text=True
    )
    path = Path(out.stdout.strip())
    assert path.exists() and writer_gone(path)


def test_rotation_makes_new_segments(tmp_path: Path) -> None:
    async def go() -> None:
        w = SpoolWriter(tmp_path, segment_bytes=1000)
        for i in range(20):
            await w.append(record(*range(10 * i, 10 * i + 10)))  # ~800 bytes each
        w.close()

    asyncio.run(go())
    names = segment_names(tmp_path)
    assert len(names) > 3
    assert all(writer_gone(tmp_path / n) for n in names)
    lines = [
        ln
        for n in names
        for r in read_records(tmp_path / n, 0, 1 << 20)[0]
        for ln in decode_body(r.body)[1]
    ]
    assert sorted(lines) == sorted(line(i) for i in range(200))


def test_loader_is_idempotent_when_offsets_are_lost(tmp_path: Path) -> None:
    """A loader killed after writing, before saving offsets, re-reads: nothing twice."""
    spool = tmp_path / "spool"

    async def go() -> None:
        w = SpoolWriter(spool)
        for i in range(10):
            await w.append(record(2 * i, 2 * i + 1))
        w.close()

    asyncio.run(go())
    with Engine(f"duckdb:///{tmp_path / 'w.duckdb'}") as engine:
        first = SpoolLoader(engine, [WEB], spool).run_once()
        assert (first.received, first.accepted) == (20, 20)
        assert segment_names(spool) == []  # finished segments are retired
        # Put the data back as if the offsets had never been saved.
        asyncio.run(go())
        (spool / "offsets.json").unlink(missing_ok=True)
        again = SpoolLoader(engine, [WEB], spool).run_once()
        assert (again.received, again.accepted, again.duplicate) == (20, 0, 20)
        assert len(rows(engine, "events")) == 20


def test_offsets_survive_and_skip_loaded_records(tmp_path: Path) -> None:
    spool = tmp_path / "spool"

    async def write(ids: range) -> SpoolWriter:
        w = SpoolWriter(spool)
        for i in ids:
            await w.append(record(i))
        return w

    w = asyncio.run(write(range(5)))  # the writer stays alive: its segment is not finished
    with Engine(f"duckdb:///{tmp_path / 'w.duckdb'}") as engine:
        assert SpoolLoader(engine, [WEB], spool).run_once().accepted == 5
        assert Offsets(spool).get(w.path.name) == os.path.getsize(w.path)
        assert SpoolLoader(engine, [WEB], spool).run_once().records == 0  # nothing new
        w.close()
        assert SpoolLoader(engine, [WEB], spool).run_once().records == 0
        assert segment_names(spool) == []


def test_dedup_window(tmp_path: Path) -> None:
    """Forever by default; with a window, only events received within it count."""
    from datetime import UTC, datetime, timedelta

    from closedloop.core.clock import Clock

    spool = tmp_path / "spool"

    async def go() -> None:
        w = SpoolWriter(spool)
        await w.append(record(1, 2))
        w.close()

    t0 = datetime(2024, 3, 1, tzinfo=UTC)
    later = Clock(t0 + timedelta(days=10))
    with Engine(f"duckdb:///{tmp_path / 'w.duckdb'}") as engine:
        asyncio.run(go())
        assert SpoolLoader(engine, [WEB], spool, clock=Clock(t0)).run_once().accepted == 2
        asyncio.run(go())
        r = SpoolLoader(engine, [WEB], spool, clock=later, dedup_window=timedelta(days=30))
        assert r.run_once().duplicate == 2
        asyncio.run(go())
        assert SpoolLoader(engine, [WEB], spool, clock=later).run_once().duplicate == 2
        asyncio.run(go())
        r = SpoolLoader(engine, [WEB], spool, clock=later, dedup_window=timedelta(days=1))
        assert r.run_once().accepted == 2  # older than the window: not recognised
        assert len(rows(engine, "events")) == 4


def test_loader_removes_unnamed_orphans(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    orphan = spool / "00000000000000000001-1-abcd.seg.new"
    orphan.write_bytes(b"")
    with Engine(f"duckdb:///{tmp_path / 'w.duckdb'}") as engine:
        SpoolLoader(engine, [WEB], spool)
    assert not orphan.exists()


def test_rotation_under_concurrent_appends_keeps_every_record_once(tmp_path: Path) -> None:
    """Appends that arrive while the next segment is being made land in one or the other."""

    async def go() -> None:
        w = SpoolWriter(tmp_path, segment_bytes=3000)

        async def later(i: int) -> None:  # spread out: appends land mid-fsync and mid-rotation
            await asyncio.sleep(i * 0.001)
            await w.append(record(i))

        await asyncio.gather(*(later(i) for i in range(300)))
        assert not writer_gone(w.path)
        w.close()

    asyncio.run(go())
    names = segment_names(tmp_path)
    assert len(names) > 3 and all(writer_gone(tmp_path / n) for n in names)
    lines = [
        ln
        for n in names
        for r in read_records(tmp_path / n, 0, 1 << 20)[0]
        for ln in decode_body(r.body)[1]
    ]
    assert sorted(lines) == sorted(line(i) for i in range(300))


def test_pipelined_chunks_dedup_across_chunks_and_sources(tmp_path: Path) -> None:
    """Small chunks written while the next is built: a messageId repeated in a later chunk
    of the same pass is still a duplicate, failures are kept, and the counts add up."""
    from tests.collect.conftest import POS

    spool = tmp_path / "spool"

    async def go() -> None:
        w = SpoolWriter(spool)
        for i in range(12):
            await w.append(record(i, i + 1, i + 2))  # every id but the ends comes 3 times
        await w.append(encode_record({"s": "pos", "f": []}, [line(1000), line(1001)]))
        bad = ["malformed", "not JSON", "http:x#0", None, "{oops"]
        await w.append(encode_record({"s": "web", "f": [bad]}, [line(5)]))
        w.close()

    asyncio.run(go())
    with Engine(f"duckdb:///{tmp_path / 'w.duckdb'}") as engine:
        r = SpoolLoader(engine, [WEB, POS], spool, chunk_rows=4).run_once()
        assert r.records == 14
        assert (r.received, r.accepted, r.failed, r.duplicate) == (36 + 2 + 2, 14 + 2, 1, 23)
        events = rows(engine, "events")
        assert sorted(e["message_id"] for e in events) == sorted(
            [f"m{i}" for i in range(14)] + ["m1000", "m1001"]
        )
        assert {e["source"] for e in events if e["message_id"].startswith("m100")} == {"pos"}
        assert len(rows(engine, "failed_events")) == 1
        loads = rows(engine, "loads")
        assert sum(x["received"] for x in loads) == r.received
