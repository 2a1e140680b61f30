"""The engine remembers the catalogue: fewer queries, and never a wrong answer it could see."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

import closedloop.portrait.tables
import closedloop.segments.tables  # noqa: F401  (declare the tables used here)
from closedloop.core.engine import Engine


def _count_listings(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = engine.con.list_tables

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.con, "list_tables", counted)
    return calls


def _membership(n: int) -> pa.Table:
    none = pa.array([None] * n, pa.timestamp("us", tz="UTC"))
    return pa.table(
        {
            "segment": ["s"] * n,
            "customer_id": [f"c{i}" for i in range(n)],
            "entered_at": none,
            "exited_at": none,
        }
    )


def test_known_tables_are_not_listed_again(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_listings(engine, monkeypatch)
    engine.replace("segment_membership", _membership(2))
    for _ in range(20):
        assert engine.table("segment_membership").count().execute() == 2
        assert engine.exists("segment_membership")
    assert calls[0] <= 1
    engine.table("profiles")  # a declared table never written: made empty, then known
    before = calls[0]
    assert engine.exists("profiles") and calls[0] == before


def test_a_name_not_known_is_looked_up_again(tmp_path: Path) -> None:
    url = f"duckdb:///{tmp_path}/w.duckdb"
    with Engine(url) as a, Engine(url) as b:
        assert not a.exists("segment_membership")
        b.replace("segment_membership", _membership(3))  # another engine made it
        assert a.exists("segment_membership")
        assert a.count("segment_membership") == 3


def test_own_writes_keep_it_current(engine: Engine) -> None:
    engine.replace("segment_membership", _membership(2))
    assert engine.count("segment_membership") == 2
    engine.replace("segment_membership", _membership(5))
    assert engine.count("segment_membership") == 5
    engine.drop("segment_membership")
    assert not engine.exists("segment_membership")
    assert engine.count("segment_membership") == 0  # declared: reads empty again
    engine.append("segment_membership", _membership(1))
    assert engine.count("segment_membership") == 1


def test_forget_after_ddl_behind_its_back(engine: Engine) -> None:
    engine.replace("segment_membership", _membership(2))
    assert engine.exists("segment_membership")
    engine.con.drop_table("segment_membership")
    assert engine.exists("segment_membership")  # it cannot see that: remembered
    engine.forget("segment_membership")
    assert not engine.exists("segment_membership")
    engine.replace("segment_membership", _membership(2))
    engine.con.drop_table("segment_membership")
    engine.forget()
    assert engine.count("segment_membership") == 0


def test_a_rolled_back_table_is_not_remembered(engine: Engine) -> None:
    engine.con.raw_sql("BEGIN TRANSACTION")
    engine.replace("segment_membership", _membership(2))
    assert engine.count("segment_membership") == 2
    engine.con.raw_sql("ROLLBACK")
    assert not engine.exists("segment_membership")
    assert engine.count("segment_membership") == 0  # made empty, outside a transaction
    engine.drop("segment_membership")
    with pytest.raises(RuntimeError), engine.transaction():
        engine.replace("segment_membership", _membership(2))
        raise RuntimeError("half way")
    assert not engine.exists("segment_membership")


def test_a_table_made_by_another_engine_between_look_and_create_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads' engines ensuring one table at once: the slower one's create finds it made
    (CI caught a loader thread dying on 'Table with name "loads" already exists')."""
    url = f"duckdb:///{tmp_path}/w.duckdb"
    with Engine(url) as a, Engine(url) as b:
        real = a.con.list_tables
        raced = [False]

        def look_then_lose_the_race(*args: Any, **kwargs: Any) -> Any:
            seen = real(*args, **kwargs)
            if not raced[0]:
                raced[0] = True
                b.replace("segment_membership", _membership(2))  # b wins between look and create
            return seen

        monkeypatch.setattr(a.con, "list_tables", look_then_lose_the_race)
        a.append("segment_membership", _membership(1))
        assert raced[0]
        assert a.count("segment_membership") == 3


def test_duckdb_is_limited_to_half_the_memory_unless_the_url_says(tmp_path: Path) -> None:
    from closedloop.core.engine import default_duckdb_memory_mb

    def limit_mib(engine: Engine) -> float:
        text = engine.con.raw_sql("SELECT current_setting('memory_limit')").fetchone()[0]
        number, unit = text.split()
        return float(number) * {"MiB": 1, "GiB": 1024}[unit]

    half = default_duckdb_memory_mb()
    assert half > 0
    with Engine(f"duckdb:///{tmp_path}/a.duckdb") as a:
        assert abs(limit_mib(a) - half) / half < 0.01  # DuckDB shows one decimal of GiB
    with Engine(f"duckdb:///{tmp_path}/b.duckdb?memory_limit=1500MiB") as b:
        assert 1400 < limit_mib(b) <= 1500  # one decimal of GiB shown
