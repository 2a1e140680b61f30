"""Fixtures for collect: a real in-memory DuckDB engine, a source, a pinned clock."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import closedloop.collect.tables  # noqa: F401  - declares the tables collect writes
from closedloop.core.clock import Clock
from closedloop.core.definitions import Source
from closedloop.core.engine import Engine

NOW = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def engine() -> Iterator[Engine]:
    e = Engine("duckdb://")
    yield e
    e.close()


@pytest.fixture
def source() -> Source:
    return Source(name="web", channel="web", write_key="wk_test_web_0001")


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    """Write lines to a file: dicts/lists as JSON, strings verbatim."""
    with path.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(line if isinstance(line, str) else json.dumps(line))
            f.write("\n")
    return path


def rows(engine: Engine, table: str, order_by: str | None = None) -> list[dict[str, Any]]:
    t = engine.table(table)
    if order_by:
        t = t.order_by(order_by)
    result: list[dict[str, Any]] = engine.to_arrow(t).to_pylist()
    return result


def track(i: int, **extra: Any) -> dict[str, Any]:
    """A valid track message with messageId ``m{i}``."""
    msg: dict[str, Any] = {
        "type": "track",
        "event": "Product Viewed",
        "userId": f"u{i}",
        "messageId": f"m{i}",
        "timestamp": "2024-03-01T10:00:00Z",
        "properties": {"sku": f"s{i}"},
    }
    msg.update(extra)
    return msg
