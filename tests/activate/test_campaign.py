from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from closedloop.activate.campaign import assign_group, run_campaign
from closedloop.activate.templates import check_templates, render
from closedloop.core.clock import Clock
from closedloop.core.definitions import CampaignDef, SegmentDef
from closedloop.core.engine import Engine
from closedloop.measure.campaign import measure_campaign
from closedloop.segments.audience import Fields, evaluate_segment
from tests.conftest import add_events
from tests.segments.test_audience import set_profiles

NOW = datetime(2026, 11, 20, tzinfo=UTC)
CAMPAIGN = CampaignDef.model_validate(
    {
        "name": "winback",
        "audience": "everyone",
        "channel": "email",
        "holdout": 0.3,
        "subject": "{{ name or 'Hi' }}, we miss you",
        "template": "Dear {{ name }}, use {{ offer.code }}: {{ offer.conditions }}",
        "offer": {
            "code": "BACK20",
            "description": "20% off",
            "conditions": "orders over 100 CNY, 14 days",
        },
        "goal": {"event": "Order Completed", "window_days": 14},
    }
)
EVERYONE = SegmentDef.model_validate(
    {"name": "everyone", "where": {"trait": "customer_id", "op": "not_null"}}
)


@pytest.fixture
def audience(engine: Engine) -> Engine:
    rows: list[dict[str, object]] = [
        {
            "customer_id": f"c{i:03d}",
            "name": f"N{i}",
            "email": None if i % 10 == 0 else f"p{i}@x.cn",
            "consent_marketing": True,
        }
        for i in range(200)
    ]
    set_profiles(engine, rows)
    evaluate_segment(engine, EVERYONE, Fields(), Clock(NOW))
    return engine


def test_holdout_is_stable_and_near_its_share() -> None:
    groups = [assign_group("winback", f"c{i}", 0.3) for i in range(5000)]
    assert groups == [assign_group("winback", f"c{i}", 0.3) for i in range(5000)]
    assert 0.27 < groups.count("holdout") / 5000 < 0.33
    # Another campaign draws another split.
    other = [assign_group("birthday", f"c{i}", 0.3) for i in range(5000)]
    assert other != groups


def test_run_sends_holds_out_and_suppresses_once(audience: Engine, tmp_path: Path) -> None:
    run = run_campaign(
        audience, CAMPAIGN, outbox_dir=tmp_path, occasion="2026-11", clock=Clock(NOW)
    )
    assert run.audience == 200 and run.suppressed == 20
    assert run.sent + run.held_out == 180
    assert run.sent == sum(
        assign_group("winback", f"c{i:03d}", 0.3) == "treatment" for i in range(200) if i % 10
    )
    lines = [json.loads(x) for x in run.outbox.read_text().splitlines()] if run.outbox else []
    assert len(lines) == run.sent
    first = lines[0]
    assert (
        first["body"]
        == f"Dear N{int(first['customer_id'][1:])}, use BACK20: orders over 100 CNY, 14 days"
    )
    d = audience.table("deliveries").to_pandas()
    assert not set(d[d.status == "held_out"].customer_id) & {x["customer_id"] for x in lines}
    # A re-run (e.g. after a crash) decides nobody twice and writes no new messages.
    again = run_campaign(
        audience, CAMPAIGN, outbox_dir=tmp_path, occasion="2026-11", clock=Clock(NOW)
    )
    assert (again.sent, again.held_out, again.already_decided, again.outbox) == (0, 0, 200, None)
    assert audience.count("deliveries") == 200


def test_measure_counts_conversions_in_window(audience: Engine, tmp_path: Path) -> None:
    run_campaign(audience, CAMPAIGN, outbox_dir=tmp_path, occasion="2026-11", clock=Clock(NOW))
    d = audience.table("deliveries").to_pandas()
    treated = sorted(d[d.status == "sent"].customer_id)
    held = sorted(d[d.status == "held_out"].customer_id)
    # Map every customer to a member id so events resolve; convert half the treated, a tenth of the held out.
    converters = treated[: len(treated) // 2] + held[: len(held) // 10]
    msgs = [
        {
            "message_id": f"o{c}",
            "user_id": c,
            "event": "Order Completed",
            "revenue": 50.0,
            "timestamp": NOW + timedelta(days=3),
        }
        for c in converters
    ]
    # Outside the window or before the send: not counted.
    msgs.append(
        {
            "message_id": "late",
            "user_id": held[-1],
            "event": "Order Completed",
            "timestamp": NOW + timedelta(days=15),
        }
    )
    msgs.append(
        {
            "message_id": "early",
            "user_id": held[-2],
            "event": "Order Completed",
            "timestamp": NOW - timedelta(days=1),
        }
    )
    add_events(audience, msgs)
    audience.append(
        "event_customers",
        pa.table(
            {
                "message_id": [m["message_id"] for m in msgs],
                "customer_id": [m["user_id"] for m in msgs],
            }
        ),
    )
    out = measure_campaign(audience, CAMPAIGN, "2026-11", Clock(NOW + timedelta(days=14)))
    assert out.treated == len(treated) and out.held_out == len(held)
    assert out.treated_conversions == len(treated) // 2
    assert out.held_out_conversions == len(held) // 10
    assert out.treated_revenue == pytest.approx(50.0 * (len(treated) // 2))
    assert out.lift.absolute == pytest.approx(out.lift.treated_rate - out.lift.control_rate)
    assert out.lift.significant
    assert audience.count("campaign_results") == 2


def test_template_problems_are_found_before_sending() -> None:
    bad = CAMPAIGN.model_copy(
        update={"template": "Hi {{ nickname }} {{ offer.code }", "subject": "{{ shoe_size }}"}
    )
    problems = check_templates(bad)
    keys = sorted((p.key or "", p.message.split(" ")[0]) for p in problems)
    assert keys == [("subject", "unknown"), ("template", "template")]
    assert render("{{ name }}", {"name": "Li"}, CAMPAIGN) == "Li"
    with pytest.raises(Exception, match="undefined"):
        render("{{ name }}", {}, CAMPAIGN)
