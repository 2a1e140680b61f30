"""The loop closed over HTTP: a journey's SMS goes out through the signed webhook channel to a
real provider on loopback, the provider posts an "opened" callback to the real collector,
the loader and identity resolution take it in, and the no-response rule sees the open.

Everything is real: people arrive as identify calls through the collector, the build
resolves them, the journey decides and writes its outbox, the webhook channel delivers, and
the callback is attributed by identity alone (it names only our message id).
"""

from __future__ import annotations

import json
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from closedloop.activate.channels import deliver_channel
from closedloop.activate.channels.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from closedloop.activate.channels.webhook import sign as webhook_sign
from closedloop.activate.worker import tick
from closedloop.collect.drain import SpoolLoader
from closedloop.core.clock import Clock
from closedloop.core.definitions import Channel, Project, load_project
from closedloop.core.engine import Engine
from closedloop.pipeline import build
from tests.collect.conftest import free_port, request

T0 = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai
OUT_SECRET = "outgoing-sms-secret"  # noqa: S105 - a test secret
CALLBACK_SECRET = "sms-callback-secret"  # noqa: S105 - a test secret
PHONES = {f"m{i}": f"+861380013800{i}" for i in range(1, 4)}
RESPONDER = "m1"

CONFIG = """\
name: callbacks
engine: duckdb:///warehouse.duckdb
timezone: Asia/Shanghai
sources:
  - {{name: web, channel: web, write_key: wk_web_0123456789}}
  - {{name: sms_gateway, channel: sms, write_key: wk_sms_0123456789, callback_secret_env: E2E_SMS_CALLBACK_SECRET}}
channels:
  sms:
    transport: webhook
    url: http://127.0.0.1:{port}/send
    secret_env: E2E_SMS_OUT_SECRET
    allowed_hosts: [127.0.0.1]
    backoff_seconds: 0
"""
IDENTITY = """\
types:
  - {name: member_id, priority: 100, strong: true, paths: [user_id, traits.member_id]}
  - {name: phone, normaliser: phone, priority: 90, strong: true, paths: [traits.phone]}
  - {name: anonymous_id, priority: 10, strong: false, paths: [anonymous_id]}
"""
SEGMENT = """\
name: everyone
where: {trait: customer_id, op: not_null}
"""
JOURNEY = """\
name: nudges
audience: everyone
channel: sms
holdout: 0.01
template: "first"
trigger: {segment_entry: everyone}
entry: {rule: once}
policy:
  no_response: {within_hours: 24}   # the default responses include a provider's Message Opened
steps:
  - {id: one, send: {template: "one"}}
  - {id: pause, wait: 2d}
  - {id: two, send: {template: "two"}}
"""


