"""The engine's Spark compatibility layer computes what DuckDB computes, primitive by primitive.

Each case runs one small Ibis expression on both engines and asks for the same rows: ordered
aggregates (Ibis 12 refuses them on Spark), epoch seconds with their fraction, timestamps
that read back as UTC instants, and a replace whose new rows are read from the old ones.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import ibis
import ibis.expr.types as ir
import pyarrow as pa
import pytest

from closedloop.core.catalogue import Catalogue, Erasure, TableSpec
from closedloop.core.engine import Engine, table_differences
from tests.test_spark import _need_java

pytest.importorskip("pyspark")

DATA = pa.table(
    {
        "g": [1, 1, 1, 1, 1, 2, 2, 3],
        "k": [1, 3, None, 3, 2, 2, 2, 1],
        "v": ["a", "b", "c", None, "d", "x", "y", None],
        "ts": pa.array(
            [datetime(2026, 3, 29, 1, 59, 59, 250_000, tzinfo=UTC)] * 8,
            pa.timestamp("us", tz="UTC"),
        ),
    }
)


def ordered_aggregates(t: ir.Table) -> ir.Table:
    return t.group_by("g").aggregate(
        desc_then_asc=t.v.collect(order_by=[ibis.desc(t.k), t.v]),
        asc_then_desc=t.v.group_concat(",", order_by=[t.k, ibis.desc(t.v)]),
        nulls_first=t.v.collect(order_by=t.k.asc(nulls_first=True)),
        filtered=t.v.collect(order_by=t.k, where=t.k > 1),
    )


def instants(t: ir.Table) -> ir.Table:
    return t.select(
        "g",
        "ts",
        days=t.ts.epoch_seconds() / 86400.0,
        hour=t.ts.hour(),
        day=t.ts.date(),
        later=t.ts > ibis.literal(datetime(2026, 3, 29, 1, 59, 59, tzinfo=UTC)),
    )


# JSON documents whose ``n`` every engine reads alike. (Not among them: a number or boolean
# written as a string, ``{"n": "5"}`` — Spark's ``get_json_object`` returns it unquoted, so
# Spark reads 5 where DuckDB reads null for int64; the engine docstring says so.)
DOCS = [
    '{"n": 5}',
    '{"n": -12}',
    '{"n": 5.5}',
    '{"n": -0.25e2}',
    '{"n": 1E3}',
    '{"n": "x"}',
    '{"n": true}',
    '{"n": false}',
    '{"n": null}',
    '{"n": {"a": 1}}',
    '{"n": [1, 2]}',
    "{}",
    None,
]


def unwrapped(t: ir.Table) -> ir.Table:
    n = t.doc.cast("json")["n"]
    return t.select(
        "i",
        i64=n.unwrap_as("int64"),
        f64=n.unwrap_as("float64"),
        b=n.unwrap_as("boolean"),
    )


@pytest.mark.spark
def test_spark_unwraps_json_scalars_as_duckdb_does() -> None:
    _need_java()
    data = pa.table({"i": range(len(DOCS)), "doc": pa.array(DOCS, pa.string())})
    got = {}
    for url in ("duckdb://", "pyspark://"):
        with Engine(url) as engine, engine.temporary(data) as t:
            got[url] = unwrapped(t).to_pyarrow()
    assert table_differences(got["duckdb://"], got["pyspark://"], rtol=0.0) == []
    rows = got["pyspark://"].sort_by("i").to_pylist()
    assert [r["i64"] for r in rows[:5]] == [5, -12, None, None, None]
    assert [r["f64"] for r in rows[:5]] == [5.0, -12.0, 5.5, -25.0, 1000.0]
    assert [r["b"] for r in rows[5:8]] == [None, True, False]


def _rows(url: str, query: Callable[[ir.Table], ir.Table]) -> pa.Table:
    with Engine(url) as engine, engine.temporary(DATA) as t:
        result: pa.Table = query(t).to_pyarrow()
    return result


@pytest.mark.spark
@pytest.mark.parametrize("query", [ordered_aggregates, instants])
def test_spark_primitives_equal_duckdb(query: Callable[[ir.Table], ir.Table]) -> None:
    _need_java()
    duck = _rows("duckdb://", query)
    spark = _rows("pyspark://", query)
    assert table_differences(duck, spark, rtol=0.0) == []
    if query is ordered_aggregates:  # the expected values, said plainly
        got = {r["g"]: r for r in spark.to_pylist()}
        assert got[1]["desc_then_asc"] == ["b", "d", "a", "c"]
        assert got[1]["asc_then_desc"] == "a,d,b,c"
        assert got[1]["nulls_first"] == ["c", "a", "d", "b"]
        assert got[3]["filtered"] is None and got[3]["asc_then_desc"] is None
    else:
        row = spark.to_pylist()[0]
        assert row["ts"].tzinfo is not None and row["days"] * 86400 % 1 == pytest.approx(0.25)


@pytest.mark.spark
def test_spark_replace_may_read_the_table_it_replaces() -> None:
    """A new version computed from the old one (Spark refuses to overwrite what it reads)."""
    _need_java()
    cat = Catalogue()
    cat.declare(TableSpec("counter", "collect", {"n": "int64"}, ("n",), Erasure.NONE))
    with Engine("pyspark://", catalogue=cat) as engine:
        engine.replace("counter", pa.table({"n": [1, 2]}))
        old = engine.table("counter")
        engine.replace("counter", old.mutate(n=old.n + 10))
        assert sorted(engine.table("counter").n.to_pyarrow().to_pylist()) == [11, 12]
        bad = engine.table("counter")
        with pytest.raises(Exception):  # noqa: B017 - any Spark error will do
            engine.replace("counter", bad.mutate(n=(bad.n.cast("string") + "x").cast("int64")))
        # a failed replace leaves the old rows (and no half-written table beside them)
        assert sorted(engine.table("counter").n.to_pyarrow().to_pylist()) == [11, 12]
        assert [t for t in engine.con.list_tables() if t.startswith("counter")] == ["counter"]
