"""refresh_ranks: other buyers' RFM scores stand when no quintile boundary can be crossed.

The property is checked against DuckDB's own ranking (``lifecycle.score``, as ``finish``
scores): whenever ``stands`` says so, no other buyer's score moves, and the movers' scores
counted from keys equal the re-ranked ones. Then through a real refresh: a same-day order
that crosses no boundary rewrites only its customer's row; one that may cross re-ranks
everyone; both equal a full build.
"""

from __future__ import annotations

from typing import Any

import ibis
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from closedloop.core.engine import Engine
from closedloop.portrait import refresh_write
from closedloop.portrait.build import finish
from closedloop.portrait.lifecycle import score as score_expr
from closedloop.portrait.refresh_ranks import crossings, score, stands
from tests.portrait.test_build import NOW
from tests.portrait.test_refresh_rows import order, rows, view
from tests.portrait.test_refresh_shortcut import SEC, built, equals_full, stamped, step

ENGINE = Engine("duckdb://")


def duckdb_scores(keys: list[int]) -> list[int]:
    t = ibis.memtable(pa.table({"i": list(range(len(keys))), "k": keys}))
    t = t.mutate(s=score_expr(t.k, t.k.notnull()))
    out = ENGINE.con.to_pyarrow(t.order_by("i"))
    return [int(x) for x in out.column("s").to_pylist()]


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(st.integers(0, 8), min_size=2, max_size=40),
    moves=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 8)), min_size=1, max_size=3),
)
def test_scores_that_stand_do_not_move(keys: list[int], moves: list[tuple[int, int]]) -> None:
    new = list(keys)
    moved = {}
    for i, k in moves:
        if i < len(keys):
            new[i] = k
            moved[i] = k
    movers = [(keys[i], new[i]) for i in moved if keys[i] != new[i]]
    if not movers:
        return
    n = len(keys)
    lo = min(min(a, b) for a, b in movers)
    hi = max(max(a, b) for a, b in movers)
    c1 = sum(1 for k in keys if k <= lo)
    c2 = sum(1 for k in keys if k < hi)
    if not stands(c1, c2, len(movers), n):
        return
    before, after = duckdb_scores(keys), duckdb_scores(new)
    for i in range(n):
        if i not in moved:
            assert before[i] == after[i], (keys, new, i)
        else:
            assert after[i] == score(sum(1 for k in new if k < new[i]), n)


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(st.integers(0, 8), min_size=2, max_size=40),
    moves=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 8)), min_size=1, max_size=3),
)
def test_crossings_counts_exactly_the_other_buyers_whose_score_moves(
    keys: list[int], moves: list[tuple[int, int]]
) -> None:
    new = list(keys)
    moved: dict[int, int] = {}
    for i, k in moves:
        if i < len(keys):
            new[i] = k
            moved[i] = k
    movers = [(float(keys[i]), float(new[i])) for i in moved if keys[i] != new[i]]
    if not movers:
        return
    n = len(keys)
    lo = min(min(a, b) for a, b in movers)
    c1 = sum(1 for k in keys if k <= lo)
    before, after = duckdb_scores(keys), duckdb_scores(new)
    truth = sum(1 for i in range(n) if i not in moved and before[i] != after[i])
    buyers = ibis.memtable(
        pa.table({"customer_id": [f"c{i}" for i in range(n)], "key": [float(k) for k in keys]})
    )
    mine = ibis.memtable(pa.table({"customer_id": [f"c{i}" for i in moved]}))
    mv = ibis.memtable(pa.table({"a": [a for a, _ in movers], "b": [b for _, b in movers]}))
    got = ENGINE.con.execute(crossings(buyers, mine, mv, c1, n))
    assert int(got) == truth, (keys, new)


def test_score_matches_duckdb_on_boundaries() -> None:
    for n in (2, 3, 6, 11, 101):
        keys = list(range(n))
        assert duckdb_scores(keys) == [score(i, n) for i in range(n)]


# Twenty buyers, each two orders of 40.0 a week apart, the latest 1 to 5 days back.
MANY = [
    order(f"m{i}-{j}", -7 * j - 1 - i % 5, 40.0, user_id=f"B{i}")
    for i in range(20)
    for j in range(2)
]


def test_a_same_day_order_rewrites_one_row_when_no_boundary_is_crossed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    everyone: list[object] = []

    def spy(*a: Any, **k: Any) -> Any:
        everyone.append(a)
        return finish(*a, **k)

    with built(rows([*MANY, view("v", -1, user_id="W1")])) as e:
        monkeypatch.setattr(refresh_write, "finish", spy)  # the re-ranking of everyone
        # B0's third order, stamped as its last one (recency stays): the only buyer with
        # three orders and 81.0 spent, where everyone else has two and 80.0 — no other
        # buyer's key lies between its old and new ones, so no one else's score moves.
        r = step(e, stamped([order("x1", -1, 1.0, user_id="B0")], NOW + SEC), NOW + 2 * SEC)
        assert r.diff == "shortcut"
        assert r.changed is not None and int(r.changed.count().execute()) == 1
        assert not everyone  # nobody re-ranked
        monkeypatch.undo()
        equals_full(e, NOW + 2 * SEC)


def test_a_move_that_crosses_a_boundary_re_ranks_everyone() -> None:
    with built(rows([*MANY, view("v", -1, user_id="W1")])) as e:
        # B3 orders today: its recency passes every buyer's, whose recency ranks shift
        # across boundaries — their rows are rewritten too (the full build agrees).
        r = step(e, rows([order("x2", 0, 1.0, user_id="B3")]), NOW + SEC)
        assert r.changed is not None and int(r.changed.count().execute()) > 1
        equals_full(e, NOW + SEC)
