"""``row_digest``: equal digests exactly for equal rows, natively on DuckDB and in the
portable form (text with length prefixes, hashed) on DuckDB and on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from closedloop.core.engine import Engine
from closedloop.tags.incremental import row_digest
from tests.test_backends import postgres_url  # noqa: F401  (the fixture that starts PostgreSQL)

T = datetime(2026, 11, 20, tzinfo=UTC)
COLS = {"s": pa.string(), "i": pa.int64(), "f": pa.float64(), "t": pa.timestamp("us", tz="UTC")}
# Texts that would run together without the length prefixes ("1:a" + "b" vs "1:ab"), the
# null marker itself, and the empty string beside null.
texts = st.none() | st.sampled_from(["", "~", "a", "ab", "b", "1:a", "1:ab", ":", "é"])
rows = st.tuples(
    texts,
    st.none() | st.integers(-3, 12),
    st.none() | st.sampled_from([0.1, 1.0, 2.5, 1e-7, 123456.789]),
    st.none() | st.integers(0, 3).map(lambda h: T + timedelta(hours=h)),
)
pairs = st.lists(st.tuples(rows, rows) | rows.map(lambda r: (r, r)), min_size=1, max_size=12)


def _digests(engine: Engine, data: list[tuple[Any, Any]], portable: bool) -> list[bool]:
    """For each pair, whether the two rows got the same digest (one query over a table)."""
    table: dict[str, pa.Array] = {"n": pa.array(range(len(data)), pa.int64())}
    for side, k in (("a", 0), ("b", 1)):
        for j, (c, typ) in enumerate(COLS.items()):
            table[f"{side}_{c}"] = pa.array([p[k][j] for p in data], typ)
    with engine.temporary(pa.table(table)) as t:
        a = row_digest(engine, {c: t[f"a_{c}"] for c in COLS}, portable=portable)
        b = row_digest(engine, {c: t[f"b_{c}"] for c in COLS}, portable=portable)
        got = t.select("n", same=a == b).order_by("n").to_pyarrow().to_pylist()
    return [bool(r["same"]) for r in got]


@pytest.fixture(scope="module")
def duck() -> Iterator[Engine]:
    with Engine("duckdb://") as e:
        yield e


# Rows that a careless digest confuses: values run together, empty vs null, a microsecond.
TRICKY = [
    (("a", 1, 0.1, T), ("a", 1, 0.1, T)),
    (("a", 1, 0.1, T), ("a", 2, 0.1, T)),
    (("ab", None, None, None), ("a", None, None, None)),
    (("1:a", 1, None, None), ("1", None, None, None)),
    (("", None, None, None), (None, None, None, None)),
    ((None, None, None, T), (None, None, None, T + timedelta(microseconds=1))),
    ((None, None, 2.5, None), (None, None, 2.5, None)),
    ((None, None, None, None), (None, None, None, None)),
]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=pairs, portable=st.booleans())
@example(data=[(("1:a", 1, None, None), ("1", None, None, None))], portable=True)
@example(data=[(("", None, None, None), (None, None, None, None))], portable=True)
def test_same_digest_exactly_for_same_row(
    duck: Engine, data: list[tuple[Any, Any]], portable: bool
) -> None:
    assert _digests(duck, data, portable) == [a == b for a, b in data]


@pytest.mark.postgres
def test_portable_digest_on_postgres(postgres_url: str) -> None:  # noqa: F811
    with Engine(postgres_url) as engine:
        assert not engine.can("row_hash")  # the portable form is the one in use there
        assert _digests(engine, TRICKY, portable=False) == [a == b for a, b in TRICKY]
