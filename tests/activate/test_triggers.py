"""Triggers: property filters, schedules, time zones, and event watermarks."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from closedloop.activate.triggers import fire_event, fire_schedule, matches, schedule_days
from closedloop.core.clock import Clock
from closedloop.core.conditions import PropertyFilter
from closedloop.core.definitions.campaigns import EventTrigger, ScheduleTrigger
from closedloop.core.engine import Engine
from closedloop.portrait.tables import PROFILES
from closedloop.segments.audience import Fields, evaluate_segment
from tests.activate.test_journey import EVERYONE
from tests.conftest import add_events

T0 = datetime(2026, 11, 20, tzinfo=UTC)


def test_filters_read_promoted_columns_then_properties() -> None:
    f = [PropertyFilter(property="category", op="eq", value="tea")]
    assert matches(f, {"category": "tea", "properties": "{}"})
    assert matches(f, {"category": None, "properties": '{"category": "tea"}'})
    assert not matches(f, {"category": None, "properties": '{"category": "shoes"}'})
    big = [PropertyFilter(property="price", op="gte", value=100)]
    assert matches(big, {"properties": '{"price": 120}'})
    assert not matches(big, {"properties": '{"price": 80}'})
    assert not matches(big, {"properties": "[]"})  # not an object: no properties


@given(
    st.sampled_from(["day", "week", "month"]),
    st.dates(date(2025, 1, 1), date(2027, 12, 31)),
    st.integers(0, 80),
)
def test_schedule_days_match_their_rule(every: str, first: date, span: int) -> None:
    extra = {"week": {"weekday": 2}, "month": {"day": 15}}.get(every, {})
    t = ScheduleTrigger.model_validate({"schedule": {"every": every, **extra}})
    days = schedule_days(t, first, first + timedelta(days=span))
    assert all(first <= d <= first + timedelta(days=span) for d in days)
    expected = [
        first + timedelta(days=i)
        for i in range(span + 1)
        if every == "day"
        or (every == "week" and (first + timedelta(days=i)).weekday() == 2)
        or (every == "month" and (first + timedelta(days=i)).day == 15)
    ]
    assert days == expected


def test_schedule_fires_at_the_local_hour_of_each_zone(engine: Engine) -> None:
    zones = ["Asia/Shanghai", "Europe/Berlin", None]
    rows = [
        dict.fromkeys(PROFILES.columns) | {"customer_id": f"c{i}", "timezone": z}
        for i, z in enumerate(zones)
    ]
    engine.replace("profiles", pa.Table.from_pylist(rows))
    evaluate_segment(engine, EVERYONE, Fields(), Clock(T0 - timedelta(days=1)))
    t = ScheduleTrigger.model_validate({"schedule": {"every": "day", "at": "09:00"}})
    # 01:00–02:00 UTC holds 09:00 in Shanghai (and for c2, whose default is Shanghai).
    fired = fire_schedule(
        engine, t, "everyone", T0 + timedelta(hours=0.5), T0 + timedelta(hours=2), "Asia/Shanghai"
    )
    assert sorted(c.customer_id for c in fired.candidates) == ["c0", "c2"]
    assert {c.occasion for c in fired.candidates} == {"2026-11-20"}
    # 08:00 UTC is 09:00 in Berlin (CET).
    fired = fire_schedule(
        engine, t, "everyone", T0 + timedelta(hours=7), T0 + timedelta(hours=8), "Asia/Shanghai"
    )
    assert [c.customer_id for c in fired.candidates] == ["c1"]
    assert fired.candidates[0].at == datetime(2026, 11, 20, 9, tzinfo=ZoneInfo("Europe/Berlin"))


def test_event_watermark_follows_received_at_and_never_moves_back(engine: Engine) -> None:
    engine.append(
        "identity_map",
        pa.table(
            {
                "id_type": ["member_id"],
                "id_value": ["u1"],
                "customer_id": ["c1"],
                "quarantined": [False],
                "first_seen": [T0],
                "last_seen": [T0],
                "messages": [1],
            }
        ),
    )
    add_events(
        engine,
        [
            {"message_id": "e1", "user_id": "u1", "event": "Signed Up", "timestamp": T0},
            {"message_id": "e2", "user_id": "nobody", "event": "Signed Up", "timestamp": T0},
        ],
    )
    t = EventTrigger(event="Signed Up")
    sh = ZoneInfo("Asia/Shanghai")
    late = timedelta(minutes=10)
    fired = fire_event(
        engine, t, T0 - timedelta(hours=1), T0 + timedelta(hours=1), ["member_id"], sh, late
    )
    assert [(c.customer_id, c.occasion, c.trigger_id) for c in fired.candidates] == [
        ("c1", "2026-11-20", "e1")
    ]  # an unknown user does not enter (identity has not resolved it)
    assert fired.watermark == T0
    # Re-read within the margin: found again (entry rules refuse it), the mark stays put.
    again = fire_event(
        engine, t, T0 + timedelta(minutes=5), T0 + timedelta(hours=1), ["member_id"], sh, late
    )
    assert len(again.candidates) == 1 and again.watermark == T0 + timedelta(minutes=5)
    quiet = fire_event(
        engine, t, T0 + timedelta(hours=1), T0 + timedelta(hours=2), ["member_id"], sh, late
    )
    assert quiet.candidates == [] and quiet.watermark == T0 + timedelta(hours=1)


def test_date_prefilter_finds_exactly_what_a_full_scan_finds(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import random

    from closedloop.activate import triggers
    from closedloop.core.definitions.campaigns import DateTrigger

    rng = random.Random(3)
    zones = ["Asia/Shanghai", "America/Los_Angeles", "Pacific/Kiritimati", None]
    rows = []
    for i in range(400):
        born = date(1960, 1, 1) + timedelta(days=rng.randrange(365 * 50))
        if i % 40 == 0:
            born = date(1996, 2, 29)
        rows.append(
            dict.fromkeys(PROFILES.columns)
            | {
                "customer_id": f"c{i}",
                "timezone": zones[i % 4],
                "birthday": born,
                "first_order_at": datetime(2020, 1, 1, tzinfo=UTC)
                + timedelta(hours=rng.randrange(24 * 365 * 6)),
            }
        )
    engine.replace("profiles", pa.Table.from_pylist(rows))
    evaluate_segment(engine, EVERYONE, Fields(), Clock(T0 - timedelta(days=1)))
    windows = [
        (datetime(2027, 2, 23, tzinfo=UTC), datetime(2027, 2, 27, tzinfo=UTC)),  # 29 Feb → 28 Feb
        (T0 - timedelta(days=1), T0),
        (T0, T0 + timedelta(days=20)),
    ]
    for trait, offset, yearly in [
        ("birthday", -3, True),
        ("first_order_at", 7, True),
        ("birthday", 0, False),
    ]:
        t = DateTrigger(date_trait=trait, offset_days=offset, yearly=yearly)
        for since, now in windows:
            fast = triggers.fire_date(engine, t, "everyone", since, now, "Asia/Shanghai")
            with monkeypatch.context() as m:
                m.setattr(triggers, "NEAR_DAYS", -1)  # no pre-filter: every member is read
                full = triggers.fire_date(engine, t, "everyone", since, now, "Asia/Shanghai")
            key = sorted((c.customer_id, c.occasion, c.at) for c in full.candidates)
            assert sorted((c.customer_id, c.occasion, c.at) for c in fast.candidates) == key
            if trait == "birthday" and yearly and since.year == 2027:
                assert any(c.customer_id == "c0" for c in full.candidates)  # the leapling
