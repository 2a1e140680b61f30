"""The DuckDB-only shortcuts of the build give exactly what the portable expressions give.

The portrait reads the time zone and consent from ``context`` with one DuckDB JSON parse and
the local hour and weekday from epoch arithmetic (``build.context_fields``,
``extras.local_hour_weekday``); lists of ranked values are joined per rank
(``extras.join_ranked``). Each is checked here against the portable Ibis expression it
replaces, on random inputs, on a real DuckDB.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import ibis
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from closedloop.core.engine import Engine
from closedloop.portrait.build import _latest_traits, context_fields
from closedloop.portrait.extras import join_ranked, local_hour_weekday

TS = pa.timestamp("us", tz="UTC")

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
documents = st.dictionaries(
    st.sampled_from(["timezone", "tz", "zone", "timezonE", "a", "consent"]), json_values, max_size=4
)
# Consent documents: the path ``consent.categoryPreferences.marketing`` present or nearly so.
consents = st.fixed_dictionaries(
    {"categoryPreferences": st.dictionaries(st.sampled_from(["marketing", "ads"]), json_values)}
)


def _consent(d: dict[str, Any]) -> bool | None:
    c = d.get("consent")
    prefs = c.get("categoryPreferences") if isinstance(c, dict) else None
    value = prefs.get("marketing") if isinstance(prefs, dict) else None
    return value if isinstance(value, bool) else None


@settings(max_examples=40, deadline=None)
@given(
    docs=st.lists(documents, min_size=1, max_size=8),
    consent=st.lists(st.none() | consents, min_size=1, max_size=8),
    escape=st.booleans(),
)
def test_context_fields_on_duckdb_equal_the_portable_unwrap(
    docs: list[dict[str, Any]], consent: list[dict[str, Any] | None], escape: bool
) -> None:
    for d, c in zip(docs, consent, strict=False):
        if c is not None:
            d["consent"] = c
    texts = [json.dumps(d, ensure_ascii=escape) for d in docs]
    with Engine("duckdb://") as engine, engine.temporary(pa.table({"context": texts})) as t:
        fast = context_fields(t, duckdb=True).to_pyarrow()
        portable = context_fields(t, duckdb=False).to_pyarrow()
    assert fast.column("tz").to_pylist() == portable.column("tz").to_pylist()
    assert fast.column("consent").to_pylist() == portable.column("consent").to_pylist()
    assert portable.column("tz").to_pylist() == [
        d["timezone"] if isinstance(d.get("timezone"), str) else None for d in docs
    ]
    assert portable.column("consent").to_pylist() == [_consent(d) for d in docs]


@settings(max_examples=30, deadline=None)
@given(
    micros=st.lists(st.integers(-(10**15), 4 * 10**15), min_size=1, max_size=20),  # 1938 .. 2096
    quarters=st.lists(st.integers(-14 * 4, 14 * 4), min_size=1, max_size=20),
)
def test_local_hour_and_weekday_from_epoch_equal_the_calendar(
    micros: list[int], quarters: list[int]
) -> None:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    ts = [epoch + timedelta(microseconds=m) for m in micros]
    offsets = [quarters[i % len(quarters)] * 900 for i in range(len(ts))]
    data = pa.table({"ts": pa.array(ts, TS), "o": pa.array(offsets, pa.int64())})
    with Engine("duckdb://") as engine, engine.temporary(data) as t:
        fh, fd = local_hour_weekday(t.ts, t.o, duckdb=True)
        ph, pd = local_hour_weekday(t.ts, t.o, duckdb=False)
        out = t.select(fh=fh, fd=fd, ph=ph, pd=pd).to_pyarrow().to_pylist()
    expected = [
        ((x + timedelta(seconds=o)).hour, (x + timedelta(seconds=o)).weekday())
        for x, o in zip(ts, offsets, strict=True)
    ]
    assert [(r["fh"], r["fd"]) for r in out] == expected
    assert [(r["ph"], r["pd"]) for r in out] == expected


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.sampled_from(["c1", "c2", "c3"]), st.sampled_from(["x", "y", "z", "w"])),
        min_size=1,
        max_size=30,
    ),
    n=st.integers(1, 4),
)
def test_join_ranked_equals_the_list_in_rank_order(rows: list[tuple[str, str]], n: int) -> None:
    data = pa.table({"customer_id": [c for c, _ in rows], "v": [v for _, v in rows]})
    with Engine("duckdb://") as engine, engine.temporary(data) as t:
        counts = t.group_by("customer_id", "v").aggregate(k=t.count())
        rank = ibis.row_number().over(
            group_by=counts.customer_id, order_by=[ibis.desc(counts.k), counts.v]
        )
        top = counts.mutate(rank=rank).filter(lambda x: x.rank < n)
        got = join_ranked(top, top.v, top.rank, n, "top").to_pyarrow().to_pylist()
    expected: dict[str, str] = {}
    for c in {c for c, _ in rows}:
        tally: dict[str, int] = {}
        for cc, v in rows:
            if cc == c:
                tally[v] = tally.get(v, 0) + 1
        ordered = sorted(tally, key=lambda v: (-tally[v], v))[:n]
        expected[c] = ",".join(ordered)
    assert {r["customer_id"]: r["top"] for r in got} == expected


trait_documents = st.dictionaries(
    st.sampled_from(["name", "city", "points", "birthday", "tier", "Name", "x"]),
    json_values,
    max_size=4,
)


def _nested(v: Any) -> bool:
    return isinstance(v, list | dict)


@settings(max_examples=20, deadline=None)
@given(docs=st.lists(st.none() | trait_documents, min_size=1, max_size=8), escape=st.booleans())
def test_latest_traits_on_duckdb_equal_the_portable_reading(
    docs: list[dict[str, Any] | None], escape: bool
) -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    data = pa.table(
        {
            "customer_id": [f"c{i % 3}" for i in range(len(docs))],
            "timestamp": pa.array([base + timedelta(hours=i) for i in range(len(docs))], TS),
            "traits": [None if d is None else json.dumps(d, ensure_ascii=escape) for d in docs],
        }
    )
    with Engine("duckdb://") as engine, engine.temporary(data) as t:
        fast = _latest_traits(t, duckdb=True).order_by("customer_id").to_pyarrow()
        portable = _latest_traits(t, duckdb=False).order_by("customer_id").to_pyarrow()
    assert fast.to_pylist() == portable.to_pylist()
    # the city of a customer's last document naming one (as text or an integer)
    for row in portable.to_pylist():
        mine = [d for i, d in enumerate(docs) if f"c{i % 3}" == row["customer_id"] and d]
        values = [d.get("city") for d in mine]
        values = [v for v in values if v is not None and not _nested(v)]  # lists: no city
        if any(isinstance(v, bool | float) for v in values):
            continue  # booleans and floats: the engine's own text for them
        cities = [v.strip() if isinstance(v, str) else str(v) for v in values]
        cities = [c for c in cities if c]
        assert row["city"] == (cities[-1] if cities else None)
