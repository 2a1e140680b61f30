"""The engine and the catalogue: declared tables only, conformed schemas, atomic replaces."""

from __future__ import annotations

import ibis
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import closedloop.activate.tables
import closedloop.measure.tables
import closedloop.portrait.tables
import closedloop.segments.tables
import closedloop.tags.tables  # noqa: F401  (declare every stage's tables)
from closedloop.core.catalogue import CATALOGUE, STAGES, Catalogue, Erasure, TableSpec
from closedloop.core.engine import Engine, table_differences


def test_every_table_has_an_owner_a_key_and_an_erasure_rule() -> None:
    specs = list(CATALOGUE)
    assert {s.name for s in specs} >= {
        "events",
        "identity_map",
        "profiles",
        "deliveries",
        "campaign_results",
    }
    for s in specs:
        assert s.stage in STAGES and s.key
        assert isinstance(s.erasure, Erasure)
        if s.erasure.value.startswith("delete_by"):
            assert s.erasure_column in s.columns


def test_bad_declarations_are_refused() -> None:
    with pytest.raises(ValueError, match="key columns"):
        TableSpec("t", "collect", {"a": "string"}, ("b",), Erasure.NONE)
    with pytest.raises(ValueError, match="unknown stage"):
        TableSpec("t", "marketing", {"a": "string"}, ("a",), Erasure.NONE)
    with pytest.raises(ValueError, match="erasure_column"):
        TableSpec("t", "collect", {"a": "string"}, ("a",), Erasure.DELETE_BY_CUSTOMER)
    cat = Catalogue()
    cat.declare(TableSpec("t", "collect", {"a": "string"}, ("a",), Erasure.NONE))
    with pytest.raises(ValueError, match="declared twice"):
        cat.declare(TableSpec("t", "identity", {"a": "string"}, ("a",), Erasure.NONE))


def test_undeclared_tables_cannot_be_written(engine: Engine) -> None:
    with pytest.raises(KeyError, match="not declared"):
        engine.replace("my_table", pa.table({"a": [1]}))


def test_writes_are_conformed_to_the_declared_schema(engine: Engine) -> None:
    engine.replace(
        "tag_values",
        pa.table(
            {
                "tag": ["vip"],
                "value": [1],
                "customer_id": ["c1"],
                "computed_at": [None],
                "extra": [0],
            }
        ),
    )
    t = engine.table("tag_values")
    assert t.columns == ("customer_id", "tag", "value", "computed_at")
    assert t.value.type().is_string() and t.value.execute().tolist() == ["1"]
    with pytest.raises(ValueError, match="missing columns"):
        engine.append("tag_values", pa.table({"customer_id": ["c2"]}))


def test_declared_table_reads_empty_before_first_write(engine: Engine) -> None:
    assert engine.count("deliveries") == 0
    assert engine.table("deliveries").schema().names[0] == "delivery_id"


def test_failed_replace_leaves_the_old_table(engine: Engine) -> None:
    engine.replace(
        "tag_values",
        pa.table({"customer_id": ["c1"], "tag": ["t"], "value": ["x"], "computed_at": [None]}),
    )
    t = engine.table("tag_values")
    # A cast that fails at run time, half way through building the new table.
    broken = t.mutate(value=ibis.literal("not a number").cast("int64").cast("string"))
    with pytest.raises(Exception):  # noqa: B017 - the backend's own conversion error
        engine.replace("tag_values", broken)
    assert engine.table("tag_values").value.execute().tolist() == ["x"]


def test_temporary_tables_are_released(engine: Engine) -> None:
    before = set(engine.con.list_tables())
    for i in range(5):
        engine.append(
            "tag_values",
            pa.table(
                {"customer_id": [f"c{i}"], "tag": ["t"], "value": ["v"], "computed_at": [None]}
            ),
        )
    assert engine.count("tag_values") == 5
    assert set(engine.con.list_tables()) - before == {"tag_values"}


def test_file_engine_persists(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "sub" / "w.duckdb"
    with Engine(f"duckdb:///{path}") as e:
        e.append(
            "tag_values",
            pa.table({"customer_id": ["c"], "tag": ["t"], "value": ["v"], "computed_at": [None]}),
        )
    with Engine(f"duckdb:///{path}") as e:
        assert e.count("tag_values") == 1
        assert e.can("local_arrow") and not e.can("nothing")


_ROWS = st.lists(
    st.tuples(
        st.one_of(st.none(), st.integers(-3, 3)),
        st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False)),
        st.one_of(st.none(), st.lists(st.sampled_from("abc"), max_size=3)),
    ),
    max_size=12,
)


def _table(rows: list[tuple[int | None, float | None, list[str] | None]]) -> pa.Table:
    return pa.table(
        {
            "i": pa.array([r[0] for r in rows], pa.int64()),
            "f": pa.array([r[1] for r in rows], pa.float64()),
            "a": pa.array([r[2] for r in rows], pa.list_(pa.string())),
        }
    )


@settings(max_examples=150, deadline=None)
@given(rows=_ROWS, data=st.data())
def test_table_differences_ignore_order_and_rounding_but_nothing_else(
    rows: list[tuple[int | None, float | None, list[str] | None]], data: st.DataObject
) -> None:
    """Two engines' copies of a table: equal in any row order, floats to ``rtol``."""
    shuffled = data.draw(st.permutations(rows))
    nudged = [(i, None if f is None else f * (1 + 1e-12), a) for i, f, a in shuffled]
    assert table_differences(_table(rows), _table(nudged), rtol=1e-9) == []
    if rows:
        k = data.draw(st.integers(0, len(rows) - 1))
        i, f, a = rows[k]
        changed = list(rows)
        changed[k] = (i, f, [*(a or []), "z"])
        assert table_differences(_table(rows), _table(changed)) != []
        assert table_differences(_table(rows), _table(rows[:k] + rows[k + 1 :])) != []
        changed[k] = (i, 1.0 if f is None else f + max(1.0, abs(f) * 1e-6), a)
        assert table_differences(_table(rows), _table(changed), rtol=1e-9) != []


def test_table_differences_name_the_column_and_types() -> None:
    a = pa.table({"x": pa.array([1, 2], pa.int64())})
    assert table_differences(a, pa.table({"x": pa.array([1, 3], pa.int64())})) == [
        "row 1 x: 2 != 3"
    ]
    assert table_differences(a, pa.table({"x": pa.array([1, 2], pa.int32())})) == [
        "x: type int64 != int32"
    ]
    assert table_differences(a, pa.table({"y": [1, 2]})) == ["columns ['x'] != ['y']"]
