"""Sequences on PostgreSQL give the same members as on DuckDB (window frames, intervals)."""

from __future__ import annotations

from typing import Any

import pytest

from closedloop.core.engine import Engine
from tests.segments.test_sequence import ADD, ORDER, VIEW, ev, load, members
from tests.test_backends import postgres_url as postgres_url  # the fixture

EVENTS = [
    ev("a", VIEW, 120, category="tea"),
    ev("a", ADD, 100, size=3),
    ev("a", ORDER, 60),
    ev("b", ORDER, 120),
    ev("b", VIEW, 60),
    ev("b", ADD, 300),
    ev("c", VIEW, 300, category="tea"),
    ev("c", ADD, 299, size=1),
    ev("c", ORDER, 60),
    ev("d", VIEW, 60),
    ev("d", ORDER, 60),
    ev("d", ADD, 2000),
]
CONDITIONS: list[dict[str, Any]] = [
    {"sequence": [{"event": VIEW}, {"event": ORDER}], "within": "2h"},
    {"sequence": [{"event": VIEW}, {"event": ORDER}], "within": "4h", "within_days": 1},
    {
        "sequence": [
            {"event": VIEW, "where": [{"property": "category", "op": "eq", "value": "tea"}]},
            {"event": ADD, "where": [{"property": "size", "op": ">=", "value": 1}]},
            {"event": ORDER},
        ],
        "within": "5h",
    },
    {"sequence": [{"event": ADD}, {"event": ORDER, "absent": True}], "within": "1h"},
    {"not": {"sequence": [{"event": ADD}, {"event": ORDER}], "within": "1d"}},
]


@pytest.mark.postgres
def test_sequences_on_postgres_equal_duckdb(postgres_url: str) -> None:
    got: dict[str, list[list[str]]] = {}
    for url in ("duckdb://", postgres_url):
        engine = Engine(url)
        try:
            load(engine, EVENTS)
            got[url] = [members(engine, c) for c in CONDITIONS]
        finally:
            engine.close()
    assert got["duckdb://"] == got[postgres_url]
    assert got["duckdb://"][0] == ["a"]
