"""Per-customer limits counted per time window (``window_days``).

"At most 2 phones per 30 days": a customer may change phones over time, but links that
would give it a third phone first seen within any 30 days are dropped and recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from closedloop.core.definitions import IdentityConfig
from closedloop.core.engine import Engine
from closedloop.identity.resolve import resolve
from closedloop.identity.rules import most_in_window
from tests.conftest import add_events
from tests.identity.test_rules import TYPES

START = datetime(2026, 1, 1, tzinfo=UTC)


def windowed(limit: int = 2, days: int = 30) -> IdentityConfig:
    types = [dict(t) for t in TYPES]
    for t in types:
        if t["name"] == "phone":
            t["max_per_customer"] = limit
            t["window_days"] = days
    return IdentityConfig.model_validate({"types": types})


def phone(i: int) -> str:
    return f"1390000{i:04d}"


def test_window_needs_a_limit() -> None:
    types = [dict(t) for t in TYPES]
    types[1]["window_days"] = 30
    with pytest.raises(ValidationError, match="window_days needs max_per_customer"):
        IdentityConfig.model_validate({"types": types})


def test_most_in_window_counts_half_open_windows() -> None:
    d = [START + timedelta(days=x) for x in (0, 10, 29, 30, 31, 100)]
    assert most_in_window(d, timedelta(days=30)) == 4  # 10, 29, 30, 31
    assert most_in_window(d[:4], timedelta(days=30)) == 3  # day 30 is outside [0, 30)
    assert most_in_window(d, timedelta(days=1)) == 1
    assert most_in_window([], timedelta(days=1)) == 0


def test_phones_spread_over_time_link_but_a_burst_is_cut(engine: Engine) -> None:
    # Member M1 changes phone every 60 days: 4 phones, never 2 within 30 days → one customer.
    slow = [
        {
            "user_id": "M1",
            "traits": {"phone": phone(i)},
            "timestamp": START + timedelta(days=60 * i),
        }
        for i in range(4)
    ]
    # Member M2 shows 3 phones within a week: the third (weakest evidence) link is dropped.
    burst = [
        {
            "user_id": "M2",
            "traits": {"phone": phone(10 + i)},
            "timestamp": START + timedelta(days=i),
        }
        for i in range(3)
    ]
    burst.append({"user_id": "M2", "traits": {"phone": phone(10)}, "timestamp": START})
    add_events(engine, [{**m, "message_id": f"m{i}"} for i, m in enumerate(slow + burst)])
    r = resolve(engine, windowed())
    m = engine.table("identity_map").to_pandas()
    owner = dict(zip(m["id_type"] + ":" + m["id_value"], m["customer_id"], strict=True))
    assert {owner[f"phone:+86{phone(i)}"] for i in range(4)} == {owner["member_id:M1"]}
    m2 = owner["member_id:M2"]
    linked = [i for i in range(10, 13) if owner[f"phone:+86{phone(i)}"] == m2]
    # phone 10 has two messages with M2 (strongest), so it stays; one of 11/12 is cut.
    assert 10 in linked and len(linked) == 2
    assert r.dropped == 1
    d = engine.table("identity_dropped_links").to_pandas()
    assert d["rule"].tolist() == ["max_per_customer phone=2 per 30 days"]


@st.composite
def timed_logs(draw: Callable[..., Any]) -> list[dict[str, Any]]:
    """Messages linking members, phones and cookies at random days within a year."""
    n = draw(st.integers(1, 16))
    out = []
    for i in range(n):
        m: dict[str, Any] = {
            "message_id": f"m{i:03d}",
            "timestamp": START + timedelta(days=draw(st.integers(0, 120))),
            "traits": {},
        }
        kinds = draw(
            st.lists(
                st.sampled_from(["user_id", "phone", "anonymous_id"]),
                min_size=1,
                max_size=3,
                unique=True,
            )
        )
        for k in kinds:
            if k == "phone":
                m["traits"]["phone"] = phone(draw(st.integers(0, 6)))
            elif k == "user_id":
                m["user_id"] = f"M{draw(st.integers(0, 3))}"
            else:
                m["anonymous_id"] = f"ck{draw(st.integers(0, 4))}"
        out.append(m)
    return out


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timed_logs(), st.integers(1, 3), st.sampled_from([7, 30, 90]))
def test_windowed_limit_is_never_broken(
    messages: list[dict[str, Any]], limit: int, days: int
) -> None:
    with Engine("duckdb://") as engine:
        add_events(engine, messages)
        r = resolve(engine, windowed(limit, days))
        m = engine.table("identity_map").to_pandas()
        dropped = engine.table("identity_dropped_links").to_pandas()
    phones = m[m["id_type"] == "phone"]
    for _, g in phones.groupby("customer_id"):
        times = sorted(t.to_pydatetime() for t in g["first_seen"])
        assert most_in_window(times, timedelta(days=days)) <= limit
    # Every dropped link is recorded with the windowed rule, and counted.
    assert len(dropped) == r.dropped
    assert set(dropped["rule"]) <= {f"max_per_customer phone={limit} per {days} days"}
