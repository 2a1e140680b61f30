"""The HTTP collector on loopback: every route, auth mode, encoding, limit and error answer.

A real uvicorn server runs in a thread on a free port and spools to a real folder; the real
spool loader moves what it spooled into a real DuckDB file, where the tests look.
"""

from __future__ import annotations

import base64
import gzip
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.collect.conftest import POS, WEB, LiveCollector, request

KEY = WEB.write_key


def mid() -> str:
    return "m-" + uuid.uuid4().hex


def basic(user: str, colon: bool = True) -> dict[str, str]:
    token = base64.b64encode(f"{user}{':' if colon else ''}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def msg(**extra: Any) -> dict[str, Any]:
    m: dict[str, Any] = {"userId": "u1", "messageId": mid()}
    m.update(extra)
    return m


def events_by_id(live: LiveCollector) -> dict[str, dict[str, Any]]:
    live.load()
    return {r["message_id"]: r for r in live.rows("events")}


def failures_at(live: LiveCollector) -> list[dict[str, Any]]:
    live.load()
    return live.rows("failed_events")


# ---- routes ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "mtype", "extra"),
    [
        ("identify", "identify", {"traits": {"email": "a@b.c"}}),
        ("track", "track", {"event": "Order Completed", "properties": {"revenue": 12.5}}),
        ("page", "page", {"name": "Home"}),
        ("screen", "screen", {"name": "Cart"}),
        ("group", "group", {"groupId": "g1"}),
        ("alias", "alias", {"previousId": "anon-1"}),
        ("i", "identify", {}),
        ("t", "track", {"event": "Clicked"}),
        ("p", "page", {}),
        ("s", "screen", {}),
        ("g", "group", {"groupId": "g2"}),
        ("a", "alias", {"previousId": "anon-2"}),
    ],
)
def test_single_message_routes_accept_and_load(
    live: LiveCollector, path: str, mtype: str, extra: dict[str, Any]
) -> None:
    m = msg(writeKey=KEY, **extra)
    a = live.post(f"/v1/{path}", m)
    assert a.status == 200, a.raw
    assert a.json == {"success": True, "received": 1, "accepted": 1, "failed": 0, "duplicate": 0}
    row = events_by_id(live)[m["messageId"]]
    assert row["type"] == mtype  # the route decides the type
    assert row["source"] == "web" and row["channel"] == "web"


@pytest.mark.parametrize("path", ["/v1/batch", "/v1/b", "/v1/import", "/beacon/v1/batch"])
def test_batch_routes(live: LiveCollector, path: str) -> None:
    batch = [msg(type="track", event="E"), msg(type="identify"), msg(type="page")]
    a = live.post(path, {"batch": batch, "writeKey": KEY})
    assert a.status == 200, a.raw
    assert a.json["accepted"] == 3 and a.json["received"] == 3
    stored = events_by_id(live)
    assert all(m["messageId"] in stored for m in batch)


def test_beacon_write_key_in_query(live: LiveCollector) -> None:
    m = msg(type="track", event="Left Page")
    a = live.post(f"/beacon/v1/batch?writeKey={KEY}", {"batch": [m]})
    assert a.status == 200, a.raw
    assert m["messageId"] in events_by_id(live)


# ---- authentication ----------------------------------------------------------------------
@pytest.mark.parametrize("colon", [True, False])
def test_basic_auth_with_key_as_user(live: LiveCollector, colon: bool) -> None:
    m = msg(event="E")
    a = live.post("/v1/track", m, headers=basic(POS.write_key, colon))
    assert a.status == 200, a.raw
    row = events_by_id(live)[m["messageId"]]
    assert row["source"] == "pos" and row["data_class"] == "second_party"


def test_bearer_plus_body_key(live: LiveCollector) -> None:
    m = msg(event="E", writeKey=KEY)
    a = live.post("/v1/track", m, headers={"Authorization": "Bearer some-token"})
    assert a.status == 200, a.raw


@pytest.mark.parametrize(
    ("headers", "body_key", "why"),
    [
        ({}, None, "no write key"),
        ({}, "wk_wrong_0000", "names no source"),
        (basic("wk_wrong_0000"), None, "names no source"),
        ({"Authorization": "Basic !!!notbase64"}, None, "no write key"),
    ],
)
def test_bad_or_missing_key_is_401_and_kept(
    live: LiveCollector, headers: dict[str, str], body_key: str | None, why: str
) -> None:
    m = msg(event="Secret", marker=mid())
    if body_key:
        m["writeKey"] = body_key
    a = live.post("/v1/track", m, headers=headers)
    assert a.status == 401
    assert why in a.json["error"] and a.json["reason_code"] == "bad_write_key"
    kept = [f for f in failures_at(live) if m["marker"] in f["payload"]]
    assert len(kept) == 1 and kept[0]["reason_code"] == "bad_write_key"
    assert m["messageId"] not in events_by_id(live)


