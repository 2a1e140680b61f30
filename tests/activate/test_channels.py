"""Channels against real servers on loopback: a signing-checking webhook, SMTP, staff tasks."""

from __future__ import annotations

import contextlib
import csv
import ipaddress
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from closedloop.activate.campaign import run_campaign
from closedloop.activate.channels import deliver, deliver_channel, open_channel
from closedloop.activate.channels.email import SmtpChannel
from closedloop.activate.channels.handoff import HandoffChannel
from closedloop.activate.channels.staff import export_staff_tasks
from closedloop.activate.channels.webhook import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    UnsafeURLError,
    WebhookChannel,
    sign,
    verify,
    vetted_address,
)
from closedloop.activate.smtp import SmtpSettings
from closedloop.core.clock import Clock
from closedloop.core.definitions import (
    CampaignDef,
    Channel,
    ChannelConfig,
    ProjectConfig,
    SegmentDef,
)
from closedloop.core.engine import Engine
from closedloop.segments.audience import Fields, evaluate_segment
from tests.activate.test_smtp import Inbox, smtp  # noqa: F401  (the aiosmtpd fixture)
from tests.segments.test_audience import set_profiles

NOW = datetime(2026, 11, 20, 4, 0, tzinfo=UTC)  # noon in Shanghai
SECRET = b"s3cret-for-tests"
EVERYONE = SegmentDef.model_validate(
    {"name": "everyone", "where": {"trait": "customer_id", "op": "not_null"}}
)


def campaign(channel: str, **kw: Any) -> CampaignDef:
    return CampaignDef.model_validate(
        {
            "name": f"c_{channel}",
            "audience": "everyone",
            "channel": channel,
            "holdout": 0.2,
            "variants": [
                {"name": "a", "weight": 0.5, "subject": "A {{ name }}", "template": "a"},
                {"name": "b", "weight": 0.5, "subject": "B {{ name }}", "template": "b"},
            ],
            **kw,
        }
    )


# ---- a real webhook receiver ----------------------------------------------------------------
class Receiver:
    """What the loopback provider saw; it fails the first ``fail_first`` tries per message."""

    def __init__(self) -> None:
        self.fail_first = 0
        self.slow_first = 0  # seconds to stall on a message's first try (a timeout)
        self.refuse_to: set[str] = set()
        self.tries: dict[str, int] = {}
        self.accepted: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.times: list[float] = []
        self.lock = threading.Lock()


def make_handler(rx: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            return None

        def _answer(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError):  # a client that timed out and left
                self.wfile.write(data)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            ok = verify(
                SECRET,
                self.headers.get(TIMESTAMP_HEADER, ""),
                body,
                self.headers.get(SIGNATURE_HEADER, ""),
                now=time.time(),
            )
            msg = json.loads(body)
            with rx.lock:
                rx.times.append(time.monotonic())
                if not ok:
                    rx.bad_signatures += 1
                key = self.headers["Idempotency-Key"]
                n = rx.tries[key] = rx.tries.get(key, 0) + 1
            if not ok:
                return self._answer(401, {"error": "bad signature"})
            if msg["to"] in rx.refuse_to:
                return self._answer(400, {"error": "invalid number"})
            if n == 1 and rx.slow_first:
                time.sleep(rx.slow_first)
            if n <= rx.fail_first:
                return self._answer(503, {"error": "busy"})
            with rx.lock:
                rx.accepted.append(msg)
            self._answer(200, {"id": f"prov-{msg['message_id']}"})

    return Handler


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    rx = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(rx))
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield rx, f"http://127.0.0.1:{server.server_address[1]}/send?v=1"
    finally:
        server.shutdown()
        server.server_close()


def hook(url: str, **kw: Any) -> ChannelConfig:
    return ChannelConfig.model_validate(
        {
            "transport": "webhook",
            "url": url,
            "secret_env": "SMS_HOOK_SECRET",
            "allowed_hosts": ["127.0.0.1"],
            "backoff_seconds": 0.01,
            **kw,
        }
    )


