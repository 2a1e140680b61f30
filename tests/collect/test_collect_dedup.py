"""Exactly-once by messageId through the key index (``intake_keys``), on real warehouses.

The hash table is checked against a dict model; loads are checked for "every id once, counts
add up" across chunks, restarts, several engines on one warehouse, a dedup window, a write
that fails half-way, a SIGKILL mid-load, the migration of a warehouse loaded before the
index existed, and PostgreSQL.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop.collect.loader import Intake, KeyTable, key_hashes
from closedloop.core.clock import Clock
from closedloop.core.definitions import Source
from closedloop.core.engine import Engine
from tests.test_backends import postgres_url  # noqa: F401 - the real PostgreSQL fixture

from .conftest import NOW, rows, track, write_jsonl

WEB = Source(name="web", channel="web", write_key="wk_test_web_0001")


def load_ids(
    engine: Engine,
    chunks: list[list[int]],
    *,
    clock: Clock | None = None,
    window: timedelta | None = None,
    indexed: bool | None = None,
    bad: int = 0,
    first: int = 0,
) -> tuple[int, int, int, int]:
    """Load messages ``m{i}`` chunk by chunk (plus ``bad`` failing lines per chunk)."""
    intake = Intake(
        engine,
        WEB,
        import_name="t",
        location="t",
        clock=clock or Clock(NOW),
        dedup_window=window,
        indexed=indexed,
    )
    for n, ids in enumerate(chunks, first):
        builder = intake.builder()
        for i in ids:
            builder.offer(track(i), "t:", i, b"")
        for j in range(bad):
            builder.offer({"type": "track", "messageId": f"bad{j}"}, f"c{n}:", j, b"x")
        intake.write(builder.take())
    r = intake.finish()
    return r.received, r.accepted, r.failed, r.duplicate


def stored_ids(engine: Engine) -> list[str]:
    return sorted(str(e["message_id"]) for e in rows(engine, "events"))


# ---- the hash table ----------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 5)), max_size=30), max_size=12),
    st.integers(0, 2),
)
def test_key_table_agrees_with_a_dict(batches: list[list[tuple[int, int]]], bits: int) -> None:
    # Few distinct 64-bit halves (``>> bits``) share home slots and make long probe runs;
    # odd ones sit at the top of the hash range, so runs wrap round past the last slot.
    # The first batch fills an empty table (sort path), later ones insert, some grow it.
    def high(k: int) -> int:
        return -1 - (k >> bits) if k % 2 else (k >> bits) << 57

    table = KeyTable(capacity=4)
    model: dict[tuple[int, int], int] = {}
    for batch in batches:
        hi = np.array([high(k) for k, _ in batch], np.int64)
        lo = np.array([k for k, _ in batch], np.int32)
        at = np.array([t for _, t in batch], np.uint32)
        table.add(hi, lo, at)
        for h, lo_, t in zip(hi.tolist(), lo.tolist(), at.tolist(), strict=True):
            model[(h, lo_)] = max(model.get((h, lo_), 0), t)
        probe = [(high(k), k) for k in range(50)]
        got = table.lookup(
            np.array([p[0] for p in probe], np.int64), np.array([p[1] for p in probe], np.int32)
        )
        assert got.tolist() == [model.get(p, 0) for p in probe]
        assert len(table) == len(model)


def test_key_hashes_are_stable_and_kinds_apart() -> None:
    hi, lo = key_hashes(b"m", ["m1", "m2", "m1"])
    assert (hi[0], lo[0]) == (hi[2], lo[2]) != (hi[1], lo[1])
    f_hi, f_lo = key_hashes(b"f", ["m1"])
    assert (f_hi[0], f_lo[0]) != (hi[0], lo[0])
    # Fixed by blake2b, not by the process or the backend: a stored key stays valid.
    assert (int(hi[0]), int(lo[0])) == (-7603297387425906327, -1302617661)


def test_key_table_grows_and_keeps_everything() -> None:
    table = KeyTable(capacity=16)
    hi, lo = key_hashes(b"m", [f"id{i}" for i in range(100_000)])
    for part in range(0, 100_000, 7_000):
        table.add(hi[part : part + 7_000], lo[part : part + 7_000], np.full(7_000, 9, np.uint32))
    assert len(table) == 100_000
    assert (table.lookup(hi, lo) == 9).all()
    other_hi, other_lo = key_hashes(b"m", [f"other{i}" for i in range(10_000)])
    assert (table.lookup(other_hi, other_lo) == 0).all()
    assert table.nbytes <= 16 * 2 * 100_000 / 0.7 + 64


# ---- loads ---------------------------------------------------------------------------------
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.lists(st.integers(0, 30), max_size=15), min_size=1, max_size=6),
    st.lists(st.integers(0, 5), max_size=6),
)
def test_every_id_once_across_chunks_and_restarts(
    tmp_path_factory: pytest.TempPathFactory, chunks: list[list[int]], restarts: list[int]
) -> None:
    """Chunks with repeats, loads split at random points, an engine reopened between them."""
    path = tmp_path_factory.mktemp("w") / "w.duckdb"
    cut = sorted({min(r, len(chunks)) for r in restarts} | {0, len(chunks)})
    total = [0, 0, 0, 0]
    for a, b in itertools.pairwise(cut):
        with Engine(f"duckdb:///{path}") as engine:
            got = load_ids(engine, chunks[a:b], bad=1, first=a)
            total = [x + y for x, y in zip(total, got, strict=True)]
    with Engine(f"duckdb:///{path}") as engine:
        seen = {i for c in chunks for i in c}
        assert stored_ids(engine) == sorted(f"m{i}" for i in seen)
        received, accepted, failed, duplicate = total
        assert received == accepted + failed + duplicate
        assert accepted == len(seen)
        # One failure row per distinct failure, however often it came.
        assert len(rows(engine, "failed_events")) == len(chunks)
        keys = rows(engine, "intake_keys")
        assert len(keys) == len(seen) + len(chunks)


def test_two_engines_on_one_warehouse_see_each_others_writes(tmp_path: Path) -> None:
    url = f"duckdb:///{tmp_path / 'w.duckdb'}"
    with Engine(url) as a, Engine(url) as b:
        assert load_ids(a, [[1, 2, 3]]) == (3, 3, 0, 0)
        assert load_ids(b, [[2, 3, 4, 5]]) == (4, 2, 0, 2)  # b reads a's keys first
        assert load_ids(a, [[4, 5, 6]]) == (3, 1, 0, 2)  # a catches up with b's
        assert stored_ids(a) == [f"m{i}" for i in range(1, 7)]
        seqs = sorted({k["seq"] for k in rows(a, "intake_keys")})
        assert seqs == [1, 2, 3]


def test_dedup_window_reloads_only_what_is_older(engine: Engine) -> None:
    t0 = Clock(NOW)
    later = Clock(NOW + timedelta(days=10))
    ext = {"externalIds": [{"id": "o1", "type": "wechat_openid"}]}
    intake = Intake(engine, WEB, import_name="t", location="t", clock=t0)
    builder = intake.builder()
    builder.offer(track(1, context=ext), "t:", 1, b"")
    builder.offer(track(2), "t:", 2, b"")
    intake.write(builder.take())
    assert load_ids(engine, [[1, 2]], clock=later, window=timedelta(days=30)) == (2, 0, 0, 2)
    assert load_ids(engine, [[1, 2]], clock=later) == (2, 0, 0, 2)
    # Older than a 1-day window: loaded again, once, and its external id is not doubled.
    intake = Intake(
        engine, WEB, import_name="t", location="t", clock=later, dedup_window=timedelta(days=1)
    )
    builder = intake.builder()
    builder.offer(track(1, context=ext), "t:", 1, b"")
    builder.offer(track(3), "t:", 3, b"")
    intake.write(builder.take())
    assert (intake.accepted, intake.duplicate) == (2, 0)
    assert stored_ids(engine) == ["m1", "m1", "m2", "m3"]
    assert len(rows(engine, "event_external_ids")) == 1
    # The reload refreshed m1's time: within a 1-day window it is now a duplicate.
    assert load_ids(engine, [[1, 2]], clock=later, window=timedelta(days=1)) == (2, 1, 0, 1)


def test_a_write_failing_half_way_leaves_nothing(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys are written first; if the events write then fails, the keys are rolled back too."""
    real = Engine.append

    def failing(self: Engine, name: str, data: Any) -> None:
        if name == "events":
            raise OSError("disk full")
        real(self, name, data)

    monkeypatch.setattr(Engine, "append", failing)
    with pytest.raises(OSError, match="disk full"):
        load_ids(engine, [[1, 2]], bad=1)
    monkeypatch.setattr(Engine, "append", real)
    for table in ("intake_keys", "events", "failed_events"):
        assert rows(engine, table) == [], table
    assert load_ids(engine, [[1, 2, 3]], bad=1) == (4, 3, 1, 0)
    assert stored_ids(engine) == ["m1", "m2", "m3"]


