"""Incremental tags (a live refresh's tag step) equal a full build, table for table."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pytest

from closedloop.core.clock import Clock
from closedloop.core.definitions.tags import TagDef
from closedloop.core.engine import Engine, table_differences
from closedloop.tags import incremental
from closedloop.tags.build import build_tags, per_customer
from closedloop.tags.incremental import crossed, refresh_tags
from tests.tags.helpers import NOW, set_events, set_profiles

TAGS: dict[str, dict[str, Any]] = {
    "big": {
        "type": "rule",
        "rules": [{"when": {"trait": "orders", "op": "gte", "value": 3}, "value": "big"}],
        "default": "small",
    },
    "spend": {
        "type": "bucket",
        "field": "revenue",
        "ranges": [{"value": "low", "max": 50}, {"value": "high", "min": 50}],
    },
    "spend_half": {"type": "bucket", "field": "revenue", "percentiles": [0.5]},
    "first_cat": {"type": "first", "event": "Order Completed", "property": "category"},
    "last_cat": {
        "type": "last",
        "event": "Order Completed",
        "property": "category",
        "window_days": 3,
        "default": "none",
    },
    "top_views": {"type": "top_n", "event": "Product Viewed", "property": "p", "n": 2},
    "recent_views": {
        "type": "top_n",
        "event": "Product Viewed",
        "property": "p",
        "n": 1,
        "window_days": 2,
    },
    "rfm": {"type": "rfm", "rfm": "group"},
    "orders_sql": {
        "type": "sql",
        "sql": "SELECT customer_id, CAST(orders AS VARCHAR) AS value FROM profiles",
    },
}


def _tags() -> dict[str, TagDef]:
    return {n: TagDef.model_validate({"name": n, **d}) for n, d in TAGS.items()}


def _profiles(rng: random.Random, ids: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "customer_id": c,
            "orders": rng.randint(0, 5),
            "revenue": rng.choice([None, 10.0, 40.0, 60.0, 90.0]),
            "rfm_group": rng.choice([None, "champions", "at_risk"]),
        }
        for c in ids
    ]


def _events(rng: random.Random, ids: list[str], n: int, start: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        order = rng.random() < 0.5
        props = {"category": rng.choice("abc")} if order else {"p": rng.choice("xyz")}
        out.append(
            {
                "message_id": f"m{start + i}",
                "event": "Order Completed" if order else "Product Viewed",
                "user_id": rng.choice(ids),
                "timestamp": NOW - timedelta(hours=rng.randint(-30, 24 * 5)),
                "properties": props,
            }
        )
    return out


def _rows(engine: Engine) -> pa.Table:
    tv = engine.table("tag_values")
    return tv.select("customer_id", "tag", "value").to_pyarrow()


@pytest.fixture(autouse=True, params=["narrow", "wide"])
def share(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of recomputing per-customer tags (``incremental.WIDE``): for the customers
    to recompute only, through views narrowed to them, or for everyone — same rows."""
    monkeypatch.setattr(incremental, "WIDE", 1.0 if request.param == "narrow" else 0.0)
    return str(request.param)


@pytest.mark.parametrize("seed", range(6))
def test_incremental_equals_full_after_random_changes(engine: Engine, seed: int) -> None:
    rng = random.Random(seed)
    tags = _tags()
    ids = [f"c{i}" for i in range(60)]
    profiles = _profiles(rng, ids)
    events = _events(rng, ids, 120, 0)
    set_profiles(engine, profiles)
    set_events(engine, events)
    build_tags(engine, tags, Clock(NOW))

    # Changes: some profiles rewritten, customers gone and new, events added, erased and
    # moved between customers; the clock moves an hour or a day (events cross the 2- and
    # 3-day edges and come into view).
    hours = [1, 30][seed % 2]
    later = NOW + timedelta(hours=hours)
    by_id = {p["customer_id"]: p for p in profiles}
    changed = set(rng.sample(ids, 5))
    for c in changed:
        by_id[c] = _profiles(rng, [c])[0]
    gone = set(rng.sample(sorted(set(ids) - changed), 3))
    new = [f"n{i}" for i in range(3)]
    for c in gone:
        del by_id[c]
    for p in _profiles(rng, new):
        by_id[p["customer_id"]] = p
    alive = sorted(by_id)
    moved_events: list[dict[str, Any]] = []
    touched: set[str] = set()
    for e in events:
        if e["user_id"] in gone or rng.random() < 0.05:
            touched.add(e["user_id"])
            if rng.random() < 0.5:
                continue  # erased
            e = e | {"user_id": rng.choice(alive)}  # moved (a merge)
            touched.add(e["user_id"])
        moved_events.append(e)
    added = _events(rng, alive, 15, 1000)
    touched |= {e["user_id"] for e in added}
    set_profiles(engine, [by_id[c] for c in alive])
    set_events(engine, moved_events + added)
    todo = sorted(changed | gone | set(new) | touched)
    before = {(r["customer_id"], r["tag"], r["value"]) for r in _rows(engine).to_pylist()}

    with engine.temporary(pa.table({"customer_id": pa.array(todo, pa.string())})) as ch:
        result = refresh_tags(engine, tags, Clock(later), changed=ch, since=NOW)
    incremental = _rows(engine)
    counts = result.counts
    # Who may hold other tags now: at least everyone whose rows differ.
    before_changed = set(result.changed.customer_id.to_pyarrow().to_pylist())
    full_counts = build_tags(engine, tags, Clock(later))
    full = _rows(engine)
    assert table_differences(incremental, full) == []
    assert counts == full_counts
    if hours == 1:
        assert result.recomputed.count().execute() < len(alive)  # not everyone: the point
    assert set(todo) <= before_changed
    after = {(r["customer_id"], r["tag"], r["value"]) for r in full.to_pylist()}
    assert {c for c, _, _ in before ^ after} <= before_changed  # whoever's rows differ


def test_crossed_finds_events_the_clock_moved(engine: Engine) -> None:
    h = timedelta(hours=1)
    set_events(
        engine,
        [
            {"message_id": "in", "event": "x", "user_id": "a", "timestamp": NOW + h},
            {"message_id": "edge", "event": "x", "user_id": "b", "timestamp": NOW - 47 * h},
            {"message_id": "old", "event": "x", "user_id": "c", "timestamp": NOW - 10 * h},
            {"message_id": "later", "event": "x", "user_id": "d", "timestamp": NOW + 5 * h},
        ],
    )
    got = crossed(engine, NOW, NOW + 2 * h, [timedelta(days=2)])
    assert sorted(got.customer_id.to_pyarrow().to_pylist()) == ["a", "b"]


def test_only_per_customer_tags_are_narrowed() -> None:
    kinds = {n: per_customer(t) for n, t in _tags().items()}
    assert kinds == {
        "big": True,
        "spend": True,
        "spend_half": False,
        "first_cat": True,
        "last_cat": True,
        "top_views": True,
        "recent_views": True,
        "rfm": True,
        "orders_sql": False,
    }
