"""Sequences ("A then B within T"): compiled window functions agree with a brute-force reference."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import ibis
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from closedloop.collect.tables import EVENTS
from closedloop.core.clock import Clock
from closedloop.core.conditions import (
    Condition,
    SequenceCondition,
    compile_condition,
    parse_duration,
    sequence_matches,
)
from closedloop.core.definitions import SegmentDef
from closedloop.core.engine import Engine
from closedloop.core.errors import DefinitionError
from closedloop.portrait.tables import PROFILES
from closedloop.segments.audience import Fields, check_segment, evaluate_segment, preview_expr
from closedloop.segments.derived import with_derived
from tests.conftest import event_rows

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)
ADAPTER: TypeAdapter[Any] = TypeAdapter(Condition)
CUSTOMERS = ["a", "b", "c", "d"]
VIEW, ADD, ORDER = "Product Viewed", "Product Added", "Order Completed"


def load(engine: Engine, events: list[dict[str, Any]]) -> None:
    """Events as dicts: customer, event, timestamp (aware), optional category and size."""
    schema = ibis.schema(PROFILES.columns).to_pyarrow()  # typed: PostgreSQL refuses null types
    rows = [
        {c: (cid if c == "customer_id" else None) for c in PROFILES.columns} for cid in CUSTOMERS
    ]
    engine.replace("profiles", pa.Table.from_pylist(rows, schema=schema))
    msgs = [
        {
            "message_id": f"m{i}",
            "user_id": e["customer"],
            "event": e["event"],
            "timestamp": e["timestamp"],
            "category": e.get("category"),
            "properties": {"size": e["size"]} if e.get("size") is not None else {},
        }
        for i, e in enumerate(events)
    ]
    if msgs:
        typed = ibis.schema(EVENTS.columns).to_pyarrow()
        engine.append("events", event_rows(msgs).cast(typed))
        engine.append(
            "event_customers",
            pa.table(
                {
                    "message_id": [m["message_id"] for m in msgs],
                    "customer_id": [m["user_id"] for m in msgs],
                }
            ),
        )


def members(engine: Engine, raw: dict[str, Any], as_of: datetime = NOW) -> list[str]:
    cond = ADAPTER.validate_python(raw)
    t = with_derived(engine, engine.table("profiles"), cond, as_of)
    return sorted(t.filter(compile_condition(cond, t)).customer_id.to_pyarrow().to_pylist())


def ev(customer: str, event: str, minutes_ago: float, **props: Any) -> dict[str, Any]:
    return {
        "customer": customer,
        "event": event,
        "timestamp": NOW - timedelta(minutes=minutes_ago),
        **props,
    }


def test_a_then_b_within(engine: Engine) -> None:
    load(
        engine,
        [
            ev("a", VIEW, 120),
            ev("a", ORDER, 60),  # 1 h later: yes
            ev("b", ORDER, 120),
            ev("b", VIEW, 60),  # wrong order: no
            ev("c", VIEW, 300),
            ev("c", ORDER, 60),  # 4 h later: too slow
            ev("d", VIEW, 60),
            ev("d", ORDER, 60),  # the same instant does not follow
        ],
    )
    seq = {"sequence": [{"event": VIEW}, {"event": ORDER}], "within": "2h"}
    assert members(engine, seq) == ["a"]
    assert members(engine, {**seq, "within": "4h"}) == ["a", "c"]
    assert members(engine, {"not": seq}) == ["b", "c", "d"]


def test_property_filters_and_three_steps(engine: Engine) -> None:
    load(
        engine,
        [
            ev("a", VIEW, 50, category="tea"),
            ev("a", ADD, 40, category="tea", size=3),
            ev("a", ORDER, 30, category="tea"),
            ev("b", VIEW, 50, category="cake"),  # wrong category in step 1
            ev("b", ADD, 40, category="tea", size=3),
            ev("b", ORDER, 30),
            ev("c", VIEW, 50, category="tea"),
            ev("c", ADD, 40, category="tea", size=1),  # size too small
            ev("c", ORDER, 30),
            # d: the right steps, but the only add is before the view
            ev("d", ADD, 60, size=5),
            ev("d", VIEW, 50, category="tea"),
            ev("d", ORDER, 30),
        ],
    )
    seq = {
        "sequence": [
            {"event": VIEW, "where": [{"property": "category", "op": "eq", "value": "tea"}]},
            {"event": ADD, "where": [{"property": "size", "op": ">=", "value": 2}]},
            {"event": ORDER},
        ],
        "within": "1h",
    }
    assert members(engine, seq) == ["a"]


def test_then_not_within(engine: Engine) -> None:
    """Abandoned cart: added, then no order within 1 h — once that hour has passed."""
    load(
        engine,
        [
            ev("a", ADD, 120),  # no order at all, the hour is over: yes
            ev("b", ADD, 30),  # no order yet, but the hour is not over: not yet
            ev("c", ADD, 120),
            ev("c", ORDER, 100),  # ordered 20 min later: no
            ev("d", ADD, 180),
            ev("d", ORDER, 60),  # ordered 2 h later: yes (abandoned, came back later)
            ev("a", VIEW, 300),
            ev("a", ORDER, 240),  # the order exactly 1 h after the view is within the hour
        ],
    )
    seq = {"sequence": [{"event": ADD}, {"event": ORDER, "absent": True}], "within": "1h"}
    assert members(engine, seq) == ["a", "d"]
    assert members(engine, seq, NOW + timedelta(minutes=31)) == ["a", "b", "d"]
    viewed = {"sequence": [{"event": VIEW}, {"event": ORDER, "absent": True}], "within": "1h"}
    assert members(engine, viewed) == []
    assert members(engine, {**viewed, "within": "59m"}) == ["a"]


def test_window_edges(engine: Engine) -> None:
    load(
        engine,
        [
            ev("a", VIEW, 120),
            ev("a", ORDER, 0),  # exactly 2 h: inside
            ev("b", VIEW, 120 + 1e-3),  # 2 h and 60 µs: outside
            ev("b", ORDER, 0),
            ev("c", VIEW, 60),
            ev("c", ORDER, -1),  # after as_of: not yet happened
            ev("d", VIEW, 24 * 60),  # exactly 1 day ago: outside a 1-day look-back
            ev("d", ORDER, 24 * 60 - 1),
        ],
    )
    seq: dict[str, Any] = {"sequence": [{"event": VIEW}, {"event": ORDER}], "within": "2h"}
    assert members(engine, seq) == ["a", "d"]
    assert members(engine, {**seq, "within_days": 1}) == ["a"]
    assert members(engine, {**seq, "within_days": 2}) == ["a", "d"]


def test_between_days_are_days_in_the_time_zone_of_as_of(engine: Engine) -> None:
    """Events at 17:00 UTC on the 19th are on the 20th in Shanghai."""
    t = datetime(2026, 11, 19, 17, tzinfo=UTC)
    load(
        engine,
        [
            {"customer": "a", "event": VIEW, "timestamp": t},
            {"customer": "a", "event": ORDER, "timestamp": t + timedelta(minutes=5)},
        ],
    )
    day = date(2026, 11, 20).isoformat()
    seq = {
        "sequence": [{"event": VIEW}, {"event": ORDER}],
        "within": "10m",
        "between": [day, day],
    }
    assert members(engine, seq) == []
    shanghai = NOW.astimezone(ZoneInfo("Asia/Shanghai"))
    assert members(engine, seq, shanghai) == ["a"]
    # A duration is a duration: the same instant in another zone gives the same answer.
    rolling = {"sequence": [{"event": VIEW}, {"event": ORDER}], "within": "10m", "within_days": 1}
    assert members(engine, rolling) == members(engine, rolling, shanghai) == ["a"]


def test_validation_points_at_the_clause() -> None:
    with pytest.raises(ValidationError, match="only the last step may be"):
        ADAPTER.validate_python(
            {"sequence": [{"event": ADD, "absent": True}, {"event": ORDER}], "within": "1h"}
        )
    with pytest.raises(ValidationError, match="needs a unit"):
        ADAPTER.validate_python({"sequence": [{"event": ADD}, {"event": ORDER}], "within": 7})
    with pytest.raises(ValidationError, match="not a duration"):
        ADAPTER.validate_python({"sequence": [{"event": ADD}, {"event": ORDER}], "within": "2x"})
    with pytest.raises(ValidationError, match="at least 2"):
        ADAPTER.validate_python({"sequence": [{"event": ADD}], "within": "1h"})
    with pytest.raises(ValidationError, match="positive"):
        ADAPTER.validate_python({"sequence": [{"event": ADD}, {"event": ORDER}], "within": "0m"})
    seg = SegmentDef.model_validate(
        {
            "name": "s",
            "where": {
                "sequence": [
                    {"event": ADD},
                    {"event": ORDER, "where": [{"property": "revenue", "op": ">", "value": True}]},
                ],
                "within": "1h",
            },
        }
    )
    assert check_segment(seg, Fields())[0].key == "where.sequence.1.where.0"


def test_a_bad_sequence_in_a_file_names_file_line_and_key(tmp_path: Path) -> None:
    from closedloop.core.definitions import load_project
    from closedloop.demo.project import init_project

    init_project(tmp_path / "p")
    (tmp_path / "p" / "segments" / "seq.yaml").write_text(
        "name: seq\nwhere:\n  all:\n    - sequence:\n        - {event: A}\n        - {event: B}\n"
        "      within: soon\n"
    )
    with pytest.raises(DefinitionError) as e:
        load_project(tmp_path / "p")
    text = str(e.value)
    assert "seq.yaml" in text and ":7" in text and "within" in text and "soon" in text
    (tmp_path / "p" / "segments" / "seq.yaml").write_text(
        "name: seq\nwhere:\n  sequence:\n    - {event: A, absent: true}\n    - {event: B}\n"
        "  within: 1h\n"
    )
    with pytest.raises(DefinitionError) as e:
        load_project(tmp_path / "p")
    assert "seq.yaml:3 [where.sequence]: sequence step 1 ('A') is absent" in str(e.value)


def test_segment_with_a_sequence_records_entries_and_previews(engine: Engine) -> None:
    load(engine, [ev("a", VIEW, 90), ev("a", ORDER, 30), ev("b", VIEW, 90)])
    seg = SegmentDef.model_validate(
        {
            "name": "converted",
            "where": {"sequence": [{"event": VIEW}, {"event": ORDER}], "within": "2h"},
        }
    )
    assert evaluate_segment(engine, seg, Fields(), Clock(NOW)).entered == 1
    rows = preview_expr(engine, seg, Fields(), NOW).to_pyarrow().to_pylist()
    assert rows == [
        {"customer_id": "a", "Product Viewed then Order Completed within 2:00:00": True}
    ]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["d", "h", "m", "s"]), min_size=1, max_size=4, unique=True),
    st.lists(st.integers(0, 500), min_size=4, max_size=4),
    st.booleans(),
)
def test_duration_parser_round_trips(units: list[str], amounts: list[int], spaced: bool) -> None:
    text = (" " if spaced else "").join(f"{n}{u}" for n, u in zip(amounts, units, strict=False))
    size = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    want = sum(n * size[u] for n, u in zip(amounts, units, strict=False))
    assert parse_duration(text) == timedelta(seconds=want)
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text + "x")


# Times on a 30-minute grid, so ties and exact window edges happen often.
events_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "customer": st.sampled_from(CUSTOMERS),
            "event": st.sampled_from([VIEW, ADD, ORDER]),
            "half_hours_ago": st.integers(-2, 60),
            "category": st.sampled_from(["tea", "cake", None]),
            "size": st.one_of(st.none(), st.integers(0, 5)),
        }
    ),
    max_size=18,
)
step_strategy = st.fixed_dictionaries(
    {
        "event": st.sampled_from([VIEW, ADD, ORDER]),
        "where": st.lists(
            st.one_of(
                st.sampled_from(["tea", "cake"]).map(
                    lambda v: {"property": "category", "op": "eq", "value": v}
                ),
                st.integers(0, 5).map(lambda v: {"property": "size", "op": "gte", "value": v}),
            ),
            max_size=1,
        ),
    }
)
sequence_strategy = st.fixed_dictionaries(
    {
        "sequence": st.lists(step_strategy, min_size=2, max_size=3),
        "within": st.sampled_from(["30m", "1h", "2h 30m", "1d"]),
        "within_days": st.one_of(st.none(), st.integers(1, 2)),
    }
).flatmap(
    lambda raw: st.booleans().map(
        lambda absent: {
            **raw,
            "sequence": [*raw["sequence"][:-1], {**raw["sequence"][-1], "absent": absent}],
        }
    )
)


@pytest.mark.slow
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(events_strategy, sequence_strategy, st.sampled_from(["UTC", "Asia/Shanghai"]))
def test_sequence_matches_brute_force_reference(
    raw_events: list[dict[str, Any]], raw: dict[str, Any], zone: str
) -> None:
    events = [
        {**e, "timestamp": NOW - timedelta(minutes=30 * e["half_hours_ago"])} for e in raw_events
    ]
    as_of = NOW.astimezone(ZoneInfo(zone))
    engine = Engine("duckdb://")
    try:
        load(engine, events)
        seq = SequenceCondition.model_validate(raw)
        want = sorted(
            c
            for c in CUSTOMERS
            if sequence_matches(seq, [e for e in events if e["customer"] == c], as_of)
        )
        assert members(engine, raw, as_of) == want
    finally:
        engine.close()
