"""``tag_values`` (and ``profiles``) are written with ZSTD forced on DuckDB, then the setting
is restored: DuckDB's default compression analysis of millions of random customer ids cost
more than computing the tags (``Engine.zstd_writes``)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.tags.build import build_tags
from tests.tags.helpers import NOW, set_profiles, tag, values


def compressions(engine: Engine, table: str, column: str) -> set[str]:
    con = engine.con.con
    con.execute("CHECKPOINT")
    rows = con.execute(
        "SELECT DISTINCT compression FROM pragma_storage_info(?) WHERE column_name = ?",
        [table, column],
    ).fetchall()
    return {str(r[0]) for r in rows}


def test_tag_values_are_zstd_and_the_setting_is_restored(tmp_path: Path) -> None:
    with Engine(f"duckdb://{tmp_path / 'w.duckdb'}") as engine:
        con = engine.con.con
        before = con.execute("SELECT current_setting('force_compression')").fetchone()
        # Enough rows for DuckDB to write row groups straight to the file (small tables go
        # through its log and are compressed at the next checkpoint, as it chooses).
        rows = [
            {"customer_id": f"c_{i:06x}{i * 7919 % 9973:04x}", "orders": i % 3}
            for i in range(50_000)
        ]
        set_profiles(engine, rows)
        rule = {"trait": "orders", "op": "gte", "value": 1}
        six = {
            name: tag(name=name, rules=[{"value": "yes", "when": rule}], default="no")
            for name in ("t", "a", "b", "c", "d", "e")
        }
        build_tags(engine, six, Clock(NOW))
        # DuckDB applies ZSTD to long strings only: short ids are stored as they are, never
        # analysed for a dictionary or FSST.
        cheap = {"ZSTD", "Uncompressed", "Constant"}
        assert compressions(engine, "tag_values", "customer_id") <= cheap
        after = con.execute("SELECT current_setting('force_compression')").fetchone()
        assert after == before
        got = values(engine)
        assert got == {r["customer_id"]: "yes" if r["orders"] >= 1 else "no" for r in rows}
        # Tables written afterwards are compressed as DuckDB chooses again.
        con.execute("CREATE TABLE later AS SELECT * FROM tag_values")
        assert not compressions(engine, "later", "customer_id") <= cheap


def test_zstd_writes_restores_the_setting_when_the_write_fails(tmp_path: Path) -> None:
    with Engine(f"duckdb://{tmp_path / 'w.duckdb'}") as engine:
        con = engine.con.con
        before = con.execute("SELECT current_setting('force_compression')").fetchone()
        with pytest.raises(duckdb.Error), engine.zstd_writes():
            con.execute("SELECT no_such_column FROM (SELECT 1 AS x)")
        assert con.execute("SELECT current_setting('force_compression')").fetchone() == before
