"""Message outcomes and provider reports come back as events through collect, once each."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from closedloop.activate.campaign import run_campaign
from closedloop.activate.channels import deliver
from closedloop.activate.channels.handoff import HandoffChannel
from closedloop.activate.feedback import FEEDBACK_SOURCE, ingest_feedback, load_feedback_file
from closedloop.cli.main import app
from closedloop.core.clock import Clock
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from tests.activate.test_assignment_cli import built  # noqa: F401  (a built demo project)
from tests.activate.test_channels import campaign, events, people  # noqa: F401

NOW = datetime(2026, 11, 20, 4, 0, tzinfo=UTC)
LATER = NOW + timedelta(hours=3)
runner = CliRunner()


def sent_messages(engine: Engine, tmp_path: Path) -> list[dict[str, Any]]:
    run_campaign(
        engine, campaign("email"), outbox_dir=tmp_path / "o", occasion="o", clock=Clock(NOW)
    )
    deliver(engine, tmp_path / "o", HandoffChannel("email", tmp_path / "h"), clock=Clock(NOW))
    d = engine.table("deliveries")
    return d.filter(d.status == "sent").order_by("customer_id").to_pyarrow().to_pylist()


def test_provider_reports_become_events_once(people: Engine, tmp_path: Path) -> None:  # noqa: F811
    sent = sent_messages(people, tmp_path)
    first, second = sent[0], sent[1]
    reports = [
        {"message_id": first["message_id"], "event": "delivered", "timestamp": LATER.isoformat()},
        {"message_id": first["message_id"], "event": "opened", "id": "ev-1", "timestamp": "x"},
        {
            "message_id": first["message_id"],
            "event": "clicked",
            "id": "ev-2",
            "url": "https://shop.cn/p/1",
        },
        {"message_id": second["message_id"], "event": "reply", "id": "ev-3", "text": "TD"},
        {"message_id": "msg_nope", "event": "opened"},
        {"message_id": second["message_id"], "event": "forwarded"},
    ]
    r = ingest_feedback(people, reports, clock=Clock(LATER))
    assert (r.received, r.accepted, r.duplicate) == (6, 4, 0)
    assert len(r.unknown) == 2
    assert "feedback:5" in r.unknown[0] and "msg_nope" in r.unknown[0]
    assert "feedback:6" in r.unknown[1] and "forwarded" in r.unknown[1]
    opened = events(people, "Message Opened")
    assert len(opened) == 1
    p = opened[0]["properties"]
    assert p["message_id"] == first["message_id"] and p["campaign"] == "c_email"
    assert p["channel"] == "email" and p["variant"] in ("a", "b")
    assert p["delivery_id"] == first["delivery_id"] and p["customer_id"] == first["customer_id"]
    assert opened[0]["source"] == FEEDBACK_SOURCE.name
    clicked = events(people, "Message Clicked")[0]
    assert clicked["properties"]["url"] == "https://shop.cn/p/1"
    assert events(people, "Message Replied")[0]["properties"]["text"] == "TD"
    delivered = events(people, "Message Delivered")[0]
    assert delivered["timestamp"] == LATER
    # Replaying the same reports (a provider retrying its callback) stores nothing new.
    again = ingest_feedback(people, reports, clock=Clock(LATER))
    assert (again.accepted, again.duplicate) == (0, 4)
    assert len(events(people, "Message Opened")) == 1
    loads = people.table("loads").to_pyarrow().to_pylist()
    assert {x["source"] for x in loads} == {FEEDBACK_SOURCE.name}


def test_events_name_the_person_as_identity_resolution_expects(
    people: Engine,  # noqa: F811
    tmp_path: Path,
) -> None:
    sent = sent_messages(people, tmp_path)
    ingest_feedback(people, [{"message_id": m["message_id"], "event": "opened"} for m in sent])
    by_customer = {e["properties"]["customer_id"]: e for e in events(people, "Message Opened")}
    assert len(by_customer) == len(sent)
    for cid, e in by_customer.items():
        n = int(cid[1:])
        if n % 2:  # has a member id: the user id other sources use
            assert e["user_id"] == f"m{n}"
        else:  # none: the e-mail alone, beside an anonymous id of this message only
            traits = json.loads(e["traits"] or json.loads(e["context"]).get("traits") or "{}")
            assert traits == {"email": f"p{n}@x.cn"}  # never two ids that could be joined
            assert e["anonymous_id"] == f"closedloop:{e['properties']['message_id']}"
    # The delivery run's own outcomes are there too: one Message Sent per message.
    assert len(events(people, "Message Sent")) == len(sent)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    picks=st.lists(
        st.tuples(st.integers(0, 50), st.sampled_from(["opened", "clicked", "replied", "zap"])),
        max_size=30,
    )
)
def test_any_report_stream_loads_each_known_outcome_exactly_once(
    people: Engine,  # noqa: F811
    tmp_path: Path,
    picks: list[tuple[int, str]],
) -> None:
    d = people.table("deliveries")
    sent = d.filter(d.status == "sent").to_pyarrow().to_pylist()
    if not sent:
        sent = sent_messages(people, tmp_path)
    reports = [
        {
            "message_id": sent[i]["message_id"] if i < len(sent) else f"x{i}",
            "event": ev,
            "id": f"{i}{ev}",
        }
        for i, ev in picks
    ]
    before = people.count("events")
    r = ingest_feedback(people, reports + reports)
    valid = {(x["message_id"], x["event"]) for x in reports if x["event"] != "zap"} - {
        (f"x{i}", ev) for i, ev in picks
    }
    assert r.received == 2 * len(reports)
    assert r.accepted + r.duplicate + len(r.unknown) == 2 * len(reports)
    assert people.count("events") - before == r.accepted <= len(valid)


@pytest.mark.slow  # generates a brand and builds it (~20 s)
def test_cli_deliver_feedback_and_tasks(built: Path, tmp_path: Path) -> None:  # noqa: F811
    args = ["-p", str(built), "--as-of", "2026-11-20T10:00:00+00:00"]
    r = runner.invoke(app, ["campaign", "run", "winback", *args, "--occasion", "fb"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["campaign", "deliver", "email", *args])
    assert r.exit_code == 0, r.output
    assert re.search(r"email: [1-9][\d,]* delivered", r.output), r.output
    outbox = load_project(built).path("outbox")
    mids = [
        json.loads(line)["message_id"]
        for f in outbox.glob("winback/fb*.jsonl")
        for line in f.read_text().splitlines()
    ]
    f = tmp_path / "reports.jsonl"
    f.write_text(
        "\n".join(json.dumps({"message_id": m, "event": "opened", "id": m}) for m in mids)
        + "\nnot json\n"
    )
    r = runner.invoke(app, ["campaign", "feedback", str(f), "-p", str(built)])
    assert r.exit_code == 0, r.output
    flat = r.output.replace("\n", "")
    assert f"{len(mids):,} new events" in flat and f"reports.jsonl:{len(mids) + 1}" in flat
    r = runner.invoke(app, ["campaign", "feedback", str(f), "-p", str(built)])
    assert "0 new events" in r.output and f"{len(mids):,} already loaded" in r.output
    r = runner.invoke(app, ["campaign", "deliver", "fax", *args])
    assert r.exit_code != 0 and "unknown channel 'fax'" in r.output
    r = runner.invoke(app, ["campaign", "tasks", str(tmp_path / "t.csv"), "-p", str(built)])
    assert r.exit_code == 0 and "0 open tasks" in r.output
    with Engine(load_project(built).engine_url) as e:
        t = e.table("events")
        assert t.filter(t.event == "Message Opened").count().execute() == len(mids)


def test_load_feedback_file_reports_bad_lines_by_number(people: Engine, tmp_path: Path) -> None:  # noqa: F811
    sent = sent_messages(people, tmp_path)
    f = tmp_path / "r.jsonl"
    f.write_text(
        json.dumps({"message_id": sent[0]["message_id"], "event": "opened"})
        + "\n\n[1]\n"
        + json.dumps({"message_id": "nope", "event": "opened"})
        + "\n"
    )
    r = load_feedback_file(people, f)
    assert r.accepted == 1 and r.received == 3
    assert r.unknown == [f"{f}:3: expected a JSON object", f"{f}:4: no message 'nope' was sent"]
