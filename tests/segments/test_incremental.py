"""Incremental segments (a live refresh's segment step) equal a full evaluation, stay for stay."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest

import closedloop.tags.tables  # noqa: F401  (declares tag_values)
from closedloop.core.clock import Clock
from closedloop.core.definitions import SegmentDef
from closedloop.core.engine import Engine, table_differences
from closedloop.segments import incremental as seg_incremental
from closedloop.segments.audience import Fields, evaluate_segments
from closedloop.segments.incremental import evaluate_changed
from tests.tags.helpers import set_events, set_profiles

T0 = datetime(2026, 11, 1, tzinfo=UTC)
VIEW, ORDER = "Product Viewed", "Order Completed"

SEGMENTS: list[dict[str, Any]] = [
    {"name": "buyers", "where": {"trait": "orders", "op": "gte", "value": 2}},
    {"name": "gold", "where": {"trait": "band", "op": "eq", "value": "gold"}},
    {
        "name": "recent_tea",
        "where": {
            "event": ORDER,
            "where": [{"property": "category", "op": "eq", "value": "tea"}],
            "count": {"op": "gte", "value": 1},
            "within_days": 2,
        },
    },
    {
        "name": "browsed_no_buy",
        "where": {
            "sequence": [{"event": VIEW}, {"event": ORDER, "absent": True}],
            "within": "3h",
        },
    },
    {  # reads a segment the clock moves customers in and out of
        "name": "tea_fans",
        "where": {
            "any": [{"in_segment": "recent_tea"}, {"trait": "orders", "op": "gte", "value": 3}]
        },
    },
    {
        "name": "gold_not_buyers",
        "where": {"all": [{"in_segment": "gold"}, {"not": {"in_segment": "buyers"}}]},
    },
]


def _segments() -> list[SegmentDef]:
    return [SegmentDef.model_validate(s) for s in SEGMENTS]


FIELDS = Fields(tags=("band",), segments=tuple(s["name"] for s in SEGMENTS))


def _profiles(rng: random.Random, ids: list[str]) -> list[dict[str, Any]]:
    return [{"customer_id": c, "orders": rng.randint(0, 3)} for c in ids]


def _events(rng: random.Random, ids: list[str], n: int, start: int, at: datetime) -> list[Any]:
    return [
        {
            "message_id": f"m{start + i}",
            "event": rng.choice([VIEW, ORDER]),
            "user_id": rng.choice(ids),
            "timestamp": at - timedelta(minutes=rng.randint(-120, 60 * 24 * 3)),
            "category": rng.choice(["tea", "milk"]),
        }
        for i in range(n)
    ]


def _bands(engine: Engine, bands: dict[str, str], at: datetime) -> None:
    ids = sorted(bands)
    engine.replace(
        "tag_values",
        pa.table(
            {
                "customer_id": pa.array(ids, pa.string()),
                "tag": ["band"] * len(ids),
                "value": [bands[c] for c in ids],
                "computed_at": pa.array([at] * len(ids), pa.timestamp("us", tz="UTC")),
            }
        ),
    )


def _state(engine: Engine, s: dict[str, Any], at: datetime) -> None:
    set_profiles(engine, s["profiles"])
    set_events(engine, s["events"])
    _bands(engine, s["bands"], at)


def _stays(engine: Engine) -> pa.Table:
    m = engine.table("segment_membership")
    return m.order_by(["segment", "customer_id", "entered_at"]).to_pyarrow()


def random_changes(
    rng: random.Random, at: datetime
) -> tuple[dict[str, Any], dict[str, Any], set[str]]:
    """Two states of a warehouse and the customers changed between: profiles rewritten,
    customers gone and new, tags changed, events added (at ``at``), erased and moved (a
    merge)."""
    ids = [f"c{i}" for i in range(40)]
    first: dict[str, Any] = {
        "profiles": _profiles(rng, ids),
        "events": _events(rng, ids, 150, 0, T0),
        "bands": {c: rng.choice(["gold", "grey"]) for c in rng.sample(ids, 25)},
    }
    profiles = {p["customer_id"]: p for p in first["profiles"]}
    changed = set(rng.sample(ids, 4))
    for c in changed:
        profiles[c] = _profiles(rng, [c])[0]
    gone = set(rng.sample(sorted(set(ids) - changed), 3))
    for c in gone:
        del profiles[c]
    for p in _profiles(rng, ["n1", "n2"]):
        profiles[p["customer_id"]] = p
    alive = sorted(profiles)
    bands = {c: v for c, v in first["bands"].items() if c not in gone}
    for c in rng.sample(alive, 4):
        changed.add(c)
        bands[c] = rng.choice(["gold", "grey"])
    events = []
    for e in first["events"]:
        if e["user_id"] in gone or rng.random() < 0.04:
            changed.add(e["user_id"])
            if rng.random() < 0.5:
                continue
            e = e | {"user_id": rng.choice(alive)}
            changed.add(e["user_id"])
        events.append(e)
    added = _events(rng, alive, 10, 1000, at)
    changed |= {e["user_id"] for e in added} | gone | {"n1", "n2"}
    second = {"profiles": [profiles[c] for c in alive], "events": events + added, "bands": bands}
    return first, second, changed


@pytest.fixture(autouse=True)
def narrow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluate only the customers in scope however many they are (``incremental.WIDE``):
    these worlds are small, and a scope of a few of them is most of them."""
    monkeypatch.setattr(seg_incremental, "WIDE", 1.0)


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_incremental_equals_full_after_random_changes(
    seed: int, wide: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if wide:  # a scope wider than WIDE: everyone evaluated, the same stays
        monkeypatch.setattr(seg_incremental, "WIDE", 0.0)
    segs = _segments()
    t1 = T0 + timedelta(hours=[1, 5, 26][seed % 3])
    first, second, changed = random_changes(random.Random(seed), t1)

    results = []
    for incremental in (True, False):
        with Engine("duckdb://") as engine:
            _state(engine, first, T0)
            evaluate_segments(engine, segs, FIELDS, Clock(T0))
            _state(engine, second, t1)
            if incremental:
                ids_changed = pa.table({"customer_id": pa.array(sorted(changed), pa.string())})
                with engine.temporary(ids_changed) as ch:
                    r = evaluate_changed(engine, segs, FIELDS, Clock(t1), changed=ch, since=T0)
            else:
                r = evaluate_segments(engine, segs, FIELDS, Clock(t1))
            results.append((r, _stays(engine)))
    (inc, inc_stays), (full, full_stays) = results
    assert table_differences(inc_stays, full_stays) == []
    assert inc == full


def test_only_the_changed_are_evaluated(engine: Engine) -> None:
    """A customer not named as changed keeps the stay it had, even if its row moved: proof
    that the others were not evaluated (the caller's promise is what makes it correct)."""
    segs = _segments()[:1]
    set_profiles(engine, [{"customer_id": "a", "orders": 3}, {"customer_id": "b", "orders": 3}])
    evaluate_segments(engine, segs, FIELDS, Clock(T0))
    set_profiles(engine, [{"customer_id": "a", "orders": 0}, {"customer_id": "b", "orders": 0}])
    t1 = T0 + timedelta(hours=1)
    with engine.temporary(pa.table({"customer_id": ["a"]})) as ch:
        r = evaluate_changed(engine, segs, FIELDS, Clock(t1), changed=ch, since=T0)
    assert (r["buyers"].size, r["buyers"].entered, r["buyers"].exited) == (1, 0, 1)
    m = engine.table("segment_membership")
    still = m.filter(m.exited_at.isnull()).customer_id.to_pyarrow().to_pylist()
    assert still == ["b"]


def test_the_clock_alone_moves_members_and_those_who_read_them(engine: Engine) -> None:
    """Nobody changed, but an order left the 2-day window: out of recent_tea, and so out of
    tea_fans, which names it."""
    segs = _segments()
    set_profiles(engine, [{"customer_id": "x", "orders": 1}, {"customer_id": "y", "orders": 1}])
    at = T0 - timedelta(days=2) + timedelta(minutes=30)

    set_events(
        engine,
        [
            {
                "message_id": "o1",
                "event": ORDER,
                "user_id": "x",
                "timestamp": at,
                "category": "tea",
            },
            {
                "message_id": "o2",
                "event": ORDER,
                "user_id": "y",
                "timestamp": T0,
                "category": "tea",
            },
        ],
    )
    _bands(engine, {}, T0)
    evaluate_segments(engine, segs, FIELDS, Clock(T0))
    t1 = T0 + timedelta(hours=1)
    with engine.temporary(pa.table({"customer_id": pa.array([], pa.string())})) as ch:
        r = evaluate_changed(engine, segs, FIELDS, Clock(t1), changed=ch, since=T0)
    assert (r["recent_tea"].size, r["recent_tea"].exited) == (1, 1)
    assert (r["tea_fans"].size, r["tea_fans"].exited) == (1, 1)
    m = engine.table("segment_membership")
    inside = m.filter(m.exited_at.isnull() & m.segment.isin(["recent_tea", "tea_fans"]))
    assert sorted(inside.customer_id.to_pyarrow().to_pylist()) == ["y", "y"]
