"""Freshness: an incremental refresh gives exactly what a full rebuild gives."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop.core.clock import Clock
from closedloop.core.definitions import IdentityConfig, TraitDef, load_project
from closedloop.core.engine import Engine
from closedloop.core.ids import unit_interval
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.identity.resolve import resolve
from closedloop.pipeline import load_imports
from closedloop.portrait import refresh_write
from closedloop.portrait.refresh import full_build, refresh
from tests.conftest import event_rows
from tests.identity.test_resolve import CONFIG
from tests.portrait.test_build import NOW
from tests.portrait.test_profile_traits import typed

DAY = timedelta(days=1)
TRAITS = {
    t["name"]: TraitDef.model_validate(t)
    for t in (
        {"name": "orders_7d", "event": "Order Completed", "aggregation": "count", "window_days": 7},
        {"name": "views_30d", "event": "Product Viewed", "aggregation": "count", "window_days": 30},
        {"name": "spend", "event": "Order Completed", "aggregation": "sum", "column": "revenue"},
        {"name": "fav", "aggregation": "most_frequent", "column": "category"},
        {"name": "tier_m", "kind": "profile", "field": "tier", "strategy": "latest"},
    )
}


def keyed(engine: Engine, snapshot: bool = False) -> tuple[list[dict[str, Any]], ...]:
    """Profiles and traits with customer ids replaced by the customer's smallest identifier;
    with ``snapshot`` also the refresh snapshot (``portrait_seen``: attribution and facts).

    Two histories may mint different ids for the same merged customer; its identifiers agree.
    """
    m = engine.table("identity_map").to_pyarrow().to_pylist()
    key: dict[str, str] = {}
    for r in m:
        k = f"{r['id_type']}:{r['id_value']}"
        key[r["customer_id"]] = min(key.get(r["customer_id"], k), k)
    p = engine.table("profiles").drop("computed_at").to_pyarrow().to_pylist()
    t = engine.table("computed_traits").drop("computed_at").to_pyarrow().to_pylist()
    s = engine.table("portrait_seen").to_pyarrow().to_pylist() if snapshot else []
    for rows in (p, t, s):
        for r in rows:
            r["customer_id"] = key.get(r["customer_id"], r["customer_id"])
    p.sort(key=lambda r: r["customer_id"])
    t.sort(key=lambda r: (r["customer_id"], r["trait"]))
    s.sort(key=lambda r: r["message_id"])
    for r in p + t:
        for c, v in r.items():
            if isinstance(v, float):
                r[c] = round(v, 6)
    return (p, t, s) if snapshot else (p, t)


def incremental_equals_full(
    config: IdentityConfig,
    first: pa.Table,
    second: pa.Table,
    t1: datetime,
    t2: datetime,
    tz: str = "UTC",
    traits: dict[str, TraitDef] = TRAITS,
) -> int:
    """Build on ``first`` at t1, add ``second``, refresh at t2; compare with a full build at t2."""
    with Engine("duckdb://") as a, Engine("duckdb://") as b:
        a.append("events", first)
        resolve(a, config, Clock(t1))
        assert full_build(a, traits, Clock(t1), tz).mode == "full"
        if second.num_rows:
            a.append("events", second)
        resolve(a, config, Clock(t2))
        r = refresh(a, traits, Clock(t2), tz)
        assert r.mode == "incremental"
        b.append("events", pa.concat_tables([first, second]))
        resolve(b, config, Clock(t2))
        full_build(b, traits, Clock(t2), tz)
        pa_, ta, sa = keyed(a, snapshot=True)
        pb, tb, sb = keyed(b, snapshot=True)
        assert len(pa_) == len(pb)
        for x, y in zip(pa_, pb, strict=True):
            assert x == y, {c: (x[c], y[c]) for c in x if x[c] != y[c]}
        assert ta == tb
        # The snapshot the next refresh starts from: the same events, attribution and facts.
        assert sa == sb
        return r.recomputed


@pytest.fixture(scope="module")
def brand(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[IdentityConfig, pa.Table]]:
    root: Path = tmp_path_factory.mktemp("refresh")
    generate(root / "brand", 400, seed=9)
    init_project(root / "p", data_dir=relative_data_dir(root / "p", root / "brand" / "data"))
    project = load_project(root / "p")
    with Engine("duckdb://") as e:
        load_imports(e, project)
        events = e.table("events").order_by("message_id").to_pyarrow()
    yield project.identity, events


@pytest.mark.parametrize("share", [0.01, pytest.param(0.2, marks=pytest.mark.slow)])
def test_incremental_equals_full_on_generated_data(
    brand: tuple[IdentityConfig, pa.Table], share: float
) -> None:
    config, events = brand
    # A pseudo-random split of the event log: the "new" events arrive after the first build.
    ids = events["message_id"].to_pylist()
    mask = pa.array([unit_interval("split", str(m)) < share for m in ids])
    second = events.filter(mask)
    first = events.filter(pc.invert(mask))
    t2 = datetime(2026, 11, 20, tzinfo=UTC)
    recomputed = incremental_equals_full(config, first, second, t2 - 2 * DAY, t2, "Asia/Shanghai")
    assert recomputed > 0


def test_traits_reading_columns_the_facts_do_not_keep(
    brand: tuple[IdentityConfig, pa.Table],
) -> None:
    # The refresh serves traits from the stored facts when it can; a trait reading another
    # column of the log (here the anonymous id, the user id and the raw properties) must
    # read the log's rows of the affected customers' events and still agree.
    config, events = brand
    extra = {
        t["name"]: TraitDef.model_validate(t)
        for t in (
            {"name": "last_anon", "aggregation": "last", "column": "anonymous_id"},
            {"name": "users", "aggregation": "distinct_count", "column": "user_id"},
            {"name": "first_props", "aggregation": "first", "column": "properties"},
        )
    }
    ids = events["message_id"].to_pylist()
    mask = pa.array([unit_interval("split-cols", str(m)) < 0.05 for m in ids])
    t2 = datetime(2026, 11, 20, tzinfo=UTC)
    traits = TRAITS | extra
    first, second = events.filter(pc.invert(mask)), events.filter(mask)
    assert incremental_equals_full(config, first, second, t2 - DAY, t2, "UTC", traits) > 0


def msgs(spec: list[tuple[str, str, int, int]]) -> pa.Table:
    """(user, kind, day offset, amount) → event rows; kinds: order, view, tier, refer."""
    out: list[dict[str, Any]] = []
    for i, (user, kind, day, amount) in enumerate(spec):
        at = NOW + day * DAY - timedelta(hours=amount)
        m: dict[str, Any] = {"message_id": f"h{i}", "user_id": user, "timestamp": at}
        if kind == "order":
            m |= {"event": "Order Completed", "order_id": f"o{i}", "revenue": float(amount)}
            m["category"] = ["tea", "serum"][amount % 2]
        elif kind == "view":
            m |= {"event": "Product Viewed", "category": ["tea", "serum"][amount % 2]}
        elif kind == "tier":
            m |= {"type": "identify", "traits": {"tier": ["gold", "silver"][amount % 2]}}
        else:
            m |= {
                "event": "Referral Sent",
                "properties": {"referred_member_id": "ABCD"[amount % 4]},
            }
        out.append(m)
    return typed(event_rows(out))


EVENT = st.tuples(
    st.sampled_from("ABCD"),
    st.sampled_from(["order", "view", "tier", "refer"]),
    st.integers(-40, 3),  # days from NOW; some after the first clock, some in the future
    st.integers(0, 30),
)


@pytest.mark.slow  # each example resolves and builds three times (about 3 s on an idle machine)
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(EVENT, st.booleans()), min_size=1, max_size=25),
    st.integers(0, 40),
)
def test_incremental_equals_full_on_random_splits(
    events: list[tuple[tuple[str, str, int, int], bool]], advance_days: int
) -> None:
    spec = [e for e, _ in events]
    table = msgs(spec)
    later = pa.array([late for _, late in events])
    first, second = table.filter(pc.invert(later)), table.filter(later)
    t1 = NOW
    incremental_equals_full(CONFIG, first, second, t1, t1 + advance_days * DAY)


def test_clock_alone_rolls_windows_and_lifecycle(engine: Engine) -> None:
    engine.append(
        "events",
        msgs([("A", "order", -25, 0), ("A", "order", -5, 1), ("B", "view", -29, 2)]),
    )
    resolve(engine, CONFIG)
    full_build(engine, TRAITS, Clock(NOW))

    def state() -> tuple[Any, ...]:
        p = engine.table("profiles").to_pyarrow().to_pylist()
        t = engine.table("computed_traits").to_pyarrow().to_pylist()
        tv = {(r["customer_id"], r["trait"]): r["number_value"] for r in t}
        a = next(r for r in p if r["orders"] == 2)
        b = next(r for r in p if r["orders"] == 0)
        return (
            a["recency_days"],
            a["lifecycle_stage"],
            tv[a["customer_id"], "orders_7d"],
            tv[b["customer_id"], "views_30d"],
        )

    assert state() == (5, "new", 1.0, 1.0)  # first order 25 days ago
    # Two days on and no new events: the 7-day order and 30-day view windows have emptied.
    r = refresh(engine, TRAITS, Clock(NOW + 2 * DAY))
    assert (r.mode, r.recomputed) == ("incremental", 2)
    assert state() == (7, "new", 0.0, 0.0)
    refresh(engine, TRAITS, Clock(NOW + 6 * DAY))  # first order 31 days ago: no longer new
    assert state()[:2] == (11, "active")
    r = refresh(engine, TRAITS, Clock(NOW + 56 * DAY))  # last order 61 days ago: silent
    assert state()[:2] == (61, "silent")
    # Nothing changed since: a refresh recomputes nobody.
    assert refresh(engine, TRAITS, Clock(NOW + 56 * DAY)).recomputed == 0


def test_changed_traits_or_earlier_clock_mean_a_full_build(engine: Engine) -> None:
    engine.append("events", msgs([("A", "order", -1, 3)]))
    resolve(engine, CONFIG)
    assert refresh(engine, TRAITS, Clock(NOW)).mode == "full"  # nothing to start from
    assert refresh(engine, TRAITS, Clock(NOW)).mode == "incremental"
    fewer = {k: v for k, v in TRAITS.items() if k != "spend"}
    assert refresh(engine, fewer, Clock(NOW)).mode == "full"
    assert refresh(engine, fewer, Clock(NOW - DAY)).mode == "full"


def test_a_snapshot_without_facts_means_a_full_build(engine: Engine) -> None:
    # A warehouse built before the snapshot kept the parsed facts: its refresh cannot read
    # them back, so it rebuilds everything once (and keeps the facts from then on).
    engine.append("events", msgs([("A", "order", -1, 3)]))
    resolve(engine, CONFIG)
    full_build(engine, TRAITS, Clock(NOW))
    pairs = engine.table("portrait_seen").select("message_id", "customer_id").to_pyarrow()
    engine.con.create_table("portrait_seen", pairs, overwrite=True)
    engine.forget("portrait_seen")  # written behind the engine's back
    assert refresh(engine, TRAITS, Clock(NOW)).mode == "full"
    assert "tz" in engine.table("portrait_seen").columns
    assert refresh(engine, TRAITS, Clock(NOW)).mode == "incremental"


def test_a_crash_leaves_the_previous_state(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    engine.append("events", msgs([("A", "order", -1, 3), ("B", "order", -3, 4)]))
    resolve(engine, CONFIG)
    full_build(engine, TRAITS, Clock(NOW))
    before = keyed(engine)
    engine.append(
        "events", msgs([("A", "order", 0, 9)]).set_column(0, "message_id", pa.array(["new"]))
    )
    resolve(engine, CONFIG)

    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("disk full")

    # The traits step fails after the profiles were computed: nothing is half-written …
    monkeypatch.setattr(refresh_write, "trait_values", boom)
    with pytest.raises(RuntimeError):
        refresh(engine, TRAITS, Clock(NOW))
    assert keyed(engine)[1] == before[1]
    # … and the next refresh redoes the work: the result equals a full build.
    monkeypatch.undo()
    assert refresh(engine, TRAITS, Clock(NOW)).mode == "incremental"
    after = keyed(engine)
    full_build(engine, TRAITS, Clock(NOW))
    assert keyed(engine) == after
    assert after[0] != before[0]


def snapshot_is_attribution(engine: Engine) -> None:
    seen = engine.table("portrait_seen").select("message_id", "customer_id")
    seen = seen.to_pyarrow().to_pylist()
    ec = engine.table("event_customers").select("message_id", "customer_id")
    assert sorted(seen, key=str) == sorted(ec.to_pyarrow().to_pylist(), key=str)
    assert len({r["message_id"] for r in seen}) == len(seen)  # appends never duplicate


@pytest.mark.slow  # five resolutions and refreshes (about 15-35 s)
def test_snapshot_follows_appends_and_removals(engine: Engine) -> None:
    """The snapshot is appended to when events only arrive, rewritten when any left."""
    first = msgs([("A", "order", -3, 1), ("B", "view", -2, 2), ("C", "order", -2, 3)])
    engine.append("events", first)
    resolve(engine, CONFIG, Clock(NOW))
    full_build(engine, TRAITS, Clock(NOW))
    for batch, (user, day) in enumerate([("A", 0), ("D", 0)]):
        new = msgs([(user, "order", day, 5)])
        new = new.set_column(0, "message_id", pa.array([f"new{batch}"]))
        engine.append("events", new)
        resolve(engine, CONFIG, Clock(NOW))
        r = refresh(engine, TRAITS, Clock(NOW))
        assert (r.mode, r.recomputed) == ("incremental", 1)
        snapshot_is_attribution(engine)
    # An erased event leaves the log: its customer is recomputed and the snapshot rewritten.
    ev = engine.table("events")
    engine.replace("events", ev.filter(ev.message_id != "h2"))
    resolve(engine, CONFIG, Clock(NOW))
    r = refresh(engine, TRAITS, Clock(NOW))
    assert r.recomputed >= 1
    snapshot_is_attribution(engine)
    after = keyed(engine)
    # A refresh with nothing new recomputes no one and changes nothing.
    assert refresh(engine, TRAITS, Clock(NOW)).recomputed == 0
    assert keyed(engine) == after
    full_build(engine, TRAITS, Clock(NOW))
    assert keyed(engine) == after
