"""Property tests: the SQL gate, and bucket / top-N tags against plain-Python references."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import closedloop.portrait.tables  # noqa: F401  (declares profiles for the SQL gate)
from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.tags.build import build_tags
from closedloop.tags.sqltag import SqlTagError, check_select
from tests.tags.helpers import NOW, set_events, set_profiles, tag, values

IDENT = st.sampled_from(["city", "orders", "revenue", "gender", "tier", "points"])
LITERAL = st.one_of(st.integers(-5, 5).map(str), st.sampled_from(["'a'", "'Shanghai'", "NULL"]))
OP = st.sampled_from(["=", "<>", "<", ">=", "IS NOT", "LIKE"])


@st.composite
def good_select(draw: st.DrawFn) -> str:
    col = draw(IDENT)
    where = f" WHERE {draw(IDENT)} {draw(OP)} {draw(LITERAL)}" if draw(st.booleans()) else ""
    expr = draw(st.sampled_from([col, f"upper(CAST({col} AS VARCHAR))", f"coalesce({col}, 0)"]))
    q = f"SELECT customer_id, {expr} AS value FROM profiles{where}"  # noqa: S608 - the gate under test
    if draw(st.booleans()):
        q = f"WITH p AS ({q}) SELECT customer_id, value FROM p"  # noqa: S608
    return q


BAD_STATEMENTS = st.sampled_from(
    [
        "DELETE FROM profiles",
        "UPDATE profiles SET city = 'x'",
        "INSERT INTO profiles SELECT * FROM profiles",
        "DROP TABLE profiles",
        "CREATE TABLE x AS SELECT 1",
        "COPY profiles TO 'out.csv'",
        "ATTACH 'other.db' AS o",
        "PRAGMA database_list",
        "SET threads = 1",
        "SELECT customer_id, city AS value INTO copy FROM profiles",
        "SELECT customer_id, content AS value FROM read_text('/etc/passwd')",
        "SELECT customer_id, getenv('HOME') AS value FROM profiles",
        "SELECT customer_id, value FROM '/tmp/x.parquet'",
        "SELECT customer_id, value FROM other.profiles",
        "SELECT customer_id, value FROM secrets",
    ]
)


@given(good_select())
@settings(max_examples=60, deadline=None)
def test_the_gate_accepts_plain_selects_of_warehouse_tables(q: str) -> None:
    assert check_select(q) is not None


@given(BAD_STATEMENTS, good_select(), st.booleans())
@settings(max_examples=80, deadline=None)
def test_the_gate_refuses_writes_files_and_second_statements(
    bad: str, good: str, after: bool
) -> None:
    for q in (bad, f"{good}; {bad}" if after else f"{bad}; {good}"):
        with pytest.raises(SqlTagError):
            check_select(q)


VALUES = st.lists(st.one_of(st.none(), st.integers(-3, 12)), min_size=0, max_size=25)


@given(
    xs=VALUES,
    cuts=st.lists(st.sampled_from([0.25, 0.5, 0.75]), min_size=1, max_size=3, unique=True),
)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_percentile_buckets_match_numpy(
    engine: Engine, xs: list[int | None], cuts: list[float]
) -> None:
    cuts = sorted(cuts)
    set_profiles(engine, [{"customer_id": f"c{i:02d}", "points": x} for i, x in enumerate(xs)])
    t = tag(
        type="bucket",
        field="points",
        percentiles=cuts,
        labels=[f"b{i}" for i in range(len(cuts) + 1)],
    )
    build_tags(engine, {"t": t}, Clock(NOW))
    present = [x for x in xs if x is not None]
    expected: dict[str, str] = {}
    if present:
        edges = np.quantile(np.array(present, dtype=float), cuts)  # linear = continuous
        for i, x in enumerate(xs):
            if x is not None:
                b = next((j for j, c in enumerate(edges) if x <= c), len(cuts))
                expected[f"c{i:02d}"] = f"b{b}"
    assert values(engine) == expected


RANGE = st.tuples(
    st.one_of(st.none(), st.integers(-2, 8)), st.one_of(st.none(), st.integers(-2, 8))
)


@given(xs=VALUES, ranges=st.lists(RANGE, min_size=1, max_size=4))
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_range_buckets_match_python(
    engine: Engine, xs: list[int | None], ranges: list[tuple[int | None, int | None]]
) -> None:
    ranges = [
        (lo, hi)
        for lo, hi in ranges
        if (lo is not None or hi is not None) and (lo is None or hi is None or lo < hi)
    ]
    if not ranges:
        return
    set_profiles(engine, [{"customer_id": f"c{i:02d}", "points": x} for i, x in enumerate(xs)])
    spec = [{"value": f"r{j}", "min": lo, "max": hi} for j, (lo, hi) in enumerate(ranges)]
    build_tags(engine, {"t": tag(type="bucket", field="points", ranges=spec)}, Clock(NOW))
    expected = {}
    for i, x in enumerate(xs):
        if x is None:
            continue
        for j, (lo, hi) in enumerate(ranges):
            if (lo is None or x >= lo) and (hi is None or x < hi):
                expected[f"c{i:02d}"] = f"r{j}"
                break
    assert values(engine) == expected


EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.one_of(st.none(), st.sampled_from(["tea", "soap", "cup", "ink"])),
    ),
    max_size=30,
)


@given(evs=EVENTS, n=st.integers(1, 4))
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_top_n_matches_python(engine: Engine, evs: list[tuple[str, str | None]], n: int) -> None:
    set_profiles(engine, [{"customer_id": c} for c in "abc"])
    msgs = [
        {
            "message_id": f"m{i:03d}",
            "user_id": c,
            "event": "Product Viewed",
            "category": cat,
            "timestamp": NOW - timedelta(hours=i),
        }
        for i, (c, cat) in enumerate(evs)
    ]
    set_events(engine, msgs)
    build_tags(engine, {"t": tag(type="top_n", column="category", n=n)}, Clock(NOW))
    expected = {}
    for c in "abc":
        counts = Counter(cat for cust, cat in evs if cust == c and cat is not None)
        if counts:
            ranked = sorted(counts, key=lambda v: (-counts[v], v))[:n]
            expected[c] = ",".join(ranked)
    assert values(engine) == expected
