"""Cohorts by first-order month: sizes, retention by month since, revenue, splits."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop.core.engine import Engine
from closedloop.measure.cohorts import cohorts
from tests.conftest import add_events

START = datetime(2026, 1, 1, tzinfo=UTC)
END = datetime(2026, 5, 1, tzinfo=UTC)


def put(engine: Engine, events: list[tuple[str, str, datetime, float, str]]) -> None:
    msgs: list[dict[str, Any]] = [
        {
            "message_id": f"m{i}",
            "user_id": c,
            "event": e,
            "timestamp": t,
            "revenue": r,
            "channel": ch,
        }
        for i, (c, e, t, r, ch) in enumerate(events)
    ]
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


def d(month: int, day: int = 5) -> datetime:
    return datetime(2026 if month > 0 else 2025, month if month > 0 else 12, day, tzinfo=UTC)


ORDER = "Order Completed"


def test_first_order_cohorts_retention_and_revenue(engine: Engine) -> None:
    put(
        engine,
        [
            ("a", ORDER, d(1), 100.0, "web"),  # January cohort, back in March
            ("a", ORDER, d(1, 20), 50.0, "web"),
            ("a", ORDER, d(3), 30.0, "web"),
            ("b", ORDER, d(1), 10.0, "app"),  # January cohort, never back
            ("c", ORDER, d(2), 20.0, "app"),  # February cohort, back in February and April
            ("c", ORDER, d(2, 25), 5.0, "app"),
            ("c", ORDER, d(4), 40.0, "app"),
            ("z", ORDER, d(0), 99.0, "web"),  # first order before the period: no cohort here
            ("z", ORDER, d(2), 99.0, "web"),
            ("a", "Product Viewed", d(2), 0.0, "web"),  # not an order
        ],
    )
    got = {c.month: c for c in cohorts(engine, START, END)}
    assert sorted(got) == [date(2026, 1, 1), date(2026, 2, 1)]
    jan, feb = got[date(2026, 1, 1)], got[date(2026, 2, 1)]
    assert (jan.size, jan.active, jan.revenue) == (2, [2, 0, 1, 0], [160.0, 0.0, 30.0, 0.0])
    assert (feb.size, feb.active, feb.revenue) == (1, [1, 0, 1], [25.0, 0.0, 40.0])
    assert jan.retention(2) == 0.5 and jan.revenue_per_customer(3) == pytest.approx(95.0)
    split = {(c.month, c.split): c.size for c in cohorts(engine, START, END, by="channel")}
    assert split == {
        (date(2026, 1, 1), "app"): 1,
        (date(2026, 1, 1), "web"): 1,
        (date(2026, 2, 1), "app"): 1,
    }


def test_bad_split_is_rejected(engine: Engine) -> None:
    with pytest.raises(ValueError, match="source or channel"):
        cohorts(engine, START, END, by="city")


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(st.sampled_from("pqrstu"), st.integers(1, 4), st.integers(1, 28)),
        min_size=1,
        max_size=30,
    )
)
def test_month_zero_is_everyone_and_retention_is_a_share(
    engine: Engine, orders: list[tuple[str, int, int]]
) -> None:
    for t in ("events", "event_customers"):
        if engine.exists(t):
            engine.drop(t)
    put(engine, [(c, ORDER, d(m, day), 1.0, "web") for c, m, day in orders])
    found = cohorts(engine, START, END)
    assert sum(c.size for c in found) == len({c for c, _, _ in orders})
    for c in found:
        assert c.active[0] == c.size
        assert all(0.0 <= c.retention(m) <= 1.0 for m in range(len(c.active)))
        assert len(c.active) == 4 - (c.month.month - 1)
    assert sum(sum(c.revenue) for c in found) == pytest.approx(len(orders))


@pytest.mark.parametrize(
    ("tz", "when", "month"),
    [
        ("UTC", datetime(2026, 1, 31, 20, 0, tzinfo=UTC), 1),
        ("Asia/Shanghai", datetime(2026, 1, 31, 20, 0, tzinfo=UTC), 2),  # 04:00 on 1 Feb
        ("America/New_York", datetime(2026, 3, 1, 3, 0, tzinfo=UTC), 2),  # 22:00 on 28 Feb
        # Berlin on summer time from 29 March: 22:30 UTC on 31 March is 00:30 on 1 April
        # (on winter time it would still be March).
        ("Europe/Berlin", datetime(2026, 3, 31, 22, 30, tzinfo=UTC), 4),
        ("Europe/Berlin", datetime(2026, 2, 28, 23, 30, tzinfo=UTC), 3),  # 00:30 on 1 March
        ("Europe/Berlin", datetime(2026, 2, 28, 22, 30, tzinfo=UTC), 2),  # 23:30 on 28 Feb
    ],
)
def test_months_are_the_reporting_zones_calendar_months(
    engine: Engine, tz: str, when: datetime, month: int
) -> None:
    put(
        engine,
        [
            ("a", ORDER, when, 10.0, "web"),
            ("a", ORDER, datetime(2026, 4, 10, tzinfo=UTC), 5.0, "web"),
        ],
    )
    # The period ends at noon UTC on 30 April: still April in each of these zones.
    (c,) = cohorts(engine, START, datetime(2026, 4, 30, 12, tzinfo=UTC), tz=tz)
    assert c.month == date(2026, month, 1)
    assert len(c.active) == 4 - (month - 1)  # months since, up to April in that zone
    assert c.active[4 - month] == 1 and c.revenue[4 - month] == pytest.approx(
        5.0 if month < 4 else 15.0
    )


def test_an_unknown_reporting_zone_is_refused(engine: Engine) -> None:
    put(engine, [("a", ORDER, d(1), 1.0, "web")])
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        cohorts(engine, START, END, tz="Mars/Olympus")