# ---- migration ---------------------------------------------------------------------------
def test_a_warehouse_loaded_before_the_index_is_backfilled_once(tmp_path: Path) -> None:
    url = f"duckdb:///{tmp_path / 'w.duckdb'}"
    with Engine(url) as engine:  # the old loader: no intake_keys
        assert load_ids(engine, [[1, 2, 3]], indexed=False, bad=1) == (4, 3, 1, 0)
        assert not engine.exists("intake_keys")
        # ... and a crash of the old loader between its two writes: an orphan external id.
        orphan = {"message_id": ["m9"], "type": ["t"], "id": ["o9"], "collection": [None]}
        engine.append("event_external_ids", pa.table(orphan, schema=_ext_schema()))
    with Engine(url) as engine:
        assert load_ids(engine, [[2, 3, 4]], bad=1) == (4, 1, 1, 2)
        keys = rows(engine, "intake_keys")
        assert len(keys) == 3 + 1 + 1  # three messages and one failure backfilled, m4 added
        assert sorted(k["seq"] for k in keys) == [1, 1, 1, 1, 2]
        assert rows(engine, "event_external_ids") == []  # the orphan is gone
    with Engine(url) as engine:  # the backfill does not run again
        assert load_ids(engine, [[1, 4, 5]], bad=1) == (4, 1, 1, 2)
        assert len(rows(engine, "intake_keys")) == 6
        assert stored_ids(engine) == [f"m{i}" for i in range(1, 6)]


