"""Event and segment leaves: compiled counts agree with a plain-Python count of the events."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from closedloop.core.clock import Clock
from closedloop.core.conditions import Condition, EventCondition, compile_condition, count_matches
from closedloop.core.definitions import SegmentDef
from closedloop.core.engine import Engine
from closedloop.pipeline import segment_order
from closedloop.segments.audience import Fields, check_segment, evaluate_segment
from closedloop.segments.derived import with_derived
from tests.conftest import add_events
from tests.segments.test_audience import set_profiles

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)
ADAPTER: TypeAdapter[Any] = TypeAdapter(Condition)
CUSTOMERS = ["a", "b", "c", "d"]


def load(engine: Engine, events: list[dict[str, Any]]) -> None:
    set_profiles(engine, [{"customer_id": c} for c in CUSTOMERS])
    msgs = [
        {
            "message_id": f"m{i}",
            "user_id": e["customer"],
            "event": e["event"],
            "timestamp": NOW - timedelta(days=e["days_ago"]),
            "category": e.get("category"),
            "revenue": e.get("revenue"),
            "properties": {"size": e["size"]} if "size" in e else {},
        }
        for i, e in enumerate(events)
    ]
    if msgs:
        add_events(engine, msgs)
        engine.append(
            "event_customers",
            pa.table(
                {
                    "message_id": [m["message_id"] for m in msgs],
                    "customer_id": [m["user_id"] for m in msgs],
                }
            ),
        )


def members(engine: Engine, raw: dict[str, Any]) -> list[str]:
    cond = ADAPTER.validate_python(raw)
    t = with_derived(engine, engine.table("profiles"), cond, NOW)
    return sorted(t.filter(compile_condition(cond, t)).customer_id.to_pyarrow().to_pylist())


def test_counts_windows_and_property_filters(engine: Engine) -> None:
    load(
        engine,
        [
            {
                "customer": "a",
                "event": "Order Completed",
                "days_ago": 1,
                "category": "milk_tea",
                "size": 2,
            },
            {
                "customer": "a",
                "event": "Order Completed",
                "days_ago": 29.9,
                "category": "milk_tea",
                "size": 12,
            },
            {"customer": "b", "event": "Order Completed", "days_ago": 30.1, "category": "milk_tea"},
            {"customer": "b", "event": "Order Completed", "days_ago": 2, "category": "skincare"},
            {"customer": "c", "event": "Product Viewed", "days_ago": 1, "category": "milk_tea"},
            {
                "customer": "d",
                "event": "Order Completed",
                "days_ago": -3,
                "category": "milk_tea",
            },  # future
        ],
    )
    twice = {
        "event": "Order Completed",
        "where": [{"property": "category", "op": "eq", "value": "milk_tea"}],
        "count": {"op": "gte", "value": 2},
        "within_days": 30,
    }
    assert members(engine, twice) == ["a"]
    never = {"event": "Order Completed", "count": {"op": "eq", "value": 0}, "within_days": 30}
    assert members(engine, never) == ["c", "d"]
    # A numeric filter on a property that lives in the properties JSON.
    big = {"event": "Order Completed", "where": [{"property": "size", "op": ">", "value": 10}]}
    assert members(engine, big) == ["a"]
    day = (NOW - timedelta(days=2)).date()
    between = {"event": "Order Completed", "between": [day.isoformat(), day.isoformat()]}
    assert members(engine, between) == ["b"]
    combined = {"all": [{"not": twice}, {"event": "Order Completed", "within_days": 60}]}
    assert members(engine, combined) == ["b"]


def test_segment_reference_and_order(engine: Engine) -> None:
    load(engine, [{"customer": "a", "event": "Order Completed", "days_ago": 1}])
    buyers = SegmentDef.model_validate({"name": "buyers", "where": {"event": "Order Completed"}})
    others = SegmentDef.model_validate(
        {"name": "others", "where": {"not": {"in_segment": "buyers"}}}
    )
    fields = Fields(segments=("buyers", "others"))
    assert check_segment(others, fields) == []
    evaluate_segment(engine, buyers, fields, Clock(NOW))
    assert evaluate_segment(engine, others, fields, Clock(NOW)).size == 3
    bad = SegmentDef.model_validate({"name": "x", "where": {"in_segment": "nope"}})
    assert check_segment(bad, fields)[0].key == "where.in_segment"


def test_cycles_between_segments_are_refused(tmp_path: Any) -> None:
    from closedloop.core.definitions import load_project
    from closedloop.demo.project import init_project

    init_project(tmp_path / "p")
    (tmp_path / "p" / "segments" / "a.yaml").write_text("name: a\nwhere: {in_segment: b}\n")
    (tmp_path / "p" / "segments" / "b.yaml").write_text("name: b\nwhere: {in_segment: a}\n")
    _, problems = segment_order(load_project(tmp_path / "p"))
    assert problems and "cycle" in problems[0].message and "'a'" in problems[0].message


events_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "customer": st.sampled_from(CUSTOMERS),
            "event": st.sampled_from(["Order Completed", "Product Viewed"]),
            "days_ago": st.integers(-2, 60).map(lambda d: d + 0.5),
            "category": st.sampled_from(["milk_tea", "skincare", None]),
            "revenue": st.one_of(st.none(), st.floats(0, 500)),
        }
    ),
    max_size=25,
)
leaf_strategy = st.fixed_dictionaries(
    {
        "event": st.sampled_from(["Order Completed", "Product Viewed"]),
        "where": st.lists(
            st.one_of(
                st.sampled_from(["milk_tea", "skincare"]).map(
                    lambda v: {"property": "category", "op": "eq", "value": v}
                ),
                st.floats(0, 500).map(lambda v: {"property": "revenue", "op": "gte", "value": v}),
            ),
            max_size=2,
        ),
        "count": st.fixed_dictionaries(
            {"op": st.sampled_from(["gte", "lte", "eq"]), "value": st.integers(0, 3)}
        ),
        "within_days": st.one_of(st.none(), st.integers(1, 45)),
    }
)


def reference(leaf: EventCondition, events: list[dict[str, Any]], customer: str) -> bool:
    n = 0
    for e in events:
        ts = NOW - timedelta(days=e["days_ago"])
        if e["customer"] != customer or e["event"] != leaf.event or ts > NOW:
            continue
        if leaf.within_days is not None and ts <= NOW - timedelta(days=leaf.within_days):
            continue
        ok = True
        for f in leaf.where:
            x = e.get(f.property)
            if x is None or not (x == f.value if f.op.value == "eq" else x >= f.value):  # type: ignore[operator]
                ok = False
        n += ok
    return count_matches(leaf.count, n)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(events_strategy, leaf_strategy)
def test_event_leaf_matches_python_reference(
    events: list[dict[str, Any]], raw: dict[str, Any]
) -> None:
    engine = Engine("duckdb://")
    try:
        load(engine, events)
        leaf = EventCondition.model_validate(raw)
        want = sorted(c for c in CUSTOMERS if reference(leaf, events, c))
        assert members(engine, raw) == want
    finally:
        engine.close()


def test_between_is_checked() -> None:
    bad = {"event": "X", "between": [date(2026, 2, 1).isoformat(), date(2026, 1, 1).isoformat()]}
    try:
        EventCondition.model_validate(bad)
    except ValueError as e:
        assert "in order" in str(e)
    else:
        raise AssertionError("reversed dates accepted")