def test_a_key_appends_only_to_its_own_source(live: LiveCollector) -> None:
    m = msg(event="E", writeKey=POS.write_key)
    assert live.post("/v1/track", m).status == 200
    assert events_by_id(live)[m["messageId"]]["source"] == "pos"


# ---- body handling -----------------------------------------------------------------------
def test_json_as_text_plain(live: LiveCollector) -> None:
    m = msg(event="E", writeKey=KEY)
    a = live.post("/v1/t", json.dumps(m).encode(), headers={"Content-Type": "text/plain"})
    assert a.status == 200, a.raw


def test_gzip_body(live: LiveCollector) -> None:
    batch = [msg(type="track", event="E") for _ in range(20)]
    body = gzip.compress(json.dumps({"batch": batch, "writeKey": KEY}).encode())
    a = live.post("/v1/batch", body, headers={"Content-Encoding": "gzip"})
    assert a.status == 200 and a.json["accepted"] == 20


@pytest.mark.parametrize(
    ("body", "headers", "status", "words"),
    [
        (b"{not json", {}, 400, "not JSON"),
        (b"\xff\xfe{}", {}, 400, "not UTF-8"),
        (b"[1,2]", {}, 400, "must be a JSON object"),
        (b"not gzip at all", {"Content-Encoding": "gzip"}, 400, "cannot be inflated"),
        (b"{}", {"Content-Encoding": "br"}, 400, "unsupported Content-Encoding"),
        (b"[" * 100_000, {}, 400, "nested too deeply"),
    ],
)
def test_malformed_bodies_are_400_with_a_reason(
    live: LiveCollector, body: bytes, headers: dict[str, str], status: int, words: str
) -> None:
    a = live.post("/v1/batch", body, headers={**basic(KEY), **headers})
    assert a.status == status, a.raw
    assert words in a.json["error"]


def test_batch_must_hold_an_array(live: LiveCollector) -> None:
    a = live.post("/v1/batch", {"batch": {"a": 1}, "writeKey": KEY})
    assert a.status == 400 and "`batch`" in a.json["error"]
    a = live.post("/v1/batch", {"batch": [], "writeKey": KEY, "context": 5})
    assert a.status == 400 and "context" in a.json["error"]


# ---- limits ------------------------------------------------------------------------------
def test_request_over_500_kb_is_413(live: LiveCollector) -> None:
    big = [msg(type="track", event="E", properties={"pad": "x" * 20_000}) for _ in range(30)]
    a = live.post("/v1/batch", {"batch": big, "writeKey": KEY})
    assert a.status == 413 and "500 KB" in a.json["error"]


def test_gzip_bomb_is_413(live: LiveCollector) -> None:
    inner = json.dumps({"writeKey": KEY, "batch": [], "pad": " " * 5_000_000}).encode()
    a = live.post("/v1/batch", gzip.compress(inner), headers={"Content-Encoding": "gzip"})
    assert a.status == 413 and "decompressed" in a.json["error"]


def test_over_2500_messages_is_413(live: LiveCollector) -> None:
    batch = [{"type": "track", "event": "E", "userId": "u"} for _ in range(2501)]
    a = live.post("/v1/batch", {"batch": batch, "writeKey": KEY})
    assert a.status == 413 and "2,500" in a.json["error"]


def test_message_over_32_kb(live: LiveCollector) -> None:
    big = msg(type="track", event="E", properties={"pad": "x" * 40_000})
    small = msg(type="track", event="E")
    a = live.post("/v1/batch", {"batch": [big, small], "writeKey": KEY})
    assert a.status == 200
    assert (a.json["accepted"], a.json["failed"]) == (1, 1)
    assert a.json["errors"][0]["reason_code"] == "too_large"
    one = live.post("/v1/track", {**big, "messageId": mid(), "writeKey": KEY})
    assert one.status == 413 and one.json["reason_code"] == "too_large"
    stored = events_by_id(live)
    assert small["messageId"] in stored and big["messageId"] not in stored
    assert any(
        f["message_id"] == big["messageId"] and f["reason_code"] == "too_large"
        for f in failures_at(live)
    )


# ---- required fields, accounting ---------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/v1/track", {"userId": "u"}, "missing_field"),
        ("/v1/track", {"event": "E"}, "missing_identity"),
        ("/v1/group", {"userId": "u"}, "missing_field"),
        ("/v1/alias", {"userId": "u"}, "missing_field"),
        ("/v1/alias", {"previousId": "p", "anonymousId": "a"}, "missing_field"),
        ("/v1/identify", {"userId": "u", "messageId": "x" * 101}, "invalid_field"),
        ("/v1/identify", {"userId": "u", "timestamp": "yesterday"}, "invalid_field"),
    ],
)
def test_single_message_missing_fields_are_400_and_kept(
    live: LiveCollector, path: str, body: dict[str, Any], code: str
) -> None:
    marker = mid()
    a = live.post(path, {**body, "writeKey": KEY, "properties": {"marker": marker}})
    assert a.status == 400 and a.json["reason_code"] == code, a.raw
    assert a.json["received"] == 1 and a.json["failed"] == 1
    kept = [f for f in failures_at(live) if marker in f["payload"]]
    assert [f["reason_code"] for f in kept] == [code]


