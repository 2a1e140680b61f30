"""Intent-to-treat against "as sent": a simulation where frequency caps bias the old comparison.

Occasion 1 messages the *engaged* half of the audience; occasion 2, two days later, targets
everyone under a cap of one message a week. The treated engaged people are capped on occasion
2 (they were messaged on occasion 1); their held-out twins were never messaged, so they are
not. Engaged people convert far more often, whatever the message. "As sent" (messaged vs
held out) then compares mostly non-engaged people with everyone and finds a large negative
"lift"; intent-to-treat compares the randomised groups whole and finds the true effect.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from closedloop.activate.campaign import run_campaign
from closedloop.core.clock import Clock
from closedloop.core.definitions import CampaignDef, SegmentDef
from closedloop.core.engine import Engine
from closedloop.measure.campaign import measure_campaign
from closedloop.segments.audience import Fields, evaluate_segment
from tests.conftest import add_events
from tests.segments.test_audience import set_profiles

T1 = datetime(2026, 11, 2, 12, tzinfo=UTC)
T2 = T1 + timedelta(days=2)
N = 6000
BASE = {"engaged": 0.5, "other": 0.1}

NUDGE = CampaignDef.model_validate(
    {
        "name": "nudge",
        "audience": "everyone",
        "channel": "email",
        "holdout": 0.5,
        "template": "Hello",
        "goal": {"event": "Order Completed", "window_days": 7},
        "policy": {"caps": [{"max": 1, "days": 7}]},
    }
)
SEGMENTS = [
    SegmentDef.model_validate(
        {"name": "everyone", "where": {"trait": "customer_id", "op": "not_null"}}
    ),
    SegmentDef.model_validate(
        {"name": "engaged", "where": {"trait": "orders", "op": ">=", "value": 1}}
    ),
]


def simulate(engine: Engine, tmp_path: Path, effect: float, seed: int) -> tuple[float, float]:
    """Run both occasions, draw conversions; return (true ITT effect, share of treated messaged)."""
    set_profiles(
        engine,
        [
            {
                "customer_id": f"c{i:05d}",
                "email": f"c{i}@x.cn",
                "consent_marketing": True,
                "timezone": "UTC",
                "orders": i % 2,  # every second person is engaged
            }
            for i in range(N)
        ],
    )
    for s in SEGMENTS:
        evaluate_segment(engine, s, Fields(), Clock(T1 - timedelta(hours=1)))
    first = NUDGE.model_copy(update={"audience": "engaged"})
    run_campaign(engine, first, outbox_dir=tmp_path, occasion="o1", clock=Clock(T1))
    run2 = run_campaign(engine, NUDGE, outbox_dir=tmp_path, occasion="o2", clock=Clock(T2))
    assert run2.reasons and run2.reasons.get("frequency_cap", 0) > 1000  # the caps bite

    d = engine.table("deliveries")
    rows = d.filter(d.occasion == "o2").to_pyarrow().to_pylist()
    rng = np.random.default_rng(seed)
    msgs, uplift, treated = [], 0.0, 0
    for r in rows:
        engaged = int(r["customer_id"][1:]) % 2 == 1
        sent = r["status"] == "sent"
        p = BASE["engaged" if engaged else "other"] + (effect if sent else 0.0)
        if r["group"] == "treatment":
            treated += 1
            uplift += effect if sent else 0.0
        if rng.random() < p:
            msgs.append(
                {
                    "message_id": f"o{r['customer_id']}",
                    "user_id": r["customer_id"],
                    "event": "Order Completed",
                    "revenue": 10.0,
                    "timestamp": T2 + timedelta(days=1),
                }
            )
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
    return uplift / treated, run2.sent / treated


@pytest.mark.parametrize(("effect", "seed"), [(0.0, 1), (0.1, 2)])
def test_itt_is_unbiased_where_as_sent_is_not(
    engine: Engine, tmp_path: Path, effect: float, seed: int
) -> None:
    true_itt, reach = simulate(engine, tmp_path, effect, seed)
    out = measure_campaign(engine, NUDGE, "o2", Clock(T2 + timedelta(days=7)))
    # Intent-to-treat: the randomised groups whole; the interval covers the true effect.
    assert out.treated + out.held_out == N
    assert out.lift.absolute_low <= true_itt <= out.lift.absolute_high
    assert abs(out.lift.absolute - true_itt) < 0.04
    assert out.reach_share == pytest.approx(reach)
    assert out.treated_stopped > 1000 and out.held_out_stopped == 0
    # As sent: messaged vs held out — far off, its interval excludes the true effect on the
    # messaged (and the ITT one).
    assert out.as_sent is not None
    assert out.as_sent.absolute_high < min(effect, true_itt) - 0.1
    # As sent with the caps replayed on the holdout: the engaged held out (messaged on
    # occasion 1 had they been treated) leave too, and the true effect on the messaged is back.
    sym = out.as_sent_symmetric
    assert sym is not None and out.held_out_capped > 1000
    assert abs(out.held_out_capped - out.treated_stopped) < 0.1 * out.treated_stopped
    assert sym.absolute_low <= effect <= sym.absolute_high
    assert abs(sym.absolute - effect) < 0.04


def test_without_stops_both_estimands_agree(engine: Engine, tmp_path: Path) -> None:
    set_profiles(
        engine,
        [
            {"customer_id": f"c{i:05d}", "email": f"c{i}@x.cn", "consent_marketing": True}
            for i in range(400)
        ],
    )
    evaluate_segment(engine, SEGMENTS[0], Fields(), Clock(T1 - timedelta(hours=1)))
    run_campaign(engine, NUDGE, outbox_dir=tmp_path, occasion="o1", clock=Clock(T1))
    out = measure_campaign(engine, NUDGE, "o1", Clock(T1 + timedelta(days=7)))
    assert out.as_sent == out.lift == out.as_sent_symmetric and out.reach_share == 1.0
    assert out.held_out_capped == 0
    assert out.treated_stopped == out.held_out_stopped == 0


def test_report_rows_show_all_three_estimands(engine: Engine, tmp_path: Path) -> None:
    from closedloop.measure.report import campaign_rows

    simulate(engine, tmp_path, 0.0, 1)
    rows = dict(campaign_rows(measure_campaign(engine, NUDGE, "o2", Clock(T2 + timedelta(days=7)))))
    assert rows["estimand"].startswith("intent-to-treat")
    assert "absolute lift, 95% CI" in rows
    assert any(k.startswith("as sent (") for k in rows)
    assert any(k.startswith("as sent, caps replayed") for k in rows)
