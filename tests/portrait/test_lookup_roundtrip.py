"""Property: any profile row read from the serving store equals the warehouse's row.

The store carries rows as JSON arrays (timestamps as epoch microseconds, dates as ISO text)
and reads them back by the column types; random rows check that nothing is lost on the way:
quotes and non-ASCII text, extreme numbers, nulls, times with and without a time zone.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop.core.definitions import IdentifierType, IdentityConfig
from closedloop.core.engine import Engine
from closedloop.portrait.lookup import ProfileLookup, materialise

SCHEMA = pa.schema(
    [
        ("customer_id", pa.string()),
        ("name", pa.string()),
        ("points", pa.int64()),
        ("revenue", pa.float64()),
        ("consent", pa.bool_()),
        ("birthday", pa.date32()),
        ("seen_at", pa.timestamp("us", tz="UTC")),
        ("local_at", pa.timestamp("us")),
    ]
)
IDENTITY = IdentityConfig(
    types=[
        IdentifierType(
            name="email", normaliser="email", priority=1, strong=True, paths=["traits.email"]
        )
    ]
)
moments = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1))
rows = st.fixed_dictionaries(
    {
        "name": st.none() | st.text(max_size=20),
        "points": st.none() | st.integers(-(2**63), 2**63 - 1),
        "revenue": st.none() | st.floats(allow_nan=False, width=64),
        "consent": st.none() | st.booleans(),
        "birthday": st.none() | st.dates(date(1, 1, 1), date(9999, 12, 31)),
        "seen_at": st.none() | moments.map(lambda d: d.replace(tzinfo=UTC)),
        "local_at": st.none() | moments,
    }
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(rows, min_size=1, max_size=5))
def test_served_rows_equal_the_warehouse(tmp_path: Path, drawn: list[dict[str, Any]]) -> None:
    folder = tmp_path / uuid.uuid4().hex
    folder.mkdir()
    profiles = [{"customer_id": f"c{i}", **r} for i, r in enumerate(drawn)]
    idmap = {
        "id_type": ["email"] * len(profiles),
        "id_value": [f"p{i}@example.org" for i in range(len(profiles))],
        "customer_id": [p["customer_id"] for p in profiles],
        "quarantined": [False] * len(profiles),
    }
    with Engine(f"duckdb://{folder}/w.duckdb") as engine:
        engine.con.create_table("profiles", pa.Table.from_pylist(profiles, schema=SCHEMA))
        engine.con.create_table("identity_map", pa.table(idmap))
        assert materialise(engine) is not None
        with ProfileLookup.open(engine, IDENTITY) as lookup:
            assert lookup.source == "serving"
            for i, expected in enumerate(profiles):
                m = lookup.find(f" P{i}@Example.org ")
                assert m is not None and m.profile == expected
