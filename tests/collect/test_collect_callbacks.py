"""Provider callbacks on a real collector: auth, forms, typed failures, exactly once.

A real uvicorn server on a loopback port spools to a real folder; the real spool loader
moves the records into a DuckDB file, where the tests look.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop.activate.channels.webhook import sign as webhook_sign
from closedloop.collect.callbacks import CallbackIntake, callback_message, signature_ok
from closedloop.collect.drain import SpoolLoader
from closedloop.collect.ingest import Collector
from closedloop.core.definitions import Source
from closedloop.core.engine import Engine
from closedloop.core.feedback_events import callback_message_id
from closedloop.core.signed_post import sign as core_sign
from tests.collect.conftest import Answer, free_port, request, rows

SECRET = b"provider-secret-for-tests"
WEB = Source(name="web", channel="web", write_key="wk_test_web_0001")
SMS = Source(
    name="sms_gateway",
    channel="sms",
    write_key="wk_test_sms_0001",
    callback_secret_env="SMS_CALLBACK_SECRET",  # noqa: S106 - a variable's name
)
MAIL = Source(name="mail_service", channel="email", write_key="wk_test_mail_0001")
SOURCES = [WEB, SMS, MAIL]


class Server:
    """The collector app with provider sources, on a free loopback port."""

    def __init__(self, base: Path) -> None:
        import uvicorn

        from closedloop.collect.server import create_app

        self.spool = base / "spool"
        self.warehouse = base / "warehouse.duckdb"
        self.url = f"http://127.0.0.1:{free_port()}"
        app = create_app(SOURCES, self.spool, callback_secrets={SMS.name: SECRET})
        port = int(self.url.rsplit(":", 1)[1])
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "no collector"
            time.sleep(0.01)

    def signed(
        self, source: str, body: Any, *, secret: bytes = SECRET, at: int | None = None
    ) -> Answer:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        ts = int(time.time()) if at is None else at
        headers = {
            "X-Closedloop-Timestamp": str(ts),
            "X-Closedloop-Signature": webhook_sign(secret, ts, data),
        }
        return request(f"{self.url}/v1/callbacks/{source}", data, headers=headers)

    def load(self) -> None:
        with Engine(f"duckdb:///{self.warehouse}") as engine:
            SpoolLoader(engine, SOURCES, self.spool).run_once()

    def rows(self, table: str) -> list[dict[str, Any]]:
        with Engine(f"duckdb:///{self.warehouse}") as engine:
            return rows(engine, table) if engine.exists(table) else []

    def events(self, message_id: str | None = None) -> list[dict[str, Any]]:
        out = []
        for e in self.rows("events"):
            e["props"] = json.loads(e["properties"] or "{}")
            if message_id is None or e["props"].get("message_id") == message_id:
                out.append(e)
        return out

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("callbacks"))
    yield s
    s.stop()


def msg_id() -> str:
    return "msg_" + uuid.uuid4().hex[:16]


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


# ---- what a callback becomes -------------------------------------------------------------
def test_webhook_form_signed_as_activate_signs_becomes_a_feedback_event(server: Server) -> None:
    m = msg_id()
    # What closedloop's webhook channel sent, echoed back by the provider with its outcome.
    report = {
        "message_id": m,
        "delivery_id": "d1",
        "campaign": "winback",
        "variant": "a",
        "channel": "sms",
        "customer_id": "c_1",
        "to": "+8613800138001",
        "event": "opened",
        "id": "prov-ev-1",
        "timestamp": "2026-11-20T05:00:00Z",
    }
    a = server.signed("sms_gateway", report)
    assert a.status == 200, a.json
    assert a.json["accepted"] == 1 and a.json["failed"] == 0
    server.load()
    [e] = server.events(m)
    assert e["event"] == "Message Opened" and e["type"] == "track"
    assert e["source"] == "sms_gateway"
    assert e["anonymous_id"] == f"closedloop:{m}"  # identity ties it to the person sent to
    assert e["user_id"] is None
    assert e["timestamp"] == datetime(2026, 11, 20, 5, tzinfo=UTC)
    assert e["message_id"] == callback_message_id(m, "prov-ev-1")  # as `campaign feedback`
    p = e["props"]
    assert (p["campaign"], p["variant"], p["channel"]) == ("winback", "a", "sms")
    assert (p["delivery_id"], p["customer_id"]) == ("d1", "c_1")
    assert p["provider_event_id"] == "prov-ev-1"
    assert "+8613800138001" not in e["properties"]  # the address is not copied into events


def test_generic_form_statuses_and_core_signature(server: Server) -> None:
    m = msg_id()
    ts = int(time.time())
    reports = [
        {"messageId": m, "status": "DELIVERED", "time": 1795000000, "event_id": "g1"},
        {"message_id": m, "status": "clicked", "url": "https://shop.cn/p/9", "id": "g2"},
        {"message_id": m, "status": "replied", "text": "TD", "occurred_at": 1795000000123},
        {"message_id": m, "status": "bounced", "reason": "no such number", "id": "g4"},
        {"message_id": m, "status": "unsubscribed", "channel": "sms", "step": "two", "id": "g5"},
    ]
    data = json.dumps({"callbacks": reports}).encode()
    headers = {"X-Closedloop-Signature": core_sign(SECRET, ts, data)}
    a = request(f"{server.url}/v1/callbacks/sms_gateway", data, headers=headers)
    assert a.status == 200 and a.json["accepted"] == 5, a.json
    server.load()
    got = {e["event"]: e for e in server.events(m)}
    assert set(got) == {
        "Message Delivered",
        "Message Clicked",
        "Message Replied",
        "Message Bounced",
        "Unsubscribed",  # the portrait's opt-out event, for the channel named
    }
    assert got["Message Delivered"]["timestamp"] == datetime.fromtimestamp(1795000000, UTC)
    assert got["Message Replied"]["timestamp"] == datetime.fromtimestamp(1795000000.123, UTC)
    assert got["Message Clicked"]["props"]["url"] == "https://shop.cn/p/9"
    assert got["Message Replied"]["props"]["text"] == "TD"
    assert got["Message Bounced"]["props"]["reason"] == "no such number"
    assert got["Unsubscribed"]["props"]["channel"] == "sms"
    assert got["Unsubscribed"]["props"]["step"] == "two"


# ---- authentication ------------------------------------------------------------------------
def _failed(server: Server, needle: str) -> list[dict[str, Any]]:
    return [f for f in server.rows("failed_events") if needle in (f["payload"] or "")]


def test_bad_stale_or_missing_signatures_are_refused_and_kept(server: Server) -> None:
    m = msg_id()
    report = {"message_id": m, "status": "opened", "id": "x"}
    wrong = server.signed("sms_gateway", report, secret=b"not-the-secret")
    stale = server.signed("sms_gateway", report, at=int(time.time()) - 3600)
    # A source with a secret does not take its write key instead: write keys can be public.
    keyed = request(f"{server.url}/v1/callbacks/sms_gateway", report, headers=basic(SMS.write_key))
    unknown = server.signed("no_such_source", report)
    for a in (wrong, stale, keyed, unknown):
        assert a.status == 401, a.json
        assert a.json["reason_code"] == "bad_write_key"
    assert "signature does not verify" in wrong.json["error"]
    assert "needs signed callbacks" in keyed.json["error"]
    assert "no source named" in unknown.json["error"]
    # An altered body no longer matches its signature.
    data = json.dumps(report).encode()
    ts = int(time.time())
    tampered = request(
        f"{server.url}/v1/callbacks/sms_gateway",
        data.replace(b"opened", b"clicked"),
        headers={
            "X-Closedloop-Timestamp": str(ts),
            "X-Closedloop-Signature": webhook_sign(SECRET, ts, data),
        },
    )
    assert tampered.status == 401
    server.load()
    assert server.events(m) == []
    kept = _failed(server, m)
    assert len(kept) == 5 and {f["reason_code"] for f in kept} == {"bad_write_key"}


def test_a_source_without_secret_takes_its_write_key(server: Server) -> None:
    m = msg_id()
    report = {"message_id": m, "status": "open", "id": "k1"}
    url = f"{server.url}/v1/callbacks/mail_service"
    assert request(url, report, headers=basic(MAIL.write_key)).status == 200
    assert request(url + f"?writeKey={MAIL.write_key}", {**report, "id": "k2"}).status == 200
    assert request(url, report, headers=basic(WEB.write_key)).status == 401  # another source's
    assert request(url, report).status == 401
    server.load()
    assert [e["event"] for e in server.events(m)] == ["Message Opened"] * 2
    assert {e["source"] for e in server.events(m)} == {"mail_service"}


# ---- bad callbacks and duplicates ----------------------------------------------------------
def test_bad_callbacks_become_typed_failures_and_the_counts_hold(server: Server) -> None:
    m = msg_id()
    reports: list[Any] = [
        {"message_id": m, "status": "opened", "id": "ok1"},
        {"message_id": m, "status": "forwarded", "id": "b1"},
        {"status": "opened", "id": f"b2-{m}"},
        {"message_id": m, "id": "b3"},
        f"just text {m}",
        {"message_id": m, "status": "opened", "timestamp": "yesterday", "id": "b5"},
        {"message_id": {"deep": m}, "status": "opened"},
        {"message_id": m, "status": "opened", "id": "ok1"},  # the same provider event again
    ]
    a = server.signed("sms_gateway", reports)
    assert a.status == 200
    body = a.json
    assert (body["received"], body["accepted"], body["failed"], body["duplicate"]) == (8, 1, 6, 1)
    codes = [e["reason_code"] for e in body["errors"]]
    assert codes == [
        "invalid_field",  # unknown status
        "missing_field",  # no message id
        "missing_field",  # no status
        "malformed",  # not an object
        "invalid_field",  # not a time
        "invalid_field",  # message id not a string
    ]
    assert "forwarded" in body["errors"][0]["reason"] and "opened" in body["errors"][0]["reason"]
    # A single bad callback answers 400, saying why.
    one = server.signed("sms_gateway", {"message_id": m, "status": "zapped"})
    assert one.status == 400 and one.json["reason_code"] == "invalid_field"
    server.load()
    assert len(server.events(m)) == 1
    kept = _failed(server, m)
    # the six of the batch, and the single one refused with 400
    assert sorted(f["reason_code"] for f in kept) == sorted([*codes, "invalid_field"])
    assert {f["source"] for f in kept} == {"sms_gateway"}


def test_a_retried_callback_is_stored_once_across_requests_and_loads(server: Server) -> None:
    m = msg_id()
    with_id = {"message_id": m, "status": "clicked", "id": "retry-1"}
    with_time = {"message_id": m, "status": "opened", "timestamp": "2026-11-20T06:00:00+08:00"}
    bare = {"message_id": m, "status": "delivered"}
    for _ in range(3):
        for report in (with_id, with_time, bare):
            assert server.signed("sms_gateway", report).status == 200
        server.load()
    assert sorted(e["event"] for e in server.events(m)) == [
        "Message Clicked",
        "Message Delivered",
        "Message Opened",
    ]


def test_the_route_is_documented_in_openapi(server: Server) -> None:
    doc = request(f"{server.url}/openapi.json", method="GET").json
    op = doc["paths"]["/v1/callbacks/{source}"]["post"]
    assert "callbacks" in op["tags"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert "status" in schema["oneOf"][0]["required"]
    assert {"200", "401", "503"} <= set(op["responses"])


# ---- properties -----------------------------------------------------------------------------
def test_signature_check_accepts_only_the_exact_body_and_secret() -> None:
    body = b'{"message_id":"m","status":"opened"}'
    ts = int(time.time())
    good = {
        "x-closedloop-timestamp": str(ts),
        "x-closedloop-signature": webhook_sign(SECRET, ts, body),
    }
    assert signature_ok(SECRET, good, body)
    assert not signature_ok(SECRET, good, body + b" ")
    assert not signature_ok(b"other", good, body)
    assert not signature_ok(SECRET, good, body, now=ts + 301)
    assert not signature_ok(SECRET, {}, body)
    assert signature_ok(SECRET, {"x-closedloop-signature": core_sign(SECRET, ts, body)}, body)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
reports = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"message_id": st.one_of(st.text(max_size=20), st.integers(), json_values)},
        optional={
            "status": st.one_of(
                st.sampled_from(["opened", "Clicked ", "bounce", "zap"]), json_values
            ),
            "timestamp": st.one_of(
                st.integers(-(10**16), 10**16), st.text(max_size=25), json_values
            ),
            "id": json_values,
            "url": json_values,
            "customer_id": json_values,
        },
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.one_of(reports, st.lists(reports, max_size=6), st.binary(max_size=60)))
def test_any_body_is_answered_without_error_and_every_callback_is_accounted_for(body: Any) -> None:
    intake = CallbackIntake(Collector(SOURCES), SOURCES, {})
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    now = datetime(2026, 11, 20, tzinfo=UTC)
    out = intake.prepare(
        "mail_service",
        raw,
        {"authorization": basic(MAIL.write_key)["Authorization"]},
        None,
        None,
        now,
    )
    assert out.status in (200, 400, 413)
    b = out.body
    assert b["received"] == b["accepted"] + b["failed"] + b["duplicate"]
    if isinstance(body, list):
        assert out.status == 200 and b["received"] == len(body)
    assert out.record is not None or (isinstance(body, list) and not body)


@given(report=reports)
@settings(max_examples=300, deadline=None)
def test_a_readable_report_always_names_its_message_and_a_known_event(report: Any) -> None:
    now = datetime(2026, 11, 20, tzinfo=UTC)
    try:
        m = callback_message(report, now)
    except Exception as e:  # only the typed refusal, never a crash
        assert type(e).__name__ == "_Bad"
        return
    assert m["anonymousId"] == f"closedloop:{m['properties']['message_id']}"
    assert m["event"].startswith("Message ") or m["event"] == "Unsubscribed"
    assert callback_message(report, now)["messageId"] == m["messageId"]  # stable on retry
