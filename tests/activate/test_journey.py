"""Journeys end to end on a real DuckDB warehouse: triggers, steps, no-response, validation."""

from __future__ import annotations

import json
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from closedloop.activate.journeys import check_journeys
from closedloop.activate.worker import tick
from closedloop.core.clock import Clock
from closedloop.core.definitions import Project, SegmentDef, load_project
from closedloop.core.engine import Engine
from closedloop.core.errors import DefinitionError
from closedloop.segments.audience import Fields, evaluate_segment
from tests.conftest import add_events
from tests.segments.test_audience import set_profiles

T0 = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai: outside quiet hours
EVERYONE = SegmentDef.model_validate(
    {"name": "everyone", "where": {"trait": "customer_id", "op": "not_null"}}
)

CONFIG = """\
name: test
engine: "duckdb://"
timezone: Asia/Shanghai
sources:
  - {name: web, channel: web, write_key: wk_web_0123456789}
"""
IDENTITY = """\
types:
  - {name: member_id, priority: 100, strong: true, paths: [user_id]}
"""
SEGMENT = """\
name: everyone
where: {trait: customer_id, op: not_null}
"""


def make_project(root: Path, campaigns: dict[str, str], policy: str = "") -> Project:
    root.mkdir(parents=True, exist_ok=True)
    (root / "closedloop.yaml").write_text(CONFIG + policy)
    (root / "identity.yaml").write_text(IDENTITY)
    (root / "segments").mkdir(exist_ok=True)
    (root / "segments" / "everyone.yaml").write_text(SEGMENT)
    (root / "campaigns").mkdir(exist_ok=True)
    for name, text in campaigns.items():
        (root / "campaigns" / f"{name}.yaml").write_text(textwrap.dedent(text))
    return load_project(root)


def people(engine: Engine, n: int, **extra: Any) -> list[str]:
    ids = [f"c{i:03d}" for i in range(n)]
    rows: list[dict[str, object]] = [
        {
            "customer_id": c,
            "name": f"N{i}",
            "email": f"p{i}@x.cn",
            "consent_marketing": True,
            "timezone": "Asia/Shanghai",
            **{k: (v(i) if callable(v) else v) for k, v in extra.items()},
        }
        for i, c in enumerate(ids)
    ]
    set_profiles(engine, rows)
    evaluate_segment(engine, EVERYONE, Fields(), Clock(T0 - timedelta(days=30)))
    # userId == member id == customer id, as identity would have resolved it
    engine.append(
        "identity_map",
        pa.Table.from_pylist(
            [
                {
                    "id_type": "member_id",
                    "id_value": c,
                    "customer_id": c,
                    "quarantined": False,
                    "first_seen": T0 - timedelta(days=60),
                    "last_seen": T0 - timedelta(days=1),
                    "messages": 1,
                }
                for c in ids
            ]
        ),
    )
    return ids


