"""The engine and the catalogue: declared tables only, conformed schemas, atomic replaces."""

from __future__ import annotations

import ibis
import pyarrow as pa
import pytest

import closedloop.activate.tables
import closedloop.measure.tables
import closedloop.portrait.tables
import closedloop.segments.tables
import closedloop.tags.tables  # noqa: F401  (declare every stage's tables)
from closedloop.core.catalogue import CATALOGUE, STAGES, Catalogue, Erasure, TableSpec
from closedloop.core.engine import Engine


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