@pytest.fixture
def people(engine: Engine) -> Engine:
    rows: list[dict[str, object]] = [
        {
            "customer_id": f"c{i:02d}",
            "name": f"N{i}",
            "member_id": f"m{i}" if i % 2 else None,
            "email": f"p{i}@x.cn",
            "phone": f"+86139000000{i:02d}",
            "consent_marketing": True,
            "timezone": "Asia/Shanghai",
        }
        for i in range(30)
    ]
    set_profiles(engine, rows)
    evaluate_segment(engine, EVERYONE, Fields(), Clock(NOW))
    return engine


def decide(engine: Engine, tmp_path: Path, channel: str) -> list[dict[str, Any]]:
    run_campaign(
        engine, campaign(channel), outbox_dir=tmp_path / "outbox", occasion="o", clock=Clock(NOW)
    )
    d = engine.table("deliveries")
    return d.filter(d.status == "sent").to_pyarrow().to_pylist()


def events(engine: Engine, name: str) -> list[dict[str, Any]]:
    e = engine.table("events")
    rows = e.filter(e.event == name).to_pyarrow().to_pylist()
    for r in rows:
        r["properties"] = json.loads(r["properties"])
    return rows


# ---- signing ---------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=64),
    body=st.binary(max_size=300),
    flip=st.integers(0, 299),
)
def test_signature_verifies_and_any_change_breaks_it(secret: bytes, body: bytes, flip: int) -> None:
    ts = 1_800_000_000
    sig = sign(secret, ts, body)
    assert verify(secret, str(ts), body, sig, now=ts + 10)
    assert not verify(secret, str(ts), body, sig, now=ts + 3600)  # stale: a replay
    assert not verify(secret, str(ts + 1), body, sig, now=ts)
    if body:
        i = flip % len(body)
        changed = body[:i] + bytes([body[i] ^ 1]) + body[i + 1 :]
        assert not verify(secret, str(ts), changed, sig, now=ts)
    assert not verify(secret + b"x", str(ts), body, sig, now=ts)


# ---- outbound URL check ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x",
        "http://localhost:8080/x",
        "http://10.1.2.3/x",
        "http://172.16.0.9/x",
        "http://192.168.1.1/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/x",
        "http://[fe80::1]/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://0.0.0.0/x",
        "http://100.64.0.1/x",
    ],
)
def test_private_loopback_and_link_local_urls_are_refused(url: str) -> None:
    with pytest.raises(UnsafeURLError, match="allowed_hosts"):
        vetted_address(url)


def test_a_public_address_passes_and_an_allowed_host_is_the_exception() -> None:
    assert vetted_address("https://93.184.216.34/hook") == "93.184.216.34"
    assert vetted_address("http://127.0.0.1:9/x", ["127.0.0.1"]) == "127.0.0.1"
    with pytest.raises(UnsafeURLError):
        vetted_address("ftp://93.184.216.34/x")


@settings(max_examples=200, deadline=None)
@given(
    net=st.sampled_from(
        ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16"]
    ),
    offset=st.integers(0, 2**24 - 1),
)
def test_every_address_of_a_private_range_is_refused(net: str, offset: int) -> None:
    n = ipaddress.ip_network(net)
    ip = n.network_address + offset % n.num_addresses
    with pytest.raises(UnsafeURLError):
        vetted_address(f"http://{ip}/hook")


def test_a_webhook_to_loopback_is_refused_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMS_HOOK_SECRET", "x")
    cfg = hook("http://127.0.0.1:9/x", allowed_hosts=[])
    with pytest.raises(UnsafeURLError):
        WebhookChannel("sms", cfg)
    monkeypatch.delenv("SMS_HOOK_SECRET")
    with pytest.raises(Exception, match="SMS_HOOK_SECRET"):
        WebhookChannel("sms", hook("http://127.0.0.1:9/x"))


