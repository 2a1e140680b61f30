"""Shared fixtures: a real in-memory DuckDB engine with every stage's tables declared."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pytest

import closedloop.collect.tables
import closedloop.identity.tables
from closedloop.core.engine import Engine

# pytest-xdist hands its workers the controller's terminal size as COLUMNS/LINES, and a
# rich Console created at import keeps a width found in the environment then: the CLI's
# tables would be cut at 80 columns in a worker whatever width a test asks for.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)

# The JVM of a test worker's Spark session lives a minute or two and runs hundreds of tiny
# jobs: the optimising JIT compiler (C2) and the parallel garbage collector cost it more CPU
# than they win back (measured alone, JVM CPU seconds: tests/test_spark.py 18.4 -> 8.0,
# identity's incremental test 87 -> 54, the whole build 96 -> 61). Neither changes what
# Java computes. Set here, at import, so every worker's session gets it whichever Spark test
# starts it; a PYSPARK_SUBMIT_ARGS given by the caller is kept.
TEST_JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
os.environ.setdefault(
    "PYSPARK_SUBMIT_ARGS", f'--driver-java-options "{TEST_JVM_OPTIONS}" pyspark-shell'
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the tests marked slow first.

    `make test` spreads the suite over the machine's cores (pytest-xdist, work stealing):
    started first, the long runs overlap the many short ones instead of one of them
    starting last and leaving the other cores idle at the end.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """With ``CLOSEDLOOP_TEST_CPU=FILE``, append each test's CPU seconds to FILE (JSON lines).

    Wall times of a parallel suite on a shared 2-core machine say little; CPU seconds of
    the test process and the children it waited for (servers, PostgreSQL clients, Spark
    jobs count only when their process ends) show where the suite's budget goes.
    """
    out = os.environ.get("CLOSEDLOOP_TEST_CPU")
    if not out:
        yield
        return
    import resource

    def cpu() -> float:
        s = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    import time

    c0, w0 = cpu(), time.perf_counter()
    yield
    row = {
        "test": item.nodeid,
        "cpu": round(cpu() - c0, 3),
        "wall": round(time.perf_counter() - w0, 3),
    }
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With ``CLOSEDLOOP_TEST_CPU=FILE``, failures are written there too (which test, when)."""
    out = os.environ.get("CLOSEDLOOP_TEST_CPU")
    if out and report.failed:
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps({"test": report.nodeid, "failed": report.when}) + "\n")


@pytest.fixture
def engine() -> Iterator[Engine]:
    e = Engine("duckdb://")
    yield e
    e.close()


def event_rows(messages: list[dict[str, Any]], source: str = "web") -> pa.Table:
    """Rows for the `events` table from short message dicts (test data, not via collect)."""
    cols = closedloop.collect.tables.EVENTS.columns
    rows = []
    for i, m in enumerate(messages):
        ts = m.get("timestamp", datetime(2026, 1, 1, tzinfo=UTC))
        row: dict[str, Any] = dict.fromkeys(cols)
        row.update(
            message_id=m.get("message_id", f"m{i}"),
            type=m.get("type", "track"),
            event=m.get("event"),
            user_id=m.get("user_id"),
            anonymous_id=m.get("anonymous_id"),
            timestamp=ts,
            received_at=ts,
            source=m.get("source", source),
            channel=m.get("channel", source),
            traits=json.dumps(m["traits"]) if "traits" in m else None,
            context=json.dumps(m["context"]) if "context" in m else None,
            properties=json.dumps(m.get("properties", {})),
            revenue=m.get("revenue"),
            order_id=m.get("order_id"),
            category=m.get("category"),
            coupon=m.get("properties", {}).get("coupon"),
        )
        rows.append(row)
    return pa.Table.from_pylist(rows)


def add_events(engine: Engine, messages: list[dict[str, Any]], source: str = "web") -> None:
    engine.append("events", event_rows(messages, source))