def outbox_lines(root: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(root.rglob("*.jsonl")):
        out += [json.loads(x) for x in f.read_text().splitlines()]
    return out


CART = """\
name: cart
audience: everyone
holdout: 0.01
subject: "Your cart"
template: "default"
trigger:
  event: Product Added
  where: [{property: category, op: eq, value: tea}]
steps:
  - id: wait_order
    wait_for: {event: Order Completed, timeout: 2h}
    on_event: done
    on_timeout: remind
  - id: remind
    send: {template: "{{ name }}, your tea is waiting"}
  - id: done
    exit: true
"""


def test_cart_abandonment_waits_then_reminds_only_those_who_did_not_buy(
    engine: Engine, tmp_path: Path
) -> None:
    project = make_project(tmp_path / "p", {"cart": CART})
    ids = people(engine, 6)
    add_events(
        engine,
        [
            {
                "message_id": f"add{i}",
                "user_id": c,
                "event": "Product Added",
                "timestamp": T0,
                "properties": {"category": "tea" if i < 5 else "shoes"},
            }
            for i, c in enumerate(ids)
        ]
        + [
            {
                "message_id": "buy1",
                "user_id": ids[1],
                "event": "Order Completed",
                "timestamp": T0 + timedelta(minutes=30),
            }
        ],
    )
    out = tmp_path / "outbox"
    first = tick(engine, project, T0 + timedelta(minutes=1), outbox_dir=out)
    assert first.entered == 5  # the shoes shopper did not match the filter
    assert first.sent == 0 and first.waiting == 5
    mid = tick(engine, project, T0 + timedelta(hours=1), outbox_dir=out)
    assert mid.finished == {"done": 1} and mid.sent == 0  # c001 bought: journey over
    late = tick(engine, project, T0 + timedelta(hours=2, minutes=1), outbox_dir=out)
    lines = outbox_lines(out)
    assert late.sent + late.held_out == 4
    assert {x["customer_id"] for x in lines} <= {ids[0], ids[2], ids[3], ids[4]}
    assert all(x["body"].endswith("your tea is waiting") for x in lines)
    # Ticking again sends nothing and enters nobody again.
    again = tick(engine, project, T0 + timedelta(hours=3), outbox_dir=out)
    assert (again.entered, again.sent) == (0, 0)
    assert len(outbox_lines(out)) == len(lines)


NUDGES = """\
name: nudges
audience: everyone
holdout: 0.01
template: "first"
trigger: {segment_entry: everyone}
entry: {rule: once}
policy:
  no_response: {within_hours: 24}
steps:
  - {id: one, send: {template: "one"}}
  - {id: pause, wait: 2d}
  - {id: two, send: {template: "two"}}
  - {id: pause2, wait: 2d}
  - {id: three, send: {template: "three"}}
"""


def test_no_response_stops_the_sequence(engine: Engine, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", {"nudges": NUDGES})
    ids = people(engine, 3)
    # Everyone entered the segment "now": re-evaluate as of T0 so the entry is in the window.
    engine.drop("segment_membership")
    evaluate_segment(engine, EVERYONE, Fields(), Clock(T0))
    out = tmp_path / "outbox"
    tick(engine, project, T0 + timedelta(minutes=5), outbox_dir=out)
    sent = {x["customer_id"]: x for x in outbox_lines(out)}
    assert set(sent) <= set(ids) and len(sent) >= 2
    responder, silent = sorted(sent)[:2]
    add_events(
        engine,
        [
            {
                "message_id": "open1",
                "user_id": responder,
                "event": "Email Opened",
                "timestamp": T0 + timedelta(hours=3),
                "properties": {"message_id": sent[responder]["message_id"]},
            },
            {  # an open of some other message does not count
                "message_id": "open2",
                "user_id": silent,
                "event": "Email Opened",
                "timestamp": T0 + timedelta(hours=3),
                "properties": {"message_id": "msg_other"},
            },
        ],
    )
    tick(engine, project, T0 + timedelta(days=2, hours=1), outbox_dir=out)
    bodies = [(x["customer_id"], x["body"]) for x in outbox_lines(out)]
    assert (responder, "two") in bodies
    assert (silent, "two") not in bodies
    s = engine.table("journey_state").to_pandas()
    last = s.sort_values("seq").groupby("customer_id").last()
    assert last.loc[silent, "status"] == "stopped" and last.loc[silent, "reason"] == "no_response"
    # The responder did not answer "two": the sequence stops before "three".
    tick(engine, project, T0 + timedelta(days=5), outbox_dir=out)
    bodies = [(x["customer_id"], x["body"]) for x in outbox_lines(out)]
    assert (responder, "three") not in bodies
    # once: re-entering the segment later does not start the journey again
    assert tick(engine, project, T0 + timedelta(days=6), outbox_dir=out).entered == 0


BRANCHY = """\
name: vip
audience: everyone
holdout: 0.01
template: "x"
trigger: {schedule: {every: week, weekday: 4, at: "10:00"}}
steps:
  - id: split
    branch: {when: {trait: tier, op: eq, value: gold}, then: gold, else: ab}
  - id: ab
    branch:
      variants: [{name: a, next: send_a}, {name: b, next: send_b}]
  - {id: gold, send: {template: "gold"}, next: end}
  - {id: send_a, send: {template: "a"}, next: end}
  - {id: send_b, send: {template: "b"}, next: end}
  - {id: end, exit: true}
"""


def test_branches_on_trait_and_stable_variants(engine: Engine, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", {"vip": BRANCHY})
    people(engine, 40, tier=lambda i: "gold" if i < 10 else "silver")
    out = tmp_path / "outbox"
    # 2026-11-20 is a Friday (weekday 4): fires at 10:00 Shanghai = 02:00 UTC.
    r = tick(engine, project, T0 + timedelta(minutes=1), outbox_dir=out)
    assert r.entered == 40
    body = {x["customer_id"]: x["body"] for x in outbox_lines(out)}
    assert all(body[c] == "gold" for c in body if int(c[1:]) < 10)
    rest = [body[c] for c in body if int(c[1:]) >= 10]
    assert set(rest) == {"a", "b"}
    # Next Friday: a new occasion, the same variant per person.
    tick(engine, project, T0 + timedelta(days=7, minutes=1), outbox_dir=out)
    week2 = [x for x in outbox_lines(out) if x["occasion"].startswith("2026-11-27")]
    assert week2 and all(body.get(x["customer_id"], x["body"]) == x["body"] for x in week2)


BIRTHDAY = """\
name: birthday
audience: everyone
holdout: 0.01
template: "Happy birthday {{ name }}"
trigger: {date_trait: birthday, offset_days: -3, at: "10:00"}
"""


def test_birthday_three_days_before_in_the_persons_zone(engine: Engine, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", {"birthday": BIRTHDAY})
    from datetime import date

    people(engine, 4, birthday=lambda i: date(1990, 11, 23 + i))
    out = tmp_path / "outbox"
    # 2026-11-20 10:00 Shanghai = three days before 23 Nov: only c000 is due.
    r = tick(engine, project, T0 + timedelta(minutes=1), outbox_dir=out)
    assert r.entered == 1
    r = tick(engine, project, T0 + timedelta(days=1, minutes=1), outbox_dir=out)
    assert r.entered == 1
    assert {x["occasion"] for x in outbox_lines(out)} <= {"2026+send"}


def test_bad_journeys_fail_validation_with_file_line_and_key(tmp_path: Path) -> None:
    bad_target = CART.replace("on_timeout: remind", "on_timeout: remindd")
    with pytest.raises(DefinitionError) as e:
        make_project(tmp_path / "a", {"cart": bad_target})
    assert "campaigns/cart.yaml:13 [steps.0.on_timeout]: unknown step 'remindd'" in str(e.value)
    dupe = CART + "  - id: done\n    exit: true\n"
    with pytest.raises(DefinitionError, match=r"cart.yaml:9 \[steps\]: step ids must be unique"):
        make_project(tmp_path / "a2", {"cart": dupe})
    no_timeout = CART.replace(", timeout: 2h", "")
    with pytest.raises(DefinitionError) as e:
        make_project(tmp_path / "b", {"cart": no_timeout})
    assert "campaigns/cart.yaml:11 [steps.0.wait_for.timeout]" in str(e.value)
    assert "needs a `timeout`" in str(e.value)
    project = make_project(
        tmp_path / "c",
        {
            "birthday": BIRTHDAY.replace("birthday, offset", "city, offset"),
            "vip": BRANCHY.replace("trait: tier", "trait: teir"),
            "bday2": BIRTHDAY.replace("name: birthday", "name: bday2").replace(
                "date_trait: birthday", "date_trait: birthdya"
            ),
        },
    )
    problems = [str(p) for p in check_journeys(project)]
    assert (
        "campaigns/birthday.yaml:5 [trigger.date_trait]: trait 'city' is not a date"
        in "\n".join(problems)
    )
    assert any(
        p.startswith("campaigns/vip.yaml:8 [steps.0.branch.when.trait]: unknown trait 'teir'")
        and "'tier'" in p
        for p in problems
    )
    assert any(
        p.startswith("campaigns/bday2.yaml:5 [trigger.date_trait]: unknown") for p in problems
    )


WELCOME = """\
name: welcome
audience: everyone
holdout: 0.01
template: "hello {{ name }}"
trigger: {segment_entry: everyone}
entry: {rule: once}
steps:
  - {id: hello, send: {template: "hello {{ name }}"}}
"""


def test_journeys_never_message_the_global_control(engine: Engine, tmp_path: Path) -> None:
    from closedloop.activate.assignment import global_control_salt, in_global_control

    project = make_project(
        tmp_path / "p", {"welcome": WELCOME}, policy="global_control: {share: 0.2}\n"
    )
    ids = people(engine, 60)
    control = {
        c
        for c, flag in zip(
            ids, in_global_control(ids, global_control_salt(engine), 0.2), strict=True
        )
        if flag
    }
    assert 3 <= len(control) <= 25  # the hash drew a real control group from 60 people
    engine.drop("segment_membership")  # everyone enters the segment "now"
    evaluate_segment(engine, EVERYONE, Fields(), Clock(T0))
    out = tmp_path / "outbox"
    tick(engine, project, T0 + timedelta(minutes=1), outbox_dir=out)
    messaged = {x["customer_id"] for x in outbox_lines(out)}
    assert messaged, "the journey sent nothing at all"
    assert not messaged & control


def test_a_journey_that_sends_records_the_use_of_its_audiences_tags(
    engine: Engine, tmp_path: Path
) -> None:
    root = tmp_path / "p"
    (root / "tags").mkdir(parents=True)
    (root / "tags" / "vip.yaml").write_text(
        "name: vip\nrules:\n  - {value: 'yes', when: {trait: name, op: not_null}}\n"
    )
    (root / "segments").mkdir()
    (root / "segments" / "vips.yaml").write_text(
        "name: vips\nwhere: {trait: vip, op: eq, value: 'yes'}\n"
    )
    project = make_project(root, {"welcome": WELCOME.replace("everyone", "vips")})
    people(engine, 5)
    everyone_as_vips = SegmentDef.model_validate(
        {"name": "vips", "where": {"trait": "customer_id", "op": "not_null"}}
    )
    evaluate_segment(engine, everyone_as_vips, Fields(), Clock(T0))  # all entered "now"
    out = tmp_path / "outbox"
    assert tick(engine, project, T0 + timedelta(minutes=1), outbox_dir=out).sent > 0
    uses = engine.to_arrow(engine.table("tag_uses")).to_pylist()
    assert [(u["tag"], u["used_by"]) for u in uses] == [("vip", "campaign:welcome")]