def test_batch_accounting_adds_up(live: LiveCollector) -> None:
    good = msg(type="track", event="E")
    batch: list[Any] = [
        good,
        dict(good),  # the same messageId again: a duplicate
        {"type": "track", "event": "E"},  # no identity
        "not an object",
        {"type": "bogus", "userId": "u"},
        msg(type="identify"),
    ]
    a = live.post("/v1/batch", {"batch": batch, "writeKey": KEY})
    assert a.status == 200
    j = a.json
    assert j["received"] == 6 == j["accepted"] + j["failed"] + j["duplicate"]
    assert (j["accepted"], j["failed"], j["duplicate"]) == (2, 3, 1)
    assert [e["index"] for e in j["errors"]] == [2, 3, 4]
    assert {e["reason_code"] for e in j["errors"]} == {
        "missing_identity",
        "malformed",
        "unknown_type",
    }


def test_a_retried_request_loads_once(live: LiveCollector) -> None:
    batch = [msg(type="track", event="E") for _ in range(5)]
    for _ in range(3):
        assert live.post("/v1/batch", {"batch": batch, "writeKey": KEY}).status == 200
    live.load()
    ids = [r["message_id"] for r in live.rows("events")]
    for m in batch:
        assert ids.count(m["messageId"]) == 1


def test_message_id_generated_when_absent_and_stable_across_retries(live: LiveCollector) -> None:
    m = {"userId": "u-no-id", "event": "No Id", "writeKey": KEY, "properties": {"k": mid()}}
    assert live.post("/v1/track", m).status == 200
    time.sleep(0.01)  # a later receivedAt must not make the retry a new message
    assert (
        live.post("/v1/batch", {"batch": [{**m, "type": "track"}], "writeKey": KEY}).status == 200
    )
    rows = [r for r in events_by_id(live).values() if r["event"] == "No Id"]
    assert len(rows) == 1 and rows[0]["message_id"].startswith("cl-")


# ---- times, context, consent, external ids -----------------------------------------------
def test_received_at_and_clock_skew_correction(live: LiveCollector) -> None:
    # The client's clock is 2 hours fast; the message was made 30 s before the batch was sent.
    client_now = datetime.now(UTC) + timedelta(hours=2)
    made = client_now - timedelta(seconds=30)
    m = msg(type="track", event="E", timestamp=made.isoformat(), receivedAt="1999-01-01T00:00:00Z")
    before = datetime.now(UTC)
    a = live.post("/v1/batch", {"batch": [m], "sentAt": client_now.isoformat(), "writeKey": KEY})
    after = datetime.now(UTC)
    assert a.status == 200
    row = events_by_id(live)[m["messageId"]]
    received = row["received_at"]
    assert before - timedelta(seconds=1) <= received <= after + timedelta(seconds=1)
    assert abs((received - row["timestamp"]).total_seconds() - 30) < 0.01
    assert row["original_timestamp"] == made.replace(microsecond=made.microsecond)
    assert row["sent_at"] == client_now


def test_batch_context_merges_and_ip_is_filled(live: LiveCollector) -> None:
    consent = {"categoryPreferences": {"Advertising": False, "Analytics": True}}
    external = [{"id": "oX9", "type": "wechat_openid", "collection": "users", "encoding": "none"}]
    m1 = msg(type="track", event="E", context={"locale": "zh-CN", "externalIds": external})
    m2 = msg(type="track", event="E", context={"library": {"name": "mine"}, "ip": "10.1.2.3"})
    shared = {"library": {"name": "analytics-python"}, "consent": consent}
    a = live.post("/v1/batch", {"batch": [m1, m2], "context": shared, "writeKey": KEY})
    assert a.status == 200
    stored = events_by_id(live)
    c1 = json.loads(stored[m1["messageId"]]["context"])
    c2 = json.loads(stored[m2["messageId"]]["context"])
    assert c1["library"]["name"] == "analytics-python" and c1["locale"] == "zh-CN"
    assert c1["consent"] == consent and c1["ip"] == "127.0.0.1"
    assert c2["library"]["name"] == "mine" and c2["ip"] == "10.1.2.3"  # message wins
    ext = [r for r in live.rows("event_external_ids") if r["message_id"] == m1["messageId"]]
    assert ext == [
        {"message_id": m1["messageId"], "type": "wechat_openid", "id": "oX9", "collection": "users"}
    ]


