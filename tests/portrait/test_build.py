from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.identity.resolve import resolve
from closedloop.portrait.build import build_profiles
from closedloop.portrait.lifecycle import ACTIVE_DAYS, CHURN_DAYS, SILENT_DAYS
from tests.conftest import add_events
from tests.identity.test_resolve import CONFIG

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)


def order(
    user: str, days_ago: float, revenue: float, oid: str, coupon: str | None = None
) -> dict[str, object]:
    return {
        "message_id": f"o-{oid}",
        "user_id": user,
        "event": "Order Completed",
        "order_id": oid,
        "revenue": revenue,
        "category": "milk_tea",
        "timestamp": NOW - timedelta(days=days_ago),
        "properties": {"coupon": coupon} if coupon else {},
    }


def profiles(engine: Engine) -> dict[str, dict[str, object]]:
    rows = engine.table("profiles").to_pyarrow().to_pylist()
    m = engine.table("identity_map").to_pandas()
    by_member = dict(
        zip(
            m[m.id_type == "member_id"].customer_id,
            m[m.id_type == "member_id"].id_value,
            strict=True,
        )
    )
    return {str(by_member.get(r["customer_id"], r["customer_id"])): r for r in rows}


@pytest.fixture
def built(engine: Engine) -> dict[str, dict[str, object]]:
    add_events(
        engine,
        [
            {
                "message_id": "id1",
                "user_id": "A",
                "type": "identify",
                "traits": {
                    "name": "Li Wei",
                    "birthday": "1990-11-25",
                    "city": "Hangzhou",
                    "email": "a@x.cn",
                },
                "timestamp": NOW - timedelta(days=400),
            },
            {
                "message_id": "id2",
                "user_id": "A",
                "type": "identify",
                "traits": {"city": "Shanghai"},
                "timestamp": NOW - timedelta(days=10),
            },
            order("A", 5, 100.0, "1"),
            order("A", 50, 300.0, "2", coupon="C10"),
            order("A", 90, 50.0, "3"),
            order("B", ACTIVE_DAYS + 1, 20.0, "4"),
            order("C", SILENT_DAYS + 1, 20.0, "5"),
            order("D", CHURN_DAYS + 1, 20.0, "6"),
            order("E", 3, 20.0, "7"),
            {"user_id": "F", "event": "Product Viewed", "timestamp": NOW - timedelta(days=1)},
            # An order after "now" must not count.
            order("B", -1, 999.0, "8"),
        ],
    )
    resolve(engine, CONFIG)
    build_profiles(engine, Clock(NOW))
    return profiles(engine)


def test_transactions(built: dict[str, dict[str, object]]) -> None:
    a = built["A"]
    assert a["orders"] == 3
    assert a["revenue"] == pytest.approx(450.0)
    assert a["avg_order_value"] == pytest.approx(150.0)
    assert a["coupon_share"] == pytest.approx(1 / 3)
    assert a["recency_days"] == 5
    assert built["B"]["orders"] == 1  # the future order is excluded


def test_latest_traits_win(built: dict[str, dict[str, object]]) -> None:
    a = built["A"]
    assert a["city"] == "Shanghai"
    assert a["name"] == "Li Wei"
    assert a["age"] == 35  # birthday on Nov 25: not yet 36 on Nov 20
    assert a["email"] == "a@x.cn"


def test_lifecycle_thresholds(built: dict[str, dict[str, object]]) -> None:
    assert built["A"]["lifecycle_stage"] == "active"
    assert built["B"]["lifecycle_stage"] == "silent"
    assert built["C"]["lifecycle_stage"] == "churn_risk"
    assert built["D"]["lifecycle_stage"] == "churned"
    assert built["E"]["lifecycle_stage"] == "new"
    assert built["F"]["lifecycle_stage"] == "prospect"
    assert built["F"]["ladder_stage"] == "member"
    assert built["A"]["ladder_stage"] == "customer"


def test_rfm_scores(built: dict[str, dict[str, object]]) -> None:
    assert built["F"]["r_score"] is None
    # E ordered most recently; D longest ago.
    assert built["E"]["r_score"] == 5
    assert built["D"]["r_score"] == 1
    assert built["A"]["f_score"] == 5 and built["A"]["m_score"] == 5
    assert built["A"]["rfm_group"] == "champions"
    assert built["D"]["rfm_group"] == "hibernating"


def test_contact_preferences(engine: Engine) -> None:
    day = timedelta(days=1)
    add_events(
        engine,
        [
            {
                "message_id": "c1",
                "user_id": "A",
                "type": "identify",
                "timestamp": NOW - 9 * day,
                "context": {
                    "timezone": "Europe/London",
                    "consent": {"categoryPreferences": {"marketing": True}},
                },
            },
            {
                "message_id": "c2",
                "user_id": "A",
                "event": "Unsubscribed",
                "timestamp": NOW - 5 * day,
                "properties": {"channel": "email"},
                "context": {"timezone": "Europe/London"},
            },
            {
                "message_id": "c3",
                "user_id": "A",
                "event": "Subscribed",
                "timestamp": NOW - 8 * day,
                "properties": {"channel": "email"},
            },
            {
                "message_id": "c4",
                "user_id": "B",
                "type": "identify",
                "timestamp": NOW - 9 * day,
                "context": {"consent": {"categoryPreferences": {"marketing": True}}},
            },
            {
                "message_id": "c5",
                "user_id": "B",
                "type": "identify",
                "timestamp": NOW - 2 * day,
                "context": {"consent": {"categoryPreferences": {"marketing": False}}},
            },
            {
                "message_id": "c6",
                "user_id": "B",
                "event": "Unsubscribed",
                "timestamp": NOW - 7 * day,
                "properties": {"channel": "email"},
            },
            {
                "message_id": "c7",
                "user_id": "B",
                "event": "Subscribed",
                "timestamp": NOW - 6 * day,
                "properties": {"channel": "email"},
            },
            {"message_id": "c8", "user_id": "C", "event": "Product Viewed", "timestamp": NOW - day},
        ],
    )
    resolve(engine, CONFIG)
    build_profiles(engine, Clock(NOW))
    p = profiles(engine)
    assert (p["A"]["timezone"], p["A"]["consent_marketing"], p["A"]["email_opt_out"]) == (
        "Europe/London",
        True,
        True,
    )
    assert (p["B"]["consent_marketing"], p["B"]["email_opt_out"], p["B"]["sms_opt_out"]) == (
        False,
        False,
        False,
    )
    assert (p["C"]["timezone"], p["C"]["consent_marketing"], p["C"]["email_opt_out"]) == (
        None,
        None,
        False,
    )
