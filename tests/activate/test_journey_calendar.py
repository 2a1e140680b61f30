"""Calendar journeys with phases in each person's zone, and priority when caps allow one."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from closedloop.activate.worker import tick
from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.portrait.tables import PROFILES
from closedloop.segments.audience import Fields, evaluate_segment
from tests.activate.test_journey import EVERYONE, make_project, outbox_lines
from tests.conftest import add_events

DOUBLE_11 = """\
name: d11
audience: everyone
holdout: 0.01
template: "x"
trigger:
  calendar: double_11
  at: "20:00"
  phases:
    - {name: pre_heat, offset_days: -11}
    - {name: deposit, offset_days: -10}
    - {name: final_payment, offset_days: 0}
policy:
  no_response: {within_hours: 48}
steps:
  - {id: preheat, send: {template: "pre-heat"}}
  - {id: to_deposit, wait: {until_phase: deposit}}
  - {id: deposit, send: {template: "deposit"}}
  - {id: to_final, wait: {until_phase: final_payment}}
  - {id: final, send: {template: "final"}}
"""


def zoned_people(engine: Engine) -> None:
    zones = ["Asia/Shanghai"] * 4 + ["America/New_York"] * 2
    rows = [
        {c: None for c in PROFILES.columns}
        | {
            "customer_id": f"c{i}",
            "email": f"p{i}@x.cn",
            "consent_marketing": True,
            "timezone": tz,
        }
        for i, tz in enumerate(zones)
    ]
    engine.replace("profiles", pa.Table.from_pylist(rows))
    evaluate_segment(engine, EVERYONE, Fields(), Clock(datetime(2026, 10, 1, tzinfo=UTC)))
    engine.append(
        "event_customers",
        pa.table(
            {
                "message_id": [f"open{i}" for i in range(6)],
                "customer_id": [f"c{i}" for i in range(6)],
            }
        ),
    )


def test_double_11_phases_per_zone_and_no_response(engine: Engine, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", {"d11": DOUBLE_11})
    zoned_people(engine)
    out = tmp_path / "outbox"
    # 20:01 on 31 October in Shanghai: pre-heat for Shanghai only (New York is 12 h behind).
    r = tick(engine, project, datetime(2026, 10, 31, 12, 1, tzinfo=UTC), outbox_dir=out)
    assert r.entered == 4
    r = tick(engine, project, datetime(2026, 11, 1, 0, 1, tzinfo=UTC), outbox_dir=out)
    assert r.entered == 2
    pre = {x["customer_id"]: x for x in outbox_lines(out) if x["body"] == "pre-heat"}
    assert set(pre) <= {f"c{i}" for i in range(6)} and len(pre) >= 5
    # c0 (Shanghai) and c4 (New York) open the pre-heat; the others stay silent.
    add_events(
        engine,
        [
            {
                "message_id": f"open{i}",
                "user_id": None,
                "event": "Email Opened",
                "timestamp": datetime(2026, 11, 1, 1, tzinfo=UTC),
                "properties": {"message_id": pre[f"c{i}"]["message_id"]},
            }
            for i in (0, 4)
            if f"c{i}" in pre
        ],
    )
    # Deposit phase in Shanghai (20:00 on 1 Nov = 12:00 UTC): c0 gets it, silent ones wait.
    tick(engine, project, datetime(2026, 11, 1, 12, 1, tzinfo=UTC), outbox_dir=out)
    deposit = {x["customer_id"] for x in outbox_lines(out) if x["body"] == "deposit"}
    assert deposit == ({"c0"} & set(pre))
    # Past the 48 h window: the silent stop for this Double 11; New York's responder goes on.
    tick(engine, project, datetime(2026, 11, 3, 1, tzinfo=UTC), outbox_dir=out)
    deposit = {x["customer_id"] for x in outbox_lines(out) if x["body"] == "deposit"}
    assert deposit == ({"c0", "c4"} & set(pre))
    s = engine.table("journey_state").to_pandas().sort_values("seq")
    last = s.groupby("customer_id").last()
    silent = sorted(set(pre) - {"c0", "c4"})
    assert all(last.loc[c, "status"] == "stopped" for c in silent)
    assert all(last.loc[c, "reason"] == "no_response" for c in silent)
    # The next occasion (2027) starts afresh for everyone.
    r = tick(engine, project, datetime(2027, 10, 31, 12, 1, tzinfo=UTC), outbox_dir=out)
    assert r.entered == 4


DAILY = """\
name: {name}
audience: everyone
holdout: 0.01
priority: {priority}
template: "{name}"
trigger: {{schedule: {{every: day, at: "10:00"}}}}
"""


def test_priority_decides_who_speaks_when_the_cap_allows_one(
    engine: Engine, tmp_path: Path
) -> None:
    project = make_project(
        tmp_path / "p",
        {
            "low": DAILY.format(name="low", priority=0),
            "high": DAILY.format(name="high", priority=10),
        },
        policy="contact_policy:\n  caps: [{max: 1, days: 1}]\n",
    )
    zoned_people(engine)
    out = tmp_path / "outbox"
    tick(engine, project, datetime(2026, 11, 20, 2, 1, tzinfo=UTC), outbox_dir=out)
    bodies = [x["body"] for x in outbox_lines(out)]
    assert bodies and set(bodies) == {"high"}
    d = engine.table("deliveries").to_pandas()
    low = d[d.campaign == "low"]
    assert set(low[low.customer_id.isin(["c0", "c1", "c2", "c3"])].status) <= {"suppressed"}
    assert (low.policy_verdict == "frequency_cap").any()
