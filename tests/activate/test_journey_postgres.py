"""The journey worker on a real PostgreSQL: an event trigger, a wait for an event with a
timeout, a branch on a trait and a send; a crash at any checkpoint and a re-run send nothing
twice — the same scenario and outcome as on DuckDB."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from closedloop.activate.worker import tick
from closedloop.collect.tables import EVENTS
from closedloop.core.clock import Clock
from closedloop.core.definitions import Project
from closedloop.core.engine import Engine
from closedloop.segments.audience import Fields, evaluate_segment
from tests.activate.test_journey import EVERYONE, T0, make_project, outbox_lines
from tests.conftest import event_rows
from tests.tags.helpers import set_profiles
from tests.test_backends import postgres_url as postgres_url  # the fixture

JOURNEY = """\
name: cart
audience: everyone
holdout: 0.2
template: "x"
trigger: {event: Product Added}
steps:
  - id: wait_order
    wait_for: {event: Order Completed, timeout: 2h}
    on_event: done
    on_timeout: by_tier
  - id: by_tier
    branch: {when: {trait: tier, op: eq, value: gold}, then: gold, else: plain}
  - {id: gold, send: {template: "gold {{ name }}"}, next: done}
  - {id: plain, send: {template: "plain {{ name }}"}}
  - {id: done, exit: true}
"""
TICKS = [T0 + timedelta(minutes=1), T0 + timedelta(hours=1), T0 + timedelta(hours=2, minutes=5)]


class Crash(Exception):
    pass


def setup(engine: Engine, root: Path) -> tuple[Project, Path]:
    for name in engine.con.list_tables():  # a fresh warehouse in the same database
        engine.con.drop_table(name)
    engine.forget()  # tables dropped behind the engine's back (it remembers what exists)
    project = make_project(root / "p", {"cart": JOURNEY})
    ids = [f"c{i:03d}" for i in range(12)]
    set_profiles(
        engine,
        [
            {
                "customer_id": c,
                "name": f"N{i}",
                "email": f"p{i}@x.cn",
                "consent_marketing": True,
                "timezone": "Asia/Shanghai",
                "tier": "gold" if i % 3 == 0 else "silver",
            }
            for i, c in enumerate(ids)
        ],
    )
    evaluate_segment(engine, EVERYONE, Fields(), Clock(T0 - timedelta(days=30)))
    imap = [
        {
            "id_type": "member_id",
            "id_value": c,
            "customer_id": c,
            "quarantined": False,
            "first_seen": T0 - timedelta(days=60),
            "last_seen": T0 - timedelta(days=1),
            "messages": 1,
        }
        for c in ids
    ]
    engine.append("identity_map", pa.Table.from_pylist(imap))
    messages: list[dict[str, Any]] = [
        {"message_id": f"add{i}", "user_id": c, "event": "Product Added", "timestamp": T0}
        for i, c in enumerate(ids)
    ]
    messages += [  # two of them buy within the wait: their journey ends without a message
        {
            "message_id": f"buy{i}",
            "user_id": ids[i],
            "event": "Order Completed",
            "timestamp": T0 + timedelta(minutes=30),
        }
        for i in (1, 3)
    ]
    schema = EVENTS.schema.to_pyarrow()  # typed: PostgreSQL refuses null-typed columns
    engine.append("events", event_rows(messages).select(schema.names).cast(schema))
    return project, root / "outbox"


def sends(engine: Engine, out: Path) -> tuple[Counter[tuple[str, str, str]], int]:
    lines = outbox_lines(out)
    d = engine.table("deliveries")
    logged = int(d.filter(d.status == "sent").count().execute())
    return Counter((x["customer_id"], x["occasion"], x["body"]) for x in lines), logged


def run(engine: Engine, root: Path, crash_at: int | None) -> tuple[Counter[Any], int, list[str]]:
    project, out = setup(engine, root)
    seen: list[str] = []
    calls = 0

    def hook(name: str) -> None:
        nonlocal calls
        seen.append(name)
        calls += 1
        if crash_at is not None and calls == crash_at + 1:
            raise Crash(name)

    crashed = False
    for now in TICKS:
        try:
            tick(engine, project, now, outbox_dir=out, checkpoint=None if crashed else hook)
        except Crash:
            crashed = True
            tick(engine, project, now, outbox_dir=out)
    assert crashed == (crash_at is not None)
    got, logged = sends(engine, out)
    return got, logged, seen


@pytest.mark.postgres
@pytest.mark.slow  # a dozen crash-and-resume runs on a real server
def test_journey_on_postgres_equals_duckdb_and_survives_crashes(
    postgres_url: str, tmp_path: Path
) -> None:
    with Engine("duckdb://") as duck:
        expected, expected_logged, _ = run(duck, tmp_path / "duck", None)
    with Engine(postgres_url) as pg:
        clean, logged, seen = run(pg, tmp_path / "pg", None)
        assert clean == expected and logged == expected_logged
        assert clean and max(clean.values()) == 1
        bodies = {b.split()[0] for _, _, b in clean}
        assert bodies == {"gold", "plain"}  # the branch went both ways
        assert not any(c in ("c001", "c003") for c, _, _ in clean)  # they bought
        for k in range(0, len(seen), max(1, len(seen) // 8)):
            got, got_logged, _ = run(pg, tmp_path / f"crash{k}", k)
            assert got == expected, f"crash at checkpoint {k} ({seen[k]})"
            assert got_logged == expected_logged
