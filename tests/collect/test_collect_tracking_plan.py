"""Tracking plans on the live collector: allowed events, property schemas, the three modes."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from closedloop.collect.tracking_plan import Mode, PlanDef, TrackingPlan, load_tracking_plans
from closedloop.core.errors import DefinitionError
from tests.collect.conftest import POS, WEB, LiveCollector

PLAN = {
    "events": {
        "Order Completed": {
            "properties": {
                "type": "object",
                "required": ["order_id", "revenue"],
                "properties": {"revenue": {"type": "number", "minimum": 0}},
            }
        },
        "Product Viewed": {},
    },
    "identify": {"traits": {"type": "object", "properties": {"email": {"type": "string"}}}},
}


def plan(mode: str, source: str) -> TrackingPlan:
    return TrackingPlan(source, PlanDef.model_validate({**PLAN, "mode": mode}))


def mid() -> str:
    return uuid.uuid4().hex


def test_plan_verdicts() -> None:
    p = plan("quarantine", "web")
    assert p.mode is Mode.QUARANTINE
    ok = {
        "type": "track",
        "event": "Order Completed",
        "properties": {"order_id": "o", "revenue": 3},
    }
    assert p.violation(ok) is None
    assert p.violation({"type": "track", "event": "Product Viewed", "properties": {"x": 1}}) is None
    code, why = p.violation({"type": "track", "event": "Signed Up"}) or ("", "")
    assert code == "forbidden_event" and "Signed Up" in why
    bad = {
        "type": "track",
        "event": "Order Completed",
        "properties": {"order_id": "o", "revenue": -1},
    }
    code, why = p.violation(bad) or ("", "")
    assert code == "tracking_plan" and "revenue" in why
    assert p.violation({"type": "identify", "traits": {"email": 5}}) is not None
    assert p.violation({"type": "page", "name": "anything"}) is None


def test_modes_on_the_live_collector(tmp_path: Path) -> None:
    live = LiveCollector(
        tmp_path / "spool",
        tmp_path / "w.duckdb",
        plans={"web": plan("quarantine", "web"), "pos": plan("block", "pos")},
    )
    try:
        good = {"type": "track", "event": "Product Viewed", "userId": "u", "messageId": mid()}
        stray = {"type": "track", "event": "Signed Up", "userId": "u", "messageId": mid()}
        neg = {
            "type": "track",
            "event": "Order Completed",
            "userId": "u",
            "messageId": mid(),
            "properties": {"order_id": "o1", "revenue": -5},
        }
        for key, name in ((WEB.write_key, "web"), (POS.write_key, "pos")):
            batch = [
                dict(good, messageId=mid()),
                dict(stray, messageId=mid()),
                dict(neg, messageId=mid()),
            ]
            a = live.post("/v1/batch", {"batch": batch, "writeKey": key})
            assert a.status == 200
            assert (a.json["accepted"], a.json["failed"]) == (1, 2), name
            assert [e["reason_code"] for e in a.json["errors"]] == [
                "forbidden_event",
                "tracking_plan",
            ]
        live.load()
        failed = live.rows("failed_events", order_by="location")
        web = [f for f in failed if f["source"] == "web"]
        pos = [f for f in failed if f["source"] == "pos"]
        assert all("Order Completed" in f["payload"] or "Signed Up" in f["payload"] for f in web)
        # Both modes keep the message whole, for replay.
        assert all("Order Completed" in f["payload"] or "Signed Up" in f["payload"] for f in pos)
        assert all(f["message_id"] for f in pos) and len(pos) == 2
        # What the sender of one message hears: held (200) in quarantine, refused in block.
        one = dict(stray, messageId=mid())
        held = live.post("/v1/track", {**one, "writeKey": WEB.write_key})
        assert held.status == 200 and held.json["quarantined"] == 1
        assert (held.json["accepted"], held.json["failed"]) == (0, 1)
        refused = live.post("/v1/track", {**one, "writeKey": POS.write_key})
        assert refused.status == 400 and refused.json["reason_code"] == "forbidden_event"
        assert "quarantined" not in refused.json
        assert len(live.rows("events")) == 2
    finally:
        live.stop()


def test_allow_mode_accepts_violations(tmp_path: Path) -> None:
    live = LiveCollector(tmp_path / "s", tmp_path / "w.duckdb", plans={"web": plan("allow", "web")})
    try:
        stray = {"type": "track", "event": "Signed Up", "userId": "u", "writeKey": WEB.write_key}
        assert live.post("/v1/track", stray).json["accepted"] == 1
    finally:
        live.stop()


def test_loading_plans_reports_every_problem(tmp_path: Path) -> None:
    folder = tmp_path / "tracking_plans"
    folder.mkdir()
    (folder / "web.yaml").write_text("mode: quarantine\nevents:\n  Order Completed: {}\n")
    assert set(load_tracking_plans(tmp_path, {"web", "pos"})) == {"web"}
    (folder / "nosuch.yaml").write_text("mode: allow\n")
    (folder / "pos.yaml").write_text("mode: sometimes\n")
    with pytest.raises(DefinitionError) as e:
        load_tracking_plans(tmp_path, {"web", "pos"})
    text = str(e.value.problems)
    assert "nosuch.yaml" in text and "pos.yaml" in text
    (folder / "nosuch.yaml").unlink()
    (folder / "pos.yaml").write_text("events:\n  E: {properties: {type: nonsense}}\n")
    with pytest.raises(DefinitionError, match="JSON Schema"):
        load_tracking_plans(tmp_path, {"web", "pos"})


@pytest.mark.parametrize("mode", ["quarantine", "block"])
def test_replay_applies_the_plan_as_it_is_now(tmp_path: Path, mode: str) -> None:
    """Held or blocked for an unplanned event; replay refuses until the plan lists it."""
    from closedloop.collect.replay import replay_failed
    from closedloop.core.engine import Engine

    live = LiveCollector(
        tmp_path / "spool", tmp_path / "w.duckdb", plans={"web": plan(mode, "web")}
    )
    try:
        stray = {"type": "track", "event": "Signed Up", "userId": "u", "messageId": mid()}
        a = live.post("/v1/batch", {"batch": [stray], "writeKey": WEB.write_key})
        assert a.json["errors"][0]["reason_code"] == "forbidden_event"
        live.load()
    finally:
        live.stop()
    strict = {"web": plan(mode, "web")}
    fixed_def = PlanDef.model_validate({**PLAN, "mode": mode})
    fixed_def = PlanDef.model_validate(
        {**fixed_def.model_dump(), "events": {**PLAN["events"], "Signed Up": {}}}
    )
    with Engine(f"duckdb:///{tmp_path / 'w.duckdb'}") as engine:
        r = replay_failed(engine, [WEB, POS], plans=strict)
        assert (r.rows, r.resolved, r.still_failing) == (1, 0, 1)
        r = replay_failed(engine, [WEB, POS], plans={"web": TrackingPlan("web", fixed_def)})
        assert (r.resolved, r.accepted) == (1, 1)
        assert engine.count("failed_events") == 0
        ids = engine.to_arrow(engine.table("events").select("message_id")).to_pylist()
        assert ids == [{"message_id": stray["messageId"]}]


def test_validate_checks_tracking_plans_with_file_line_and_key(tmp_path: Path) -> None:
    """`closedloop validate` reports a bad JSON Schema at its file, line and key."""
    from typer.testing import CliRunner

    from closedloop.cli.main import app

    runner = CliRunner()
    project = tmp_path / "brand"
    assert runner.invoke(app, ["init", str(project)]).exit_code == 0
    assert runner.invoke(app, ["validate", "-p", str(project)]).exit_code == 0
    plans = project / "tracking_plans"
    plans.mkdir()
    (plans / "web.yaml").write_text(
        "mode: block\n"
        "events:\n"
        "  Product Viewed: {}\n"
        "  Order Completed:\n"
        "    properties:\n"
        "      type: nonsense\n"
        "identify:\n"
        "  traits: {type: object, required: 7}\n",
        encoding="utf-8",
    )
    (plans / "pos.yaml").write_text("mode: sometimes\n", encoding="utf-8")
    r = runner.invoke(app, ["validate", "-p", str(project)])
    assert r.exit_code != 0
    out = " ".join(r.output.split())
    assert (
        "tracking_plans/web.yaml:5 [events.Order Completed.properties]: not a valid JSON Schema"
        in out
    )
    assert "tracking_plans/web.yaml:8 [identify.traits]: not a valid JSON Schema" in out
    assert "tracking_plans/pos.yaml:1 [mode]" in out
    (plans / "web.yaml").write_text("mode: block\nevents:\n  Product Viewed: {}\n")
    (plans / "pos.yaml").unlink()
    r = runner.invoke(app, ["validate", "-p", str(project)])
    assert r.exit_code == 0, r.output


_EVENTS = ["Order Completed", "Product Viewed", "Signed Up", ""]
_REVENUE = st.one_of(
    st.none(),
    st.integers(-5, 5),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=3),
    st.booleans(),
)


@st.composite
def _messages(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["track", "track", "identify", "page"]))
    m: dict[str, Any] = {"type": kind, "userId": "u", "messageId": draw(st.sampled_from("abcdefg"))}
    if kind == "track":
        m["event"] = draw(st.sampled_from(_EVENTS))
        props = {"revenue": draw(_REVENUE)}
        if draw(st.booleans()):
            props["order_id"] = draw(st.one_of(st.text(max_size=3), st.integers()))
        m["properties"] = props
    elif kind == "identify":
        m["traits"] = {"email": draw(st.one_of(st.text(max_size=5), st.integers(), st.none()))}
    return m


@given(
    mode=st.sampled_from(list(Mode)),
    batch=st.lists(_messages(), min_size=1, max_size=12),
    single=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_plan_modes_keep_the_accounting_and_every_payload(
    mode: Mode, batch: list[dict[str, Any]], single: bool
) -> None:
    """Whatever arrives, in any mode: received = accepted + failed + duplicate; a plan
    violation is accepted only in allow mode; every failure keeps its message for replay;
    one message is answered 200 exactly when it was accepted or quarantined."""
    from closedloop.collect.ingest import Collector
    from closedloop.collect.spool import decode_body

    collector = Collector(
        [WEB], {"web": TrackingPlan("web", PlanDef.model_validate({**PLAN, "mode": mode}))}
    )
    now = datetime(2024, 3, 1, tzinfo=UTC)
    if single:
        body, route = {**batch[0], "writeKey": WEB.write_key}, "track"
        batch = [{**batch[0], "type": "track"}]
    else:
        body, route = {"batch": batch, "writeKey": WEB.write_key}, "batch"
    out = collector.prepare(route, json.dumps(body).encode(), {}, None, "127.0.0.1", now)
    a = out.body
    assert a["received"] == a["accepted"] + a["failed"] + a["duplicate"] == len(batch)
    assert out.record is not None
    header, lines = decode_body(out.record[8:])
    assert len(lines) == a["accepted"] and len(header["f"]) == a["failed"]
    codes = [f[0] for f in header["f"]]
    if mode is Mode.ALLOW:
        assert not {"forbidden_event", "tracking_plan"} & set(codes)
    for code, _reason, _where, message_id, payload in header["f"]:
        kept = json.loads(payload)  # whole, in every mode: replayable
        assert kept["messageId"] == message_id or code not in ("forbidden_event", "tracking_plan")
    held = sum(code in ("forbidden_event", "tracking_plan") for code in codes)
    assert a.get("quarantined", 0) == (held if mode is Mode.QUARANTINE else 0)
    if single:
        assert (out.status == 200) == (a["accepted"] == 1 or a.get("quarantined") == 1)
