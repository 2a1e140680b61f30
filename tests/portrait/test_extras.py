"""The rest of the built-in portrait: age band, region, membership, active times, lists, network."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.identity.resolve import resolve
from closedloop.portrait.build import build_profiles
from closedloop.portrait.extras import age_band
from closedloop.portrait.localtime import offset_intervals
from tests.conftest import add_events
from tests.identity.test_resolve import CONFIG
from tests.portrait.test_build import NOW, order, profiles

DAY = timedelta(days=1)


def ev(user: str, event: str, at: datetime, **kw: Any) -> dict[str, Any]:
    return {"user_id": user, "event": event, "timestamp": at, **kw}


def ident(user: str, at: datetime, **traits: Any) -> dict[str, Any]:
    return {"user_id": user, "type": "identify", "timestamp": at, "traits": traits}


def build(engine: Engine, messages: list[dict[str, Any]], tz: str = "UTC") -> dict[str, Any]:
    for i, m in enumerate(messages):
        m.setdefault("message_id", f"x{i}")
    add_events(engine, messages)
    resolve(engine, CONFIG)
    build_profiles(engine, Clock(NOW), default_tz=tz)
    return profiles(engine)


def test_demographics_and_membership(engine: Engine) -> None:
    p = build(
        engine,
        [
            ident(
                "A", NOW - 9 * DAY, birthday="2001-11-20", city="Chengdu", tier="gold", points=900
            ),
            ident("A", NOW - 2 * DAY, points=1250),
            ident("B", NOW - 9 * DAY, birthday="2001-11-21", city="Atlantis", region="west"),
            ident("C", NOW - 9 * DAY, city="Beijing"),
        ],
    )
    a, b, c = p["A"], p["B"], p["C"]
    # Born 2001-11-20: 25 on the day (band edge 25), 24 the day before the birthday.
    assert (a["age"], a["age_band"]) == (25, "25-34")
    assert (b["age"], b["age_band"]) == (24, "18-24")
    assert (a["region"], b["region"], c["region"]) == ("southwest", "west", "north")
    assert (a["tier"], a["points"]) == ("gold", 1250)  # latest non-empty value of each trait
    assert c["age_band"] is None and c["points"] is None


@pytest.mark.parametrize(
    ("age", "band"), [(0, "under_18"), (17, "under_18"), (18, "18-24"), (54, "45-54"), (55, "55+")]
)
def test_age_band_edges(engine: Engine, age: int, band: str) -> None:
    import ibis

    assert engine.con.execute(age_band(ibis.literal(age))) == band


def test_behaviour_lists_and_touchpoint(engine: Engine) -> None:
    msgs = [
        ev("A", "Products Searched", NOW - DAY, source="app"),
        ev("A", "Products Searched", NOW - DAY, source="app"),
        ev("A", "Product Added to Wishlist", NOW - DAY, source="web"),
    ]
    for cat, n in (("serum", 3), ("lipstick", 2), ("milk_tea", 2), ("gift set", 1)):
        for _ in range(n):
            msgs.append(
                ev("A", "Product Viewed", NOW - DAY, category=cat, properties={"style": "minimal"})
            )
    msgs.append(ev("A", "Product Viewed", NOW - DAY, properties={"style": "classic"}))
    a = build(engine, msgs)["A"]
    assert (a["searches"], a["favourites"], a["product_views"]) == (2, 1, 9)
    # 3 serum, then lipstick and milk_tea tie at 2 (alphabetical), gift set left out.
    assert a["top_categories"] == "serum,lipstick,milk_tea"
    assert a["top_styles"] == "minimal,classic"
    assert a["preferred_touchpoint"] == "web"  # 9 views on web (default source) beat 2 on app


def test_order_interval_and_first_order(engine: Engine) -> None:
    p = build(
        engine,
        [
            order("A", 30, 10.0, "1"),
            order("A", 20, 10.0, "2"),
            order("A", 0, 10.0, "3"),
            order("B", 5, 10.0, "4"),
        ],
    )
    assert p["A"]["order_interval_days"] == pytest.approx(15.0)
    assert p["A"]["first_order_at"] == NOW - 30 * DAY
    assert p["B"]["order_interval_days"] is None


def test_active_times_in_the_persons_time_zone(engine: Engine) -> None:
    # NOW is Friday 2026-11-20 12:00 UTC. London in November is UTC+0; Shanghai UTC+8.
    sh = {"timezone": "Asia/Shanghai"}
    ld = {"timezone": "Europe/London"}
    at = datetime(2026, 11, 19, 17, 30, tzinfo=UTC)  # Thursday 17:30 UTC
    msgs = [
        ev("S", "Product Viewed", at, context=sh),  # Friday 01:30 in Shanghai
        ev("S", "Product Viewed", at + timedelta(minutes=10), context=sh),
        ev("S", "Product Viewed", at - 5 * timedelta(hours=1), context=sh),  # Thu 20:30
        ev("L", "Product Viewed", at, context=ld),  # Thursday 17:30 in London
        ev("N", "Product Viewed", at),  # no zone stated: the project's default
        # Summer time: 2026-07-01 09:15 UTC is 10:15 in London (BST, UTC+1).
        ev("L", "Product Viewed", datetime(2026, 7, 1, 9, 15, tzinfo=UTC), context=ld),
        ev("L", "Product Viewed", datetime(2026, 7, 2, 9, 15, tzinfo=UTC), context=ld),
        ident("L", at + timedelta(hours=3), name="x"),  # identify calls are not activity
    ]
    p = build(engine, msgs, tz="Asia/Shanghai")
    s, ld_, n = p["S"], p["L"], p["N"]
    assert (s["active_hour"], s["active_weekday"]) == (1, "Friday")
    hist = [int(x) for x in s["active_hours"].split(",")]
    assert len(hist) == 24 and hist[1] == 2 and hist[20] == 1 and sum(hist) == 3
    assert (ld_["active_hour"], ld_["active_weekday"]) == (
        10,
        "Thursday",
    )  # Thu 19 Nov, Wed 1 Jul, Thu 2 Jul
    lh = [int(x) for x in ld_["active_hours"].split(",")]
    assert lh[10] == 2 and lh[17] == 1 and sum(lh) == 3
    assert (n["active_hour"], n["active_weekday"]) == (1, "Friday")


def test_offset_intervals_follow_daylight_saving() -> None:
    start, end = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 12, 31, tzinfo=UTC)
    london = offset_intervals("Europe/London", start, end)
    assert [o for _, _, o in london] == [0, 3600, 0]
    # BST starts 2026-03-29 01:00 UTC and ends 2026-10-25 01:00 UTC.
    assert london[0][1] == datetime(2026, 3, 29, 1, tzinfo=UTC)
    assert london[1][1] == datetime(2026, 10, 25, 1, tzinfo=UTC)
    assert [o for _, _, o in offset_intervals("Asia/Shanghai", start, end)] == [8 * 3600]
    assert offset_intervals("Mars/Olympus", start, end) == []


def test_relationships(engine: Engine) -> None:
    def member(u: str) -> dict[str, Any]:
        return ident(u, NOW - 30 * DAY, member_id=u)

    def refer(a: str, b: str) -> dict[str, Any]:
        return ev(a, "Referral Sent", NOW - DAY, properties={"referred_member_id": b})

    # A—B, A—C, B—D, D—E, C—B; A refers B twice; an unknown member; a share naming nobody.
    msgs = [member(u) for u in "ABCDE"] + [
        refer("A", "B"),
        refer("A", "B"),
        refer("A", "C"),
        refer("B", "D"),
        refer("D", "E"),
        refer("C", "B"),
        refer("A", "ZZZ"),
        refer("A", "A"),
        ev("A", "Product Shared", NOW - DAY, properties={"shared_to": "weibo"}),
        ev("E", "Product Shared", NOW - DAY, properties={"shared_with_member_id": "A"}),
    ]
    p = build(engine, msgs)
    got = {
        u: (p[u]["referrals_made"], p[u]["network_first"], p[u]["network_second"]) for u in "ABCDE"
    }
    # Network: A-B, A-C, B-C, B-D, D-E, E-A.
    assert got["A"] == (5, 3, 1)  # first B,C,E; second D (via B or E)
    assert got["B"] == (1, 3, 1)  # first A,C,D; second E
    assert got["C"] == (1, 2, 2)  # first A,B; second D,E
    assert got["D"] == (1, 2, 2)  # first B,E; second A,C
    assert got["E"] == (0, 2, 2)  # first D,A; second B,C
    assert p["A"]["shares"] == 1 and p["E"]["shares"] == 1


def test_active_hour_and_weekday_ties_go_to_the_earlier(engine: Engine) -> None:
    # The top hour and weekday come from the maximum of one key per row (count first, then
    # the earlier slot), not from a ranking window: ties must still pick the earlier one.
    utc = {"timezone": "UTC"}
    mon21 = datetime(2026, 11, 16, 21, 0, tzinfo=UTC)  # Monday 21:00
    wed04 = datetime(2026, 11, 18, 4, 0, tzinfo=UTC)  # Wednesday 04:00
    fri21 = datetime(2026, 11, 13, 21, 30, tzinfo=UTC)  # Friday 21:30
    msgs = [
        ev("T", "Product Viewed", mon21, context=utc),
        ev("T", "Product Viewed", wed04, context=utc),
        ev("K", "Product Viewed", wed04, context=utc),
        ev("K", "Product Viewed", mon21, context=utc),
        ev("K", "Product Viewed", fri21, context=utc),
        ev("K", "Product Viewed", wed04 - timedelta(days=7), context=utc),
    ]
    p = build(engine, msgs)
    # T: hours 21 and 4 once each, Monday and Wednesday once each.
    assert (p["T"]["active_hour"], p["T"]["active_weekday"]) == (4, "Monday")
    # K: hour 21 and hour 4 twice each -> 4; Wednesday twice beats Monday and Friday.
    assert (p["K"]["active_hour"], p["K"]["active_weekday"]) == (4, "Wednesday")
    k = [int(x) for x in p["K"]["active_hours"].split(",")]
    assert k[4] == 2 and k[21] == 2 and sum(k) == 4
