"""An incremental run that dies half way through its writes leaves the previous resolution.

An incremental run deletes the touched region's rows and inserts their new ones table by
table, inside one transaction (DuckDB, PostgreSQL). Here it is cut between two of those
writes — the process killed outright on a DuckDB file, an exception on PostgreSQL — and:

* every identity table (and ``identity_runs``) holds exactly what it held before the run;
* the next run takes the incremental path again and ends with exactly the tables of a
  warehouse that was never interrupted.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.identity.resolve import resolve
from tests.identity.test_incremental import CONFIG, START, TABLES
from tests.identity.test_incremental_backends import KEYS, _add
from tests.identity.test_incremental_backends import _rows as _values
from tests.test_backends import postgres_url  # noqa: F401  (the PostgreSQL fixture)

FIRST = [
    {"message_id": "a", "user_id": "M1", "anonymous_id": "ck1"},
    {"message_id": "b", "user_id": "M2", "anonymous_id": "ck2", "traits": {"phone": "13800138001"}},
    {"message_id": "c", "anonymous_id": "ck3", "traits": {"email": "li@x.com"}},
    {"message_id": "d", "user_id": "null", "anonymous_id": "ck4"},
    {"message_id": "e", "user_id": "M5", "anonymous_id": "ck5"},
]
# A merge (ck1 and li@x.com join M1 and ck3's customer), a refused value seen again, an
# invalid phone, a new customer; M5 is untouched and must keep its rows as they were.
SECOND = [
    {"message_id": "f", "anonymous_id": "ck1", "traits": {"email": " LI@x.com"}},
    {"message_id": "g", "user_id": "null", "anonymous_id": "ck6"},
    {"message_id": "h", "user_id": "M7", "traits": {"phone": "12345"}},
]
STATE = (*TABLES, "identity_runs", "identity_occurrences", "identity_messages")
CLOCK_1 = Clock(START + timedelta(days=1))
CLOCK_2 = Clock(START + timedelta(days=2))

# Run in a child process: resolve, killed (no exception, no rollback, no cleanup) when
# the run reaches the named write ("before") or has just done it ("after").
CHILD = """
import os, sys
from closedloop.core.engine import Engine
from closedloop.identity.resolve import resolve
from tests.identity.test_incremental import CONFIG
from tests.identity.test_incremental_crash import CLOCK_2
url, method, table, when = sys.argv[1:5]
real = getattr(Engine, method)
def dying(self, name, *args, **kwargs):
    if name == table and when == "before":
        os._exit(17)
    out = real(self, name, *args, **kwargs)
    if name == table:
        os._exit(17)
    return out
setattr(Engine, method, dying)
with Engine(url) as engine:
    resolve(engine, CONFIG, CLOCK_2)
"""


def _state(engine: Engine) -> dict[str, list[str]]:
    return {n: sorted(map(repr, engine.table(n).to_pyarrow().to_pylist())) for n in STATE}


def _uninterrupted() -> dict[str, list[str]]:
    with Engine("duckdb://") as clean:
        _add(clean, FIRST)
        resolve(clean, CONFIG, CLOCK_1)
        _add(clean, SECOND)
        assert resolve(clean, CONFIG, CLOCK_2).path == "incremental"
        return _state(clean)


@pytest.mark.parametrize(
    ("method", "table", "when"),
    [
        ("delete_keys", "identity_map", "before"),  # customers rewritten, the map not yet
        ("delete_keys", "identity_map", "after"),  # the region's map rows gone, none new
        ("delete_keys", "event_customers", "after"),
        ("append", "identity_runs", "after"),  # the last write of a run
    ],
)
def test_a_killed_incremental_run_leaves_the_previous_resolution(
    tmp_path: Path, method: str, table: str, when: str
) -> None:
    url = f"duckdb:///{tmp_path}/w.duckdb"
    with Engine(url) as engine:
        _add(engine, FIRST)
        resolve(engine, CONFIG, CLOCK_1)
        _add(engine, SECOND)
        before = _state(engine)
    root = Path(__file__).resolve().parents[2]
    child = subprocess.run(
        [sys.executable, "-c", CHILD, url, method, table, when], cwd=root, capture_output=True
    )
    assert child.returncode == 17, child.stderr.decode()[-2000:]
    with Engine(url) as engine:
        assert _state(engine) == before
        r = resolve(engine, CONFIG, CLOCK_2)
        assert r.path == "incremental"
        assert _state(engine) == _uninterrupted()


def test_a_failed_incremental_run_rolls_back_on_postgres(postgres_url: str) -> None:  # noqa: F811
    with Engine(postgres_url) as engine:
        _add(engine, FIRST)
        resolve(engine, CONFIG, CLOCK_1)
        _add(engine, SECOND)
        before = {n: _values(engine, n) for n in KEYS}
        real = engine.delete_keys

        def failing(name: str, keys: Any) -> None:
            real(name, keys)
            if name == "identity_edges":  # the region's edges deleted, the new not inserted
                raise RuntimeError("disk full")

        engine.delete_keys = failing  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="disk full"):
            resolve(engine, CONFIG, CLOCK_2)
        engine.delete_keys = real  # type: ignore[method-assign]
        assert {n: _values(engine, n) for n in KEYS} == before
        assert resolve(engine, CONFIG, CLOCK_2).path == "incremental"
        with Engine("duckdb://") as clean:
            _add(clean, FIRST)
            resolve(clean, CONFIG, CLOCK_1)
            _add(clean, SECOND)
            resolve(clean, CONFIG, CLOCK_2)
            assert {n: _values(engine, n) for n in KEYS} == {n: _values(clean, n) for n in KEYS}
