"""portrait.refresh_compiled: a refresh's base statement compiled once and reused — only
while what it reads is what it was compiled for, and only when the clock cannot matter."""

from __future__ import annotations

from datetime import timedelta

import ibis
import pyarrow as pa

from closedloop.core.engine import Engine
from closedloop.portrait import refresh_compiled
from closedloop.portrait.refresh_compiled import STATS, cached_scratch
from tests.portrait.test_build import NOW
from tests.portrait.test_refresh_rows import BUYERS, order, rows, view
from tests.portrait.test_refresh_shortcut import (
    SEC,
    VIEWERS,
    built,
    equals_full,
    stamped,
    step,
)


def test_later_refreshes_reuse_the_statement_and_equal_a_full_build() -> None:
    refresh_compiled.clear()
    with built(rows([*BUYERS, *VIEWERS])) as e:
        before = dict(STATS)
        r = step(e, stamped([view("n1", 0, user_id="W1")], NOW + SEC), NOW + 2 * SEC)
        assert r.diff == "shortcut"
        assert STATS["compiles"] == before["compiles"] + 1
        # Another customer, another clock: the same statement, and still right.
        r = step(e, stamped([order("n2", 0, 5.0, user_id="W2")], NOW + 2 * SEC), NOW + 3 * SEC)
        assert STATS["compiles"] == before["compiles"] + 1
        assert STATS["hits"] == before["hits"] + 1
        equals_full(e, NOW + 3 * SEC)


def test_a_fact_after_the_clock_is_cut_by_the_real_clock() -> None:
    # An event stamped in the future is kept in the snapshot but must not count yet: the
    # statement compiled with the far clock would count it, so it is not used then.
    refresh_compiled.clear()
    with built(rows([*BUYERS, *VIEWERS])) as e:
        step(e, stamped([view("n1", 0, user_id="W1")], NOW + SEC), NOW + 2 * SEC)
        future = order("f1", 3, 70.0, user_id="W1")  # three days after NOW
        step(e, stamped([future], NOW + 2 * SEC), NOW + 3 * SEC)
        equals_full(e, NOW + 3 * SEC)
        # Once the clock passes it, it counts.
        step(e, None, NOW + timedelta(days=4))
        equals_full(e, NOW + timedelta(days=4))


def test_a_changed_schema_or_another_warehouse_compiles_again() -> None:
    refresh_compiled.clear()
    data = pa.table({"customer_id": ["a", "b"], "n": [1, 2]})
    with Engine("duckdb://") as e:
        e.con.create_table("src", data)

        def build() -> ibis.Table:
            t = e.con.table("src")
            return t.mutate(m=t.n * 2)

        before = dict(STATS)
        out = cached_scratch(e, "t_cc", ("k",), build)
        assert out.to_pyarrow().column("m").to_pylist() == [2, 4]
        assert STATS["compiles"] == before["compiles"] + 1
        e.con.raw_sql("INSERT INTO src VALUES ('c', 3)")
        out = cached_scratch(e, "t_cc", ("k",), build)
        assert sorted(out.to_pyarrow().column("m").to_pylist()) == [2, 4, 6]  # new rows read
        assert STATS["hits"] == before["hits"] + 1
        e.con.raw_sql("ALTER TABLE src ADD COLUMN extra VARCHAR")
        cached_scratch(e, "t_cc", ("k",), build)
        assert STATS["compiles"] == before["compiles"] + 2
    with Engine("duckdb://") as other:
        other.con.create_table("src", pa.table({"customer_id": ["z"], "n": [10.5]}))

        def build2() -> ibis.Table:
            t = other.con.table("src")
            return t.mutate(m=t.n * 2)

        out = cached_scratch(other, "t_cc", ("k",), build2)
        assert out.to_pyarrow().column("m").to_pylist() == [21.0]
        assert STATS["compiles"] == before["compiles"] + 3


def test_in_memory_data_is_never_cached() -> None:
    refresh_compiled.clear()
    with Engine("duckdb://") as e:
        before = dict(STATS)
        for values in ([1], [2]):
            t = ibis.memtable(pa.table({"n": values}))
            out = cached_scratch(e, "t_mem", ("k",), lambda t=t: t)
            assert out.to_pyarrow().column("n").to_pylist() == values
        assert before == STATS