class Provider:
    """An SMS provider on loopback: checks the signature, then reports an open for one
    recipient to the collector's callback route, signed with the source's secret."""

    def __init__(self) -> None:
        self.collector_url = ""
        self.received: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.callbacks: list[int] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = verify(
                    OUT_SECRET.encode(),
                    self.headers.get(TIMESTAMP_HEADER, ""),
                    body,
                    self.headers.get(SIGNATURE_HEADER, ""),
                    now=time.time(),
                )
                if not ok:
                    provider.bad_signatures += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                sent = json.loads(body)
                provider.received.append(sent)
                if sent["to"] == PHONES[RESPONDER]:
                    provider.report(sent, "opened", T0 + timedelta(hours=3))
                answer = json.dumps({"id": f"prov-{sent['message_id']}"}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        return Handler

    def report(self, sent: dict[str, Any], status: str, at: datetime) -> None:
        """The provider's callback: what we sent it, echoed with the outcome."""
        report = {**sent, "event": status, "id": f"ev-{status}-{sent['message_id']}"}
        report["timestamp"] = at.isoformat()
        data = json.dumps(report).encode()
        ts = int(time.time())
        headers = {
            "X-Closedloop-Timestamp": str(ts),
            "X-Closedloop-Signature": webhook_sign(CALLBACK_SECRET.encode(), ts, data),
        }
        answer = request(f"{self.collector_url}/v1/callbacks/sms_gateway", data, headers=headers)
        self.callbacks.append(answer.status)

    def stop(self) -> None:
        self.server.shutdown()


class Collector:
    def __init__(self, project: Project) -> None:
        import uvicorn

        from closedloop.collect.server import create_app

        self.spool = project.root / "spool"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        # Secrets from the environment, as `closedloop serve` reads them.
        app = create_app(list(project.config.sources), self.spool)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive()
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def provider() -> Iterator[Provider]:
    p = Provider()
    yield p
    p.stop()


def make_project(root: Path, port: int) -> Project:
    root.mkdir(parents=True)
    (root / "closedloop.yaml").write_text(CONFIG.format(port=port))
    (root / "identity.yaml").write_text(IDENTITY)
    (root / "segments").mkdir()
    (root / "segments" / "everyone.yaml").write_text(SEGMENT)
    (root / "campaigns").mkdir()
    (root / "campaigns" / "nudges.yaml").write_text(textwrap.dedent(JOURNEY))
    return load_project(root)


def test_a_provider_callback_over_http_counts_as_the_response(
    tmp_path: Path, provider: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("E2E_SMS_OUT_SECRET", OUT_SECRET)
    monkeypatch.setenv("E2E_SMS_CALLBACK_SECRET", CALLBACK_SECRET)
    project = make_project(tmp_path / "p", provider.port)
    collector = Collector(project)
    provider.collector_url = collector.url
    try:
        # People sign up on the website: identify calls through the collector.
        batch = [
            {
                "type": "identify",
                "userId": member,
                "messageId": f"signup-{member}",
                "timestamp": (T0 - timedelta(days=10)).isoformat(),
                "traits": {"member_id": member, "phone": phone, "name": member.upper()},
                "context": {"consent": {"categoryPreferences": {"marketing": True}}},
            }
            for member, phone in PHONES.items()
        ]
        answer = request(
            f"{collector.url}/v1/batch", {"batch": batch, "writeKey": "wk_web_0123456789"}
        )
        assert answer.status == 200 and answer.json["accepted"] == 3
        with Engine(project.engine_url) as engine:
            SpoolLoader(engine, list(project.config.sources), collector.spool).run_once()
            build(engine, project, clock=Clock(T0), load=False)
            profiles = engine.table("profiles").to_pyarrow().to_pylist()
            customer = {p["member_id"]: p["customer_id"] for p in profiles}
            assert set(customer) == set(PHONES)

            # The journey sends its first SMS; the webhook channel hands it to the provider,
            # which reports an open for one person through the collector's callback route.
            out = tmp_path / "outbox"
            first = tick(engine, project, T0 + timedelta(minutes=5), outbox_dir=out)
            assert first.sent >= 2
            config = project.config.channels[Channel.SMS]
            run_at = Clock(T0 + timedelta(minutes=6))
            deliver_channel(
                engine,
                Channel.SMS,
                config,
                outbox_dir=out,
                handoff_dir=tmp_path / "handoff",
                clock=run_at,
            )
            assert provider.bad_signatures == 0
            sent_to = {m["to"] for m in provider.received}
            assert PHONES[RESPONDER] in sent_to and len(sent_to) >= 2
            assert provider.callbacks == [200]
            silent = sorted(m for m, p in PHONES.items() if p in sent_to and m != RESPONDER)[0]

            # The loader takes the callback in; identity attributes it by the message's id.
            SpoolLoader(engine, list(project.config.sources), collector.spool).run_once()
            ev = engine.table("events")
            opened = ev.filter(ev.event == "Message Opened").to_pyarrow().to_pylist()
            assert len(opened) == 1 and opened[0]["source"] == "sms_gateway"
            build(engine, project, clock=Clock(T0 + timedelta(hours=4)), load=False)
            ec = engine.table("event_customers")
            owner = ec.filter(ec.message_id == opened[0]["message_id"]).to_pyarrow().to_pylist()
            assert [r["customer_id"] for r in owner] == [customer[RESPONDER]]

            # Two days on: the responder gets the next message, the silent one is stopped.
            later = T0 + timedelta(days=2, hours=1)
            tick(engine, project, later, outbox_dir=out)
            lines = [
                json.loads(x)
                for f in sorted(out.rglob("*.jsonl"))
                for x in f.read_text().splitlines()
            ]
            seconds = {x["customer_id"] for x in lines if x["body"] == "two"}
            assert customer[RESPONDER] in seconds
            assert customer[silent] not in seconds
            s = engine.table("journey_state").to_pandas()
            last = s.sort_values("seq").groupby("customer_id").last()
            assert last.loc[customer[silent], "reason"] == "no_response"
            assert last.loc[customer[RESPONDER], "reason"] != "no_response"
    finally:
        collector.stop()