def test_an_interrupted_backfill_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"duckdb:///{tmp_path / 'w.duckdb'}"
    with Engine(url) as engine:
        load_ids(engine, [[1, 2]], indexed=False)
    real = Engine.append

    def failing(self: Engine, name: str, data: Any) -> None:
        if name == "events":
            raise OSError("killed")
        real(self, name, data)

    with Engine(url) as engine:
        monkeypatch.setattr(Engine, "append", failing)
        with pytest.raises(OSError):
            load_ids(engine, [[2, 3]])
        monkeypatch.setattr(Engine, "append", real)
        assert rows(engine, "intake_keys") == []
    with Engine(url) as engine:
        assert load_ids(engine, [[2, 3]]) == (2, 1, 0, 1)
        assert len(rows(engine, "intake_keys")) == 3


def _ext_schema() -> pa.Schema:
    import closedloop.collect.tables as tables

    return tables.EVENT_EXTERNAL_IDS.schema.to_pyarrow()


# ---- SIGKILL mid-load --------------------------------------------------------------------
_LOADER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import closedloop.collect.tables
    from closedloop.collect.loader import load_jsonl
    from closedloop.core.definitions import Source
    from closedloop.core.engine import Engine

    src = Source(name="web", channel="web", write_key="wk_test_web_0001")
    with Engine(sys.argv[1]) as engine:
        load_jsonl(engine, [Path(sys.argv[2])], src, import_name="k", chunk_rows=500)
    """
)


@pytest.mark.slow
def test_sigkill_mid_load_then_rerun_loads_every_id_once(tmp_path: Path) -> None:
    n = 20_000
    lines: list[Any] = [
        track(i % 15_000, context={"externalIds": [{"id": f"o{i}", "type": "t"}]}) for i in range(n)
    ]
    lines += ["{broken"] * 3
    path = write_jsonl(tmp_path / "big.jsonl", lines)
    url = f"duckdb:///{tmp_path / 'w.duckdb'}"
    script = tmp_path / "load.py"
    script.write_text(_LOADER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    killed = 0
    for delay in (0.8, 1.3, 1.9, 2.6):
        proc = subprocess.Popen([sys.executable, str(script), url, str(path)], env=env)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait()
    assert killed, "the loads finished before any kill: make the file bigger"
    subprocess.run([sys.executable, str(script), url, str(path)], env=env, check=True)
    with Engine(url) as engine:
        ids = stored_ids(engine)
        assert ids == sorted(f"m{i}" for i in range(15_000))
        # Each message's first copy carries its external id; none is written twice.
        ext = rows(engine, "event_external_ids")
        assert len(ext) == len({(e["message_id"], e["id"]) for e in ext})
        assert {e["message_id"] for e in ext} == set(ids)
        assert len(rows(engine, "failed_events")) == 3  # one per broken line, kept once
        assert len(rows(engine, "intake_keys")) == 15_000 + len(rows(engine, "failed_events"))


# ---- PostgreSQL --------------------------------------------------------------------------
@pytest.mark.postgres
def test_exactly_once_on_postgres(postgres_url: str) -> None:  # noqa: F811
    with Engine(postgres_url) as a, Engine(postgres_url) as b:
        load_ids(a, [[1, 2, 3]], indexed=False, bad=1)  # loaded before the index existed
        assert load_ids(a, [[2, 3, 4], [4, 5]], bad=1) == (7, 2, 2, 3)
        assert load_ids(b, [[5, 6, 1]], bad=1) == (4, 1, 1, 2)
        assert load_ids(a, [[6, 7]]) == (2, 1, 0, 1)
        assert stored_ids(a) == [f"m{i}" for i in range(1, 8)]
        assert len(rows(a, "failed_events")) == 2
        assert len(rows(a, "intake_keys")) == 7 + 2


def test_concurrent_writers_in_one_process_load_every_id_once(tmp_path: Path) -> None:
    """Threads writing overlapping ids, each through its own engine, to one warehouse at once
    (an engine's connection serves one thread at a time)."""
    import threading

    url = f"duckdb:///{tmp_path / 'w.duckdb'}"
    results: list[tuple[int, int, int, int]] = []
    with Engine(url) as a, Engine(url) as b, Engine(url) as c:

        def run(engine: Engine, offset: int) -> None:
            chunks = [list(range(offset + 10 * k, offset + 10 * k + 30)) for k in range(8)]
            results.append(load_ids(engine, chunks))

        threads = [threading.Thread(target=run, args=(e, o)) for e, o in ((a, 0), (b, 5), (c, 7))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ids = stored_ids(a)
        assert ids == sorted(set(ids))
        assert len(ids) == len(set(range(0, 7 + 100)))
        assert sum(r[1] for r in results) == len(ids)
