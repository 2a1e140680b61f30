"""Arbitration respects triggers: a triggered rival competes only for the people whose trigger
fires that day; an audience-only rival for its audience. Real DuckDB tables throughout."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop.activate.arbitration import LOST, arbitrate, contest, fired_today, pick_winner
from closedloop.activate.campaign import run_campaign
from closedloop.activate.journey_tables import JOURNEY_STATE
from closedloop.core.clock import Clock
from closedloop.core.definitions import CampaignDef, SegmentDef
from closedloop.core.engine import Engine
from closedloop.segments.audience import Fields, evaluate_segment
from tests.conftest import add_events
from tests.segments.test_audience import set_profiles

# 12:00 in Shanghai on Friday 20 November 2026; the local day began at 2026-11-19 16:00 UTC.
NOW = datetime(2026, 11, 20, 4, 0, tzinfo=UTC)
DAY_START = datetime(2026, 11, 19, 16, 0, tzinfo=UTC)
TZ = "Asia/Shanghai"
PEOPLE = ["p1", "p2", "p3", "p4"]
EVERYONE = SegmentDef.model_validate(
    {"name": "everyone", "where": {"trait": "customer_id", "op": "not_null"}}
)
GOLD = SegmentDef.model_validate(
    {"name": "gold", "where": {"trait": "tier", "op": "eq", "value": "gold"}}
)


def camp(name: str, priority: int = 0, **kw: Any) -> CampaignDef:
    base = {
        "name": name,
        "audience": "everyone",
        "template": "hi",
        "priority": priority,
        "arbitration": "priority",
    }
    return CampaignDef.model_validate(base | kw)


def setup(engine: Engine, **extra: Any) -> None:
    set_profiles(
        engine,
        [
            {
                "customer_id": c,
                "email": f"{c}@x.cn",
                "consent_marketing": True,
                "timezone": TZ,
                **{k: v(c) for k, v in extra.items()},
            }
            for c in PEOPLE
        ],
    )
    evaluate_segment(engine, EVERYONE, Fields(), Clock(NOW - timedelta(days=30)))


def events(engine: Engine, rows: list[tuple[str, str, datetime]]) -> None:
    """(customer, event, time) events, attributed to their customer as identity would."""
    if not rows:
        return
    add_events(
        engine,
        [
            {"message_id": f"e{i}", "user_id": c, "event": name, "timestamp": at}
            for i, (c, name, at) in enumerate(rows)
        ],
    )
    engine.append(
        "event_customers",
        pa.Table.from_pylist(
            [{"message_id": f"e{i}", "customer_id": c} for i, (c, _, _) in enumerate(rows)]
        ),
    )


PLAIN = camp("plain", 0)
CART = camp("cart", 5, trigger={"event": "Product Added"})


def test_an_event_triggered_rival_wins_only_those_whose_event_happened_today(
    engine: Engine,
) -> None:
    setup(engine)
    events(
        engine,
        [
            ("p1", "Product Added", NOW - timedelta(hours=1)),  # today: cart competes
            ("p2", "Product Added", DAY_START - timedelta(minutes=1)),  # yesterday, locally
            ("p3", "Product Viewed", NOW - timedelta(hours=1)),  # another event
            ("p4", "Product Added", NOW + timedelta(hours=1)),  # not yet
        ],
    )
    assert arbitrate(engine, PLAIN, [PLAIN, CART], PEOPLE, now=NOW, timezone=TZ) == {"p1": "cart"}
    # Before: "in the rival's audience now" was enough, and cart took everyone.
    untriggered = CART.model_copy(update={"trigger": None})
    assert arbitrate(
        engine, PLAIN, [PLAIN, untriggered], PEOPLE, now=NOW, timezone=TZ
    ) == dict.fromkeys(PEOPLE, "cart")
    # The triggered campaign itself competes as before: plain (audience-only) is a contender
    # for all, and loses to cart's priority only where cart competes.
    assert arbitrate(engine, CART, [PLAIN, CART], PEOPLE, now=NOW, timezone=TZ) == {}


def test_a_journey_entry_that_day_counts_even_before_identity_resolved_the_event(
    engine: Engine,
) -> None:
    setup(engine)
    row = {f: None for f in JOURNEY_STATE.columns}
    entries = [
        row
        | {
            "campaign": "cart",
            "occasion": "2026-11-20",
            "customer_id": "p3",
            "seq": 0,
            "status": "active",
            "entered_at": NOW - timedelta(hours=2),
            "updated_at": NOW,
        },
        row
        | {
            "campaign": "cart",
            "occasion": "2026-11-18",
            "customer_id": "p4",
            "seq": 0,
            "status": "active",
            "entered_at": NOW - timedelta(days=2),
            "updated_at": NOW,
        },
    ]
    engine.append("journey_state", pa.Table.from_pylist(entries, JOURNEY_STATE.schema.to_pyarrow()))
    assert arbitrate(engine, PLAIN, [PLAIN, CART], PEOPLE, now=NOW, timezone=TZ) == {"p3": "cart"}


def test_segment_entry_date_and_schedule_triggers(engine: Engine) -> None:
    birthdays = {"p1": date(1990, 11, 20), "p2": date(1991, 11, 21), "p3": date(1992, 5, 1)}
    setup(
        engine,
        birthday=lambda c: birthdays.get(c),
        tier=lambda c: "gold" if c in ("p1", "p4") else "silver",
    )
    # gold members entered the segment: p1 today, p4 was re-evaluated last week.
    evaluate_segment(engine, GOLD, Fields(), Clock(NOW - timedelta(hours=1)))
    entry = camp("welcome_gold", 3, trigger={"segment_entry": "gold"}, audience="gold")
    assert arbitrate(engine, PLAIN, [PLAIN, entry], PEOPLE, now=NOW, timezone=TZ) == {
        "p1": "welcome_gold",
        "p4": "welcome_gold",
    }
    later = NOW + timedelta(days=7)
    assert arbitrate(engine, PLAIN, [PLAIN, entry], PEOPLE, now=later, timezone=TZ) == {}

    # A birthday at 10:00 local competes all day — at 08:00 too, before it fires.
    bday = camp("birthday", 3, trigger={"date_trait": "birthday", "at": "10:00"})
    morning = DAY_START + timedelta(hours=8)
    assert arbitrate(engine, PLAIN, [PLAIN, bday], PEOPLE, now=morning, timezone=TZ) == {
        "p1": "birthday"
    }
    tomorrow = NOW + timedelta(days=1)
    assert arbitrate(engine, PLAIN, [PLAIN, bday], PEOPLE, now=tomorrow, timezone=TZ) == {
        "p2": "birthday"
    }

    weekly = camp("friday", 3, trigger={"schedule": {"every": "week", "weekday": 4}})
    assert set(arbitrate(engine, PLAIN, [PLAIN, weekly], PEOPLE, now=NOW, timezone=TZ)) == set(
        PEOPLE
    )
    saturday = NOW + timedelta(days=1)
    assert arbitrate(engine, PLAIN, [PLAIN, weekly], PEOPLE, now=saturday, timezone=TZ) == {}


def test_dry_run_and_preview_say_why(engine: Engine, tmp_path: Path) -> None:
    setup(engine)
    events(engine, [("p1", "Product Added", NOW - timedelta(hours=1))])
    run = run_campaign(
        engine,
        PLAIN,
        outbox_dir=tmp_path,
        occasion="o",
        clock=Clock(NOW),
        timezone=TZ,
        dry_run=True,
        rivals=[PLAIN, CART],
    )
    assert run.decisions is not None
    rows = {r["customer_id"]: r for r in run.decisions.to_pylist()}
    assert rows["p1"]["reason"] == LOST + "cart"
    assert rows["p1"]["why"] == (
        "cart (its event trigger (Product Added) fired today): by priority 5 over 0"
    )
    assert rows["p2"]["why"] is None and rows["p2"]["reason"] != LOST + "cart"
    by_value = contest(
        engine,
        camp("a", 1, arbitration="value", value_model="m", value_per_conversion=10),
        [camp("b", 2, arbitration="value", value_model="m2", value_per_conversion=10)],
        ["p1"],
        now=NOW,
    )
    assert by_value["p1"].why == "b: no expected value for a, b, so by priority 2 over 1"


def test_fired_today_is_the_local_day(engine: Engine) -> None:
    setup(engine)
    events(engine, [("p1", "Product Added", DAY_START + timedelta(minutes=1))])
    assert fired_today(engine, CART, PEOPLE, NOW, TZ) == {"p1"}
    # In UTC the same event fell on the 19th, so the 20th (UTC) has nothing.
    assert fired_today(engine, CART, PEOPLE, NOW, "UTC") == set()


# ---- property: over random campaign sets ---------------------------------------------------
campaign_sets = st.lists(
    st.tuples(
        st.integers(0, 3),  # priority
        st.booleans(),  # triggered by an event?
        st.sampled_from(["everyone", "gold"]),  # audience
    ),
    min_size=2,
    max_size=5,
)
person = st.tuples(
    st.booleans(),  # gold?
    st.sampled_from(["today", "yesterday", "none"]),  # when their Product Added happened
)


@pytest.mark.slow  # ~1 s an example: a fresh warehouse, every campaign arbitrated against all
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(specs=campaign_sets, people=st.lists(person, min_size=1, max_size=5))
def test_each_person_goes_to_the_best_campaign_that_really_competes(
    specs: list[tuple[int, bool, str]], people: list[tuple[bool, str]]
) -> None:
    ids = [f"q{i}" for i in range(len(people))]
    campaigns = [
        camp(
            f"c{k}",
            prio,
            audience=audience,
            **({"trigger": {"event": "Product Added"}} if triggered else {}),
        )
        for k, (prio, triggered, audience) in enumerate(specs)
    ]
    with Engine("duckdb://") as engine:
        set_profiles(
            engine,
            [
                {"customer_id": c, "tier": "gold" if gold else "silver", "timezone": TZ}
                for c, (gold, _) in zip(ids, people, strict=True)
            ],
        )
        for seg in (EVERYONE, GOLD):
            evaluate_segment(engine, seg, Fields(), Clock(NOW - timedelta(days=30)))
        when = {"today": NOW - timedelta(hours=1), "yesterday": NOW - timedelta(days=1)}
        events(
            engine,
            [
                (c, "Product Added", when[w])
                for c, (_, w) in zip(ids, people, strict=True)
                if w in when
            ],
        )
        lost = {
            c.name: arbitrate(engine, c, campaigns, ids, now=NOW, timezone=TZ) for c in campaigns
        }

    for c, (gold, added) in zip(ids, people, strict=True):
        # The oracle, straight from the generated facts.
        def competes(k: int, gold: bool = gold, added: str = added) -> bool:
            _, triggered, audience = specs[k]
            inside = audience == "everyone" or gold
            return inside and (not triggered or added == "today")

        for k, campaign in enumerate(campaigns):
            rivals = [campaigns[j] for j in range(len(campaigns)) if j != k and competes(j)]
            field = [campaign, *rivals]
            best = pick_winner(field, None, by_value=False)
            if best.name == campaign.name:
                assert c not in lost[campaign.name]
            else:
                assert lost[campaign.name][c] == best.name
                # never a triggered campaign whose trigger did not fire for the person today
                assert competes(int(best.name[1:]))
        # Among the campaigns that really compete, exactly one keeps the person.
        keepers = [x.name for k, x in enumerate(campaigns) if competes(k) and c not in lost[x.name]]
        if any(competes(k) for k in range(len(campaigns))):
            assert len(keepers) == 1


PLAIN_YAML = """\
name: plain
audience: everyone
template: "hello"
arbitration: priority
"""
CART_YAML = """\
name: cart
audience: everyone
template: "your cart"
priority: 5
arbitration: priority
trigger: {event: Product Added}
"""


def test_preview_says_who_won_and_why(engine: Engine, tmp_path: Path) -> None:
    from closedloop.activate.campaign import preview_campaign
    from tests.activate.test_journey import make_project
    from tests.activate.test_journey import people as journey_people

    project = make_project(tmp_path / "p", {"plain": PLAIN_YAML, "cart": CART_YAML})
    journey_people(engine, 3)
    events(engine, [("c001", "Product Added", NOW - timedelta(hours=1))])
    rivals = list(project.campaigns.values())
    plain = project.campaigns["plain"]
    lost = preview_campaign(
        engine, plain, "c001", identity=project.identity, clock=Clock(NOW), rivals=rivals
    )
    assert LOST + "cart (its event trigger (Product Added) fired today): by priority 5 over 0" in (
        lost.stopped_by
    )
    kept = preview_campaign(
        engine, plain, "c002", identity=project.identity, clock=Clock(NOW), rivals=rivals
    )
    assert not any(r.startswith(LOST) for r in kept.stopped_by), kept.stopped_by
