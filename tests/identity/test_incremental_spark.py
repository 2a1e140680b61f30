"""Identity's incremental path on Spark (PySpark local mode) gives what full runs give.

On Spark an incremental run reads only the new events and recomputes only the region they
touch, like on DuckDB and PostgreSQL, but writes each table whole (no transactions, so no
row-level delete then insert: ``resolve._Writer``). A generated stream (members, phones
written several ways, e-mails, cookies, a shared device over its limit, names and birthdays
for probabilistic matching) arrives in two increments. After each, the Spark warehouse,
resolving incrementally, must hold row for row what a DuckDB warehouse forced through full
runs holds (same ids, aliases, ledger). Each run's path is asserted, so a silent fallback
to full runs fails the test. (A further full run on Spark, checking that it changes nothing,
was dropped to keep the suite within its time: Spark's first full run here already equals
DuckDB's, and every run costs 25-90 s of job overhead.)
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import pytest

from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.identity.resolve import resolve
from tests.conftest import add_events
from tests.identity.test_incremental import (
    CONFIG_MATCHING,
    PHONES,
    START,
    TABLES,
    _event,
    _figures,
    _partition,
)
from tests.test_spark import _need_java  # skips without Java; the test JVM's options

pytest.importorskip("pyspark")

# Floats and timestamps come back from each engine in its own Python types: compare the
# columns that carry the resolution (as tests/identity/test_incremental_backends.py does).
KEYS = {
    "identity_map": ["id_type", "id_value", "customer_id", "quarantined", "messages"],
    "customers": ["customer_id", "identifiers"],
    "customer_aliases": ["alias_id", "customer_id"],
    "merge_ledger": ["merge_id", "survivor_id", "merged_id", "action"],
    "identity_changes": ["customer_id", "run_id", "change"],
    "identity_edges": ["a_type", "a_value", "b_type", "b_value", "message_id", "status"],
    "identity_dropped_links": ["a_type", "a_value", "b_type", "b_value", "rule"],
    "identifier_issues": ["id_type", "raw_value", "reason", "messages"],
    "event_customers": ["message_id", "customer_id"],
    "identity_suspects": ["id_type", "id_value", "names"],
    "identity_clusters": ["id_type", "id_value", "cluster"],
    "identity_records": ["message_id", "anchor", "name", "email", "phone"],
}


def sample(seed: int, n: int) -> list[dict[str, Any]]:
    """``n`` identify calls drawn from the value sets of tests/identity/test_incremental.py.

    Small sets, so identifiers collide often: merges across increments, a device seen with
    more members than it may link (quarantined), phones in several spellings and invalid
    ones, blocked values, look-alike names for the matcher.
    """
    rnd = random.Random(seed)

    def maybe(values: list[Any], p: float = 0.5) -> Any:
        return rnd.choice(values) if rnd.random() < p else None

    msgs = []
    for i in range(n):
        m = {
            "user_id": maybe(["M1", "M2", "M3", "M4", "M5", "null"], 0.6),
            "anonymous_id": maybe([f"a{k}" for k in range(8)], 0.7),
            "phone": maybe(PHONES),
            "email": maybe(["li@x.com", " LI@x.com", "wf@y.org", "zs@z.cn"]),
            "name": maybe(["li wei", "li wie", "wang fang", "zhang san"], 0.6),
            "birthday": rnd.choice(["1990-01-02", "1985-07-07"]),
            "city": rnd.choice(["shanghai", "beijing"]),
            "device": maybe(["d1", "d2"], 0.4),
            "day": rnd.randint(0, 60),
        }
        msgs.append(_event(i, m))
    return msgs


def _rows(engine: Engine, name: str) -> list[tuple[object, ...]]:
    cols = KEYS[name]
    rows = engine.table(name).select(*cols).to_pyarrow().to_pylist()
    return sorted((tuple(r[c] for c in cols) for r in rows), key=repr)


def _tables(engine: Engine) -> dict[str, list[tuple[object, ...]]]:
    return {name: _rows(engine, name) for name in TABLES}


@pytest.mark.spark
@pytest.mark.slow
def test_incremental_runs_on_spark_equal_full_runs() -> None:
    _need_java()
    assert set(KEYS) == set(TABLES)
    events = sample(11, 48)
    # Two increments: each Spark run costs 25-90 s of job overhead here, whatever the size.
    parts = [events[:26], events[26:]]
    with Engine("pyspark://") as spark, Engine("duckdb://") as full:
        for n, part in enumerate(parts):
            add_events(spark, part)
            add_events(full, part)
            clock = Clock(START + timedelta(days=90, hours=n))
            rs = resolve(spark, CONFIG_MATCHING, clock)
            rf = resolve(full, CONFIG_MATCHING, clock, incremental=False)
            assert (rs.path, rf.path) == ("incremental" if n else "full", "full")
            assert _figures(rs) == _figures(rf)
            got, want = _tables(spark), _tables(full)
            for name in TABLES:
                assert got[name] == want[name], (n, name)
        assert rs.merges or rs.splits, "the sample merged no one across increments"
        assert any(q for _, _, _, q, _ in got["identity_map"]), "no identifier quarantined"
        assert _partition(spark) == _partition(full)