# ---- browser support ---------------------------------------------------------------------
def test_cors_preflight_and_headers(live: LiveCollector) -> None:
    a = request(
        live.url + "/v1/t",
        method="OPTIONS",
        headers={
            "Origin": "https://shop.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert a.status == 204
    assert a.headers["access-control-allow-origin"] == "https://shop.example"
    assert "POST" in a.headers["access-control-allow-methods"]
    assert a.headers["access-control-allow-headers"] == "content-type"
    b = live.post("/v1/t", msg(event="E", writeKey=KEY), headers={"Origin": "https://shop.example"})
    assert b.headers["access-control-allow-origin"] == "https://shop.example"


def test_settings_endpoint(live: LiveCollector) -> None:
    a = request(f"{live.url}/v1/projects/{KEY}/settings")
    assert a.status == 200
    seg = a.json["integrations"]["Segment.io"]
    assert seg["apiKey"] == KEY and seg["apiHost"] == f"127.0.0.1:{live.port}/v1"
    assert seg["protocol"] == "http"
    assert request(f"{live.url}/v1/projects/wk_nope_0000/settings").status == 401


def test_openapi_documents_every_route(live: LiveCollector) -> None:
    doc = request(live.url + "/openapi.json").json
    paths = set(doc["paths"])
    for p in ("identify", "track", "page", "screen", "group", "alias", "batch"):
        assert f"/v1/{p}" in paths
    for p in "tipsgab":
        assert f"/v1/{p}" in paths
    assert {"/v1/import", "/beacon/v1/batch", "/v1/projects/{write_key}/settings"} <= paths
    assert "requestBody" in doc["paths"]["/v1/batch"]["post"]
    assert request(live.url + "/docs").status == 200


# ---- pressure and a failing store --------------------------------------------------------
def test_backlog_over_the_limit_is_429_with_retry_after(tmp_path: Path) -> None:
    c = LiveCollector(tmp_path / "spool", tmp_path / "w.duckdb", max_backlog=1)
    try:
        assert c.post("/v1/t", msg(event="E", writeKey=KEY)).status == 200
        time.sleep(0.6)  # the backlog is measured at most twice a second
        a = c.post("/v1/t", msg(event="E", writeKey=KEY))
        assert a.status == 429 and a.headers["retry-after"] == "1"
        c.load()  # the loader catches up and retires nothing yet (writer alive) ...
    finally:
        c.stop()


def test_a_spool_that_cannot_write_answers_503(tmp_path: Path) -> None:
    """A server whose files may not exceed 64 KB (RLIMIT_FSIZE): writes fail with EFBIG."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    from tests.collect.conftest import free_port

    port = free_port()
    code = (
        "import sys, uvicorn\n"
        "from pathlib import Path\n"
        "from closedloop.collect.server import create_app\n"
        "from tests.collect.conftest import WEB, POS\n"
        "app = create_app([WEB, POS], Path(sys.argv[1]))\n"
        "uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[2]), log_level='warning')\n"
    )

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "spool"), str(port)],
        preexec_fn=limit,  # sets a resource limit in the child only
        cwd=Path(__file__).parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if request(url + "/health", timeout=1).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        ok = request(url + "/v1/t", msg(event="E", writeKey=KEY))
        assert ok.status == 200
        big = [msg(type="track", event="E", properties={"pad": "x" * 20_000}) for _ in range(5)]
        a = request(url + "/v1/batch", {"batch": big, "writeKey": KEY})
        assert a.status == 503 and a.headers["retry-after"] == "5", a.raw
        assert "not stored" in a.json["error"]
        again = request(url + "/v1/t", msg(event="E", writeKey=KEY))
        assert again.status == 200  # a new segment; small requests fit again
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_too_many_requests_in_flight_is_429(tmp_path: Path) -> None:
    """Two requests still sending their bodies hold both places; a third is told to wait."""
    import socket

    c = LiveCollector(tmp_path / "spool", tmp_path / "w.duckdb", max_in_flight=2)
    held: list[socket.socket] = []
    try:
        body = json.dumps(msg(event="E", writeKey=KEY)).encode()
        head = (f"POST /v1/t HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", c.port))
            s.sendall(head + body[:10])  # the rest of the body never comes (yet)
            held.append(s)
        time.sleep(0.3)
        a = c.post("/v1/t", msg(event="E", writeKey=KEY))
        assert a.status == 429 and a.headers["retry-after"] == "1"
        for s in held:
            s.sendall(body[10:])
            assert s.recv(1000).startswith(b"HTTP/1.1 200")
        assert c.post("/v1/t", msg(event="E", writeKey=KEY)).status == 200
    finally:
        for s in held:
            s.close()
        c.stop()
