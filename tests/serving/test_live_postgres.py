"""The live refresh's incremental path on PostgreSQL equals a whole refresh.

One generated brand is built twice: on a real PostgreSQL server and in a DuckDB file. Both
receive the same batches at the same clocks — new orders and a newcomer, an identify call
that merges two customers, then a clock move of days — and refresh live: PostgreSQL through
the incremental path (``incremental_from=0``: tags, segments and the served profiles only
for the customers ``serving.changes`` finds by key — identity's records of changed
customers, the portrait's rewritten rows), DuckDB whole. After every refresh the two hold the same tags, segment stays (entered and exited
times included) and profiles, and what the lookup serves for every identifier agrees.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from closedloop.core.clock import Clock
from closedloop.core.definitions import Project, load_project
from closedloop.core.engine import Engine, table_differences
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.pipeline import build
from closedloop.portrait.lookup import ProfileLookup
from closedloop.segments import incremental as segments_incremental
from closedloop.serving import live
from closedloop.serving.changes import Changes
from closedloop.tags import incremental as tags_incremental
from tests.serving.test_live_incremental import _load
from tests.test_backends import postgres_url  # noqa: F401  (the fixture that starts PostgreSQL)

T0 = datetime(2026, 11, 20, tzinfo=UTC)


def _state(engine: Engine) -> dict[str, pa.Table]:
    tv = engine.table("tag_values").select("customer_id", "tag", "value")
    m = engine.table("segment_membership")
    m = m.select("segment", "customer_id", "entered_at", "exited_at")
    p = engine.table("profiles").drop("computed_at")
    return {
        "tag_values": tv.to_pyarrow(),
        "memberships": m.to_pyarrow(),
        "profiles": p.to_pyarrow(),
    }


def _served(engine: Engine, project: Project) -> dict[tuple[str, str], Any]:
    """What the profile lookup answers for every identifier: customer and a few fields."""
    m = engine.table("identity_map").select("id_type", "id_value")
    lookup = ProfileLookup.open(engine, project.identity)
    out: dict[tuple[str, str], Any] = {}
    for row in m.to_pyarrow().to_pylist():
        hit = lookup.find(row["id_value"], row["id_type"])
        prof = None if hit is None or hit.profile is None else hit.profile
        out[(row["id_type"], row["id_value"])] = (
            None if prof is None else (prof["customer_id"], prof["orders"], prof["lifecycle_stage"])
        )
    lookup.close()
    return out


def _batches(engine: Engine) -> list[tuple[datetime, list[dict[str, Any]]]]:
    """Three batches: orders and a newcomer; a merge of two customers; an order days later."""
    m = engine.table("identity_map")
    rows = m.filter(m.id_type.isin(["member_id", "email"]) & ~m.quarantined).to_pyarrow()
    ids = sorted((r["customer_id"], r["id_type"], r["id_value"]) for r in rows.to_pylist())
    members = [(c, v) for c, t, v in ids if t == "member_id"]
    emails = {c: v for c, t, v in ids if t == "email"}
    # A member and another customer's e-mail: one identify call with both merges them.
    a_cust, a_member = members[0]
    b_cust, b_email = next((c, e) for c, e in emails.items() if c != a_cust)
    at = [T0 + timedelta(hours=1), T0 + timedelta(hours=2), T0 + timedelta(days=3, hours=2)]

    def order(k: int, i: int, member: str) -> dict[str, Any]:
        return {
            "type": "track",
            "userId": member,
            "event": "Order Completed",
            "messageId": f"pg-{k}-{i}",
            "timestamp": (at[k] - timedelta(minutes=5)).isoformat(),
            "properties": {"order_id": f"pgo-{k}-{i}", "revenue": 80.0 + 10 * i},
        }

    first = [order(0, i, members[3 + i][1]) for i in range(3)]
    first.append(
        {
            "type": "identify",
            "userId": "pg-new-0",
            "messageId": "pg-new-0",
            "timestamp": at[0].isoformat(),
            "traits": {"email": "pg-new-0@example.com"},
        }
    )
    merge = [
        {
            "type": "identify",
            "userId": a_member,
            "messageId": "pg-merge",
            "timestamp": (at[1] - timedelta(minutes=1)).isoformat(),
            "traits": {"email": b_email},
        },
        order(1, 0, a_member),
    ]
    assert b_cust != a_cust
    later = [order(2, i, members[10 + i][1]) for i in range(2)]
    return [(at[0], first), (at[1], merge), (at[2], later)]


@pytest.mark.postgres
@pytest.mark.slow  # two builds (one on PostgreSQL) and three refreshes on each (~30 s)
def test_live_incremental_on_postgres_equals_whole_refresh(
    tmp_path: Path,
    postgres_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 60 persons hold every case checked (a merge, a newcomer, moved orders): at 120 the
    # test took half as much CPU again (66 -> 42 CPU-s under load), all of it per row.
    generate(tmp_path / "brand", 60, seed=5)
    p = tmp_path / "p"
    init_project(p, data_dir=relative_data_dir(p, tmp_path / "brand" / "data"))
    project = load_project(p)
    found: list[Changes | None] = []
    real = live.plan_changes

    def spy(*args: Any, **kwargs: Any) -> tuple[Changes | None, str]:  # the real one, kept
        got = real(*args, **kwargs)
        found.append(got[0])
        return got

    monkeypatch.setattr(live, "plan_changes", spy)
    # A few customers of 120 are a wide share: keep to the narrowed paths all the same.
    monkeypatch.setattr(tags_incremental, "WIDE", 1.0)
    monkeypatch.setattr(segments_incremental, "WIDE", 1.0)
    with Engine(postgres_url) as pg, Engine(project.engine_url) as duck:
        assert not pg.can("row_hash")  # the portable digest is the one in use
        for engine in (pg, duck):
            build(engine, project, clock=Clock(T0))
        batches = _batches(duck)
        merged_before = duck.count("customers")
        hows: list[str] = []
        for k, (at, msgs) in enumerate(batches):
            for which, engine in enumerate((pg, duck)):
                _load(engine, project, tmp_path / f"batch-{k}-{which}.jsonl", msgs)
                run = live.refresh_all(
                    engine, project, at, incremental_from=0 if which == 0 else 10**9
                )
                if which == 0:
                    hows.append(run.changes)
            a, b = _state(pg), _state(duck)
            for name in a:
                assert table_differences(a[name], b[name]) == [], (k, name)
            assert _served(pg, project) == _served(duck, project), k
            if k == 1:  # the merge took a customer away
                assert duck.count("customers") == merged_before  # one new, one merged away
            changes = found[-1]
            if k == 0:
                assert changes is None  # the first live refresh has no state to start from
                assert hows[-1] == "everyone: no live state"
            else:  # then PostgreSQL carried forward only some customers, found by key
                assert changes is not None, k
                assert hows[-1] == "by key"
                n = changes.customers.count().to_pyarrow().as_py()
                assert 0 < n < pg.count("profiles"), (k, n)