# ---- webhook delivery ------------------------------------------------------------------------
def test_webhook_retries_5xx_with_backoff_then_delivers_once(
    people: Engine, tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    rx, url = receiver
    rx.fail_first = 2
    sent = decide(people, tmp_path, "sms")
    assert sent
    sleeps: list[float] = []
    ch = WebhookChannel("sms", hook(url), secret=SECRET, sleep=sleeps.append, clock=Clock(NOW))
    run = deliver(people, tmp_path / "outbox", ch, clock=Clock(NOW), max_attempts=5)
    assert (run.delivered, run.failed, run.bounced) == (len(sent), 0, 0)
    assert rx.bad_signatures == 0
    assert sorted(m["message_id"] for m in rx.accepted) == sorted(r["message_id"] for r in sent)
    assert all(n == 3 for n in rx.tries.values())
    assert sleeps == [0.01, 0.02] * len(sent)  # exponential backoff between the tries
    a = people.table("message_attempts").to_pyarrow().to_pylist()
    assert len(a) == 3 * len(sent)
    assert sorted({r["attempt"] for r in a}) == [1, 2, 3]
    # The provider got the variant's content and the phone as address.
    by_id = {r["message_id"]: r for r in sent}
    for m in rx.accepted:
        assert m["to"] == by_id[m["message_id"]]["address"]
        assert m["subject"][0].lower() == m["variant"]
    # Outcomes came back as events through collect: sent once each, failures per try.
    got = events(people, "Message Sent")
    assert sorted(e["properties"]["message_id"] for e in got) == sorted(by_id)
    assert {e["source"] for e in got} == {"closedloop_activate"}
    one = got[0]["properties"]
    assert one["campaign"] == "c_sms" and one["channel"] == "sms" and one["variant"] in ("a", "b")
    assert len(events(people, "Message Failed")) == 2 * len(sent)
    # A restart sends nothing again and stores no event twice.
    before = dict(rx.tries)
    again = deliver(people, tmp_path / "outbox", ch, clock=Clock(NOW))
    assert again.already_done == len(sent) and again.attempts == 0 and rx.tries == before
    assert len(events(people, "Message Sent")) == len(sent)


def test_webhook_4xx_is_bounced_without_retry_and_gives_up_after_max_attempts(
    people: Engine, tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    rx, url = receiver
    sent = decide(people, tmp_path, "sms")
    refused = sent[0]["address"]
    rx.refuse_to = {refused}
    rx.fail_first = 10  # everyone else: the provider is down
    ch = WebhookChannel("sms", hook(url), secret=SECRET, sleep=lambda _: None, clock=Clock(NOW))
    run = deliver(people, tmp_path / "outbox", ch, clock=Clock(NOW), max_attempts=3)
    assert run.bounced == 1 and run.failed == len(sent) - 1
    assert rx.tries[sent[0]["message_id"]] == 1  # a 4xx is never retried
    assert all(n == 3 for k, n in rx.tries.items() if k != sent[0]["message_id"])
    later = deliver(people, tmp_path / "outbox", ch, clock=Clock(NOW), max_attempts=3)
    assert later.gave_up == len(sent) - 1 and later.already_done == 1 and later.attempts == 0
    bounced = events(people, "Message Bounced")
    assert len(bounced) == 1 and "HTTP 400" in bounced[0]["properties"]["error"]


def test_webhook_timeout_is_retried(
    people: Engine, tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    rx, url = receiver
    rx.slow_first = 1.0
    decide(people, tmp_path, "sms")
    one = next(iter(m for m in _outbox(tmp_path)))
    cfg = hook(url, timeout_seconds=0.2)
    ch = WebhookChannel("sms", cfg, secret=SECRET, sleep=lambda _: None, clock=Clock(NOW))
    pace_calls: list[int] = []
    result = ch.send(one, attempts_left=3, pace=lambda: pace_calls.append(1))
    assert [a.status for a in result.attempts] == ["failed", "delivered"]
    assert "timeout" in (result.attempts[0].error or "")
    assert result.provider_id == f"prov-{one['message_id']}" and len(pace_calls) == 2


def _outbox(tmp_path: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for f in sorted((tmp_path / "outbox").glob("*/*.jsonl"))
        for line in f.read_text().splitlines()
    ]


def test_send_rate_limit_paces_requests(
    people: Engine, tmp_path: Path, receiver: tuple[Receiver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rx, url = receiver
    sent = decide(people, tmp_path, "sms")
    monkeypatch.setenv("SMS_HOOK_SECRET", SECRET.decode())
    cfg = hook(url, rate_per_second=40)
    start = time.monotonic()
    run = deliver_channel(
        people,
        Channel.SMS,
        cfg,
        outbox_dir=tmp_path / "outbox",
        handoff_dir=tmp_path / "handoff",
        clock=Clock(NOW),
    )
    elapsed = time.monotonic() - start
    assert run.delivered == len(sent) >= 10
    # Never faster than the limit: the sender's own span is exact (a monotonic pacer); at the
    # receiver, a first request delayed on a loaded machine can shorten the span a little.
    assert elapsed >= (len(sent) - 1) / 40
    assert rx.times[-1] - rx.times[0] >= 0.8 * (len(sent) - 1) / 40


def test_wechat_goes_to_the_persons_openid(
    people: Engine, tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    rx, url = receiver
    ids = [
        {
            "id_type": "wechat_openid",
            "id_value": f"oid-{i}",
            "customer_id": f"c{i:02d}",
            "quarantined": False,
            "first_seen": NOW,
            "last_seen": NOW,
            "messages": 1,
        }
        for i in range(30)
        if i != 3
    ]
    import closedloop.identity.tables  # noqa: F401

    people.append("identity_map", pa.Table.from_pylist(ids))
    sent = decide(people, tmp_path, "wechat")
    ch = WebhookChannel("wechat", hook(url), secret=SECRET, sleep=lambda _: None)
    run = deliver(
        people, tmp_path / "outbox", ch, clock=Clock(NOW), address_id_type="wechat_openid"
    )
    no_openid = [r for r in sent if r["customer_id"] == "c03"]
    assert run.delivered == len(sent) - len(no_openid) and run.bounced == len(no_openid)
    assert {m["to"] for m in rx.accepted} == {
        f"oid-{int(r['customer_id'][1:])}" for r in sent if r["customer_id"] != "c03"
    }


# ---- SMTP, staff tasks, hand-off --------------------------------------------------------------
def test_smtp_behind_the_channel_protocol(
    people: Engine,
    tmp_path: Path,
    smtp: tuple[Inbox, SmtpSettings],  # noqa: F811
) -> None:
    inbox, settings_ = smtp
    inbox.refuse = {"p5@x.cn"}
    sent = decide(people, tmp_path, "email")
    run = deliver(people, tmp_path / "outbox", SmtpChannel(settings_), clock=Clock(NOW))
    bounced = sum(r["address"] == "p5@x.cn" for r in sent)
    assert (run.delivered, run.bounced) == (len(sent) - bounced, bounced)
    assert len(inbox.messages) == len(sent) - bounced
    subjects = {m["Subject"][0] for m in inbox.messages}
    assert subjects <= {"A", "B"}
    assert len(events(people, "Message Sent")) == len(sent) - bounced


def test_staff_tasks_go_to_the_owner_and_export(people: Engine, tmp_path: Path) -> None:
    import closedloop.portrait.tables  # noqa: F401

    owners = [
        {
            "customer_id": f"c{i:02d}",
            "trait": "shopping_guide",
            "number_value": None,
            "text_value": f"guide{i % 3}",
            "computed_at": NOW,
        }
        for i in range(0, 30, 2)
    ]
    people.append("computed_traits", pa.Table.from_pylist(owners))
    sent = decide(people, tmp_path, "staff_task")
    cfg = ChannelConfig(transport="staff_task", owner_trait="shopping_guide")  # type: ignore[arg-type]
    run = deliver_channel(
        people,
        Channel.STAFF_TASK,
        cfg,
        outbox_dir=tmp_path / "outbox",
        handoff_dir=tmp_path / "handoff",
        clock=Clock(NOW),
    )
    assert run.delivered == len(sent)
    tasks = people.table("staff_tasks").to_pyarrow().to_pylist()
    assert len(tasks) == len(sent)
    for t in tasks:
        n = int(t["customer_id"][1:])
        assert t["owner"] == (f"guide{n % 3}" if n % 2 == 0 else "unassigned")
        assert t["action"].startswith(("A N", "B N")) and t["status"] == "open"
    n = export_staff_tasks(people, tmp_path / "tasks.csv", owner="guide0")
    rows = list(csv.DictReader((tmp_path / "tasks.csv").open()))
    assert n == len(rows) == sum(t["owner"] == "guide0" for t in tasks) > 0


def test_an_unconfigured_channel_hands_off_to_a_file(people: Engine, tmp_path: Path) -> None:
    sent = decide(people, tmp_path, "push")
    ch = open_channel(people, Channel.PUSH, None, handoff_dir=tmp_path / "handoff")
    run = deliver(people, tmp_path / "outbox", ch, clock=Clock(NOW))
    lines = (tmp_path / "handoff" / "push.jsonl").read_text().splitlines()
    assert run.delivered == len(lines) == len(sent)
    assert deliver(people, tmp_path / "outbox", ch, clock=Clock(NOW)).already_done == len(sent)


# ---- definitions -----------------------------------------------------------------------------
BASE: dict[str, Any] = {
    "name": "p",
    "sources": [{"name": "web", "channel": "web", "write_key": "wk_web_123456"}],
}


@pytest.mark.parametrize(
    ("channels", "message"),
    [
        ({"fax": {"transport": "outbox"}}, "'fax'"),
        ({"sms": {"transport": "webhook", "secret_env": "X"}}, "needs `url`"),
        ({"sms": {"transport": "webhook", "url": "http://a.cn/x"}}, "secret_env"),
        ({"sms": {"transport": "webhook", "url": "ftp://a.cn/x", "secret_env": "X"}}, "http"),
        ({"sms": {"transport": "webhook", "url": "http://a.cn", "secret_env": "x y"}}, "pattern"),
        ({"sms": {"transport": "smtp", "host": "h", "sender": "s"}}, "cannot use transport"),
        ({"email": {"transport": "smtp"}}, "`host` and `sender`"),
        (
            {
                "push": {
                    "transport": "webhook",
                    "url": "http://a.cn",
                    "secret_env": "X",
                    "rate_per_second": 0,
                }
            },
            "greater than 0",
        ),
    ],
)
def test_bad_channel_definitions_are_refused(channels: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ProjectConfig.model_validate({**BASE, "channels": channels})


def test_channel_and_global_control_definitions_load_with_file_and_line(tmp_path: Path) -> None:
    from closedloop.core.definitions import load_project
    from closedloop.core.errors import DefinitionError

    (tmp_path / "identity.yaml").write_text(
        "types: [{name: member_id, priority: 100, strong: true, paths: [user_id]}]\n"
    )
    (tmp_path / "closedloop.yaml").write_text(
        "name: p\n"
        "sources: [{name: web, channel: web, write_key: wk_web_123456}]\n"
        "global_control: {share: 0.05}\n"
        "channels:\n"
        "  sms:\n"
        "    transport: webhook\n"
        "    url: https://sms.example.cn/send\n"
        "    secret_env: SMS_SECRET\n"
        "    rate_per_second: 50\n"
    )
    p = load_project(tmp_path)
    assert p.config.channels[Channel.SMS].rate_per_second == 50
    assert p.config.global_control is not None and p.config.global_control.share == 0.05
    (tmp_path / "closedloop.yaml").write_text(
        "name: p\n"
        "sources: [{name: web, channel: web, write_key: wk_web_123456}]\n"
        "global_control: {share: 0.5}\n"
        "channels:\n"
        "  telegram: {transport: outbox}\n"
    )
    with pytest.raises(DefinitionError) as e:
        load_project(tmp_path)
    text = str(e.value)
    assert "closedloop.yaml:3 [global_control.share]" in text
    assert "closedloop.yaml:5 [channels.telegram" in text and "'telegram'" in text


def test_a_transport_unfit_for_its_channel_names_the_key(tmp_path: Path) -> None:
    from closedloop.core.definitions import load_project
    from closedloop.core.errors import DefinitionError

    (tmp_path / "identity.yaml").write_text(
        "types: [{name: member_id, priority: 100, strong: true, paths: [user_id]}]\n"
    )
    (tmp_path / "closedloop.yaml").write_text(
        "name: p\n"
        "sources: [{name: web, channel: web, write_key: wk_web_123456}]\n"
        "channels:\n"
        "  sms: {transport: smtp, host: h, sender: s}\n"
    )
    with pytest.raises(DefinitionError) as e:
        load_project(tmp_path)
    assert "closedloop.yaml:3 [channels]" in str(e.value)
    assert "cannot use transport 'smtp'" in str(e.value)


_CRASH = """
import os, sys
from pathlib import Path
from closedloop.activate.channels import deliver
from closedloop.activate.channels.handoff import HandoffChannel
from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from datetime import datetime
d = Path(sys.argv[1])
sent = []
def crash(status):
    sent.append(status)
    if len(sent) == int(sys.argv[2]):
        os._exit(3)  # a hard crash: no finally, no commit
with Engine("duckdb:///" + str(d / "w.duckdb")) as e:
    ch = HandoffChannel("push", d / "handoff")
    deliver(e, d / "outbox", ch, clock=Clock(datetime.fromisoformat(sys.argv[3])), checkpoint=crash)
"""


@pytest.mark.parametrize("crash_after", [1, 7])
def test_a_hard_crash_mid_run_sends_nothing_twice(tmp_path: Path, crash_after: int) -> None:
    import subprocess
    import sys

    url = "duckdb:///" + str(tmp_path / "w.duckdb")
    with Engine(url) as e:
        set_profiles(
            e,
            [
                {"customer_id": f"c{i:02d}", "name": f"N{i}", "consent_marketing": True}
                for i in range(20)
            ],
        )
        evaluate_segment(e, EVERYONE, Fields(), Clock(NOW))
        run_campaign(
            e, campaign("push"), outbox_dir=tmp_path / "outbox", occasion="o", clock=Clock(NOW)
        )
        n = len(_outbox(tmp_path))
    assert n > crash_after
    r = subprocess.run(
        [sys.executable, "-c", _CRASH, str(tmp_path), str(crash_after), NOW.isoformat()],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 3, r.stderr
    handed = (tmp_path / "handoff" / "push.jsonl").read_text().splitlines()
    assert len(handed) == crash_after
    assert (tmp_path / "outbox" / ".push.attempts.jsonl").exists()  # journaled, not committed
    with Engine(url) as e:
        assert e.count("message_attempts") == 0
        run = deliver(
            e, tmp_path / "outbox", HandoffChannel("push", tmp_path / "handoff"), clock=Clock(NOW)
        )
        assert run.already_done == crash_after and run.delivered == n - crash_after
        handed = (tmp_path / "handoff" / "push.jsonl").read_text().splitlines()
        ids = [json.loads(x)["message_id"] for x in handed]
        assert len(ids) == len(set(ids)) == n  # everyone once, nobody twice
        assert e.count("message_attempts") == n
        # The crashed run's sends came back as events too.
        assert len(events(e, "Message Sent")) == n
    assert not (tmp_path / "outbox" / ".push.attempts.jsonl").exists()
