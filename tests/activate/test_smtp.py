"""The e-mail channel against a real SMTP server on loopback (aiosmtpd in a thread)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from closedloop.activate.campaign import run_campaign
from closedloop.activate.smtp import SmtpSettings, deliver_email
from closedloop.core.clock import Clock
from closedloop.core.definitions import CampaignDef, ContactPolicy, SegmentDef
from closedloop.core.engine import Engine
from closedloop.segments.audience import Fields, evaluate_segment
from tests.segments.test_audience import set_profiles

NOW = datetime(2026, 11, 20, 3, 0, tzinfo=UTC)  # 11:00 in Shanghai, 03:00 in London
CAMPAIGN = CampaignDef.model_validate(
    {
        "name": "promo",
        "audience": "everyone",
        "channel": "email",
        "holdout": 0.2,
        "subject": "Hi {{ name }}",
        "template": "Hello {{ name }}, 10% off.",
    }
)
EVERYONE = SegmentDef.model_validate(
    {"name": "everyone", "where": {"trait": "customer_id", "op": "not_null"}}
)
# London is asleep at 03:00: its people are postponed to 09:00 local.
POLICY = ContactPolicy.model_validate({"quiet_hours": {"start": "21:00", "end": "09:00"}})


class Inbox:
    """An aiosmtpd handler keeping what it accepts; addresses in ``refuse`` get a 550."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.refuse: set[str] = set()
        self.busy = False

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address in self.refuse:
            return "550 5.1.1 no such user"
        if self.busy:
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 Message accepted for delivery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, SmtpSettings]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, SmtpSettings(host="127.0.0.1", port=port, sender="shop@brand.cn")
    finally:
        controller.stop()


@pytest.fixture
def sent(engine: Engine, tmp_path: Path) -> Engine:
    rows: list[dict[str, object]] = [
        {
            "customer_id": f"c{i:02d}",
            "name": f"N{i}",
            "email": f"p{i}@x.cn",
            "consent_marketing": True,
            "timezone": "Europe/London" if i % 4 == 0 else "Asia/Shanghai",
        }
        for i in range(40)
    ]
    set_profiles(engine, rows)
    evaluate_segment(engine, EVERYONE, Fields(), Clock(NOW))
    run_campaign(
        engine, CAMPAIGN, outbox_dir=tmp_path, occasion="o", clock=Clock(NOW), policy=POLICY
    )
    return engine


def outbox_sent(engine: Engine) -> dict[str, Any]:
    d = engine.table("deliveries").to_pandas()
    return {r.message_id: r for r in d[d.status == "sent"].itertuples()}


def test_due_messages_are_delivered_once_and_the_rest_when_due(
    sent: Engine, tmp_path: Path, smtp: tuple[Inbox, SmtpSettings]
) -> None:
    inbox, settings = smtp
    expected = outbox_sent(sent)
    due = {m for m, r in expected.items() if r.send_at <= NOW}
    assert 0 < len(due) < len(expected)  # London's share waits for its morning
    run = deliver_email(sent, tmp_path, settings, clock=Clock(NOW))
    assert (run.delivered, run.not_due, run.failed) == (len(due), len(expected) - len(due), 0)
    got = {m["Message-ID"].strip("<>").split("@")[0]: m for m in inbox.messages}
    assert set(got) == due
    one = next(iter(due))
    assert got[one]["To"] == expected[one].address
    assert got[one]["Subject"].startswith("Hi N")
    assert "10% off" in got[one].get_payload()

    # A restart re-sends nothing already delivered.
    again = deliver_email(sent, tmp_path, settings, clock=Clock(NOW))
    assert (again.delivered, again.already_done) == (0, len(due))
    assert len(inbox.messages) == len(due)

    # At 09:00 in London the postponed ones go, once.
    later = deliver_email(sent, tmp_path, settings, clock=Clock(NOW + timedelta(hours=6)))
    assert later.delivered == len(expected) - len(due)
    assert sorted(m["Message-ID"] for m in inbox.messages) == sorted(
        {m["Message-ID"] for m in inbox.messages}
    )
    attempts = sent.table("message_attempts").to_pandas()
    assert set(attempts.status) == {"delivered"} and len(attempts) == len(expected)


def test_refusals_and_outages_are_recorded_and_retried_only_when_temporary(
    sent: Engine, tmp_path: Path, smtp: tuple[Inbox, SmtpSettings]
) -> None:
    inbox, settings = smtp
    expected = outbox_sent(sent)
    late = NOW + timedelta(hours=7)
    bad = sorted(r.address for r in expected.values())[0]
    inbox.refuse = {bad}
    inbox.busy = True  # everyone else gets a temporary 451
    first = deliver_email(sent, tmp_path, settings, clock=Clock(late))
    assert (first.bounced, first.failed, first.delivered) == (1, len(expected) - 1, 0)

    # The server is down: every attempt fails and is recorded, nothing is lost.
    down = SmtpSettings(host="127.0.0.1", port=free_port(), sender="shop@brand.cn", timeout=2)
    second = deliver_email(sent, tmp_path, down, clock=Clock(late))
    assert second.failed == len(expected) - 1 and second.bounced == 0

    inbox.busy = False
    third = deliver_email(sent, tmp_path, settings, clock=Clock(late))
    assert third.delivered == len(expected) - 1 and third.already_done == 1
    assert bad not in {m["To"] for m in inbox.messages}
    a = sent.table("message_attempts").to_pandas()
    assert (a[a.address == bad].status == "bounced").all() and len(a[a.address == bad]) == 1
    assert a.groupby("message_id").attempt.max().max() == 3
    assert a[a.status == "failed"].error.str.match(r"^(451|ConnectionRefusedError)").all()


def test_a_crash_mid_batch_resends_nothing_delivered(
    sent: Engine, tmp_path: Path, smtp: tuple[Inbox, SmtpSettings]
) -> None:
    inbox, settings = smtp
    late = NOW + timedelta(hours=7)
    seen = 0

    def crash(status: str) -> None:
        nonlocal seen
        seen += 1
        if seen == 5:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        deliver_email(sent, tmp_path, settings, clock=Clock(late), checkpoint=crash)
    assert len(inbox.messages) == 5
    rest = deliver_email(sent, tmp_path, settings, clock=Clock(late))
    total = len(outbox_sent(sent))
    assert rest.delivered == total - 5 and rest.already_done == 5
    ids = [m["Message-ID"] for m in inbox.messages]
    assert len(ids) == len(set(ids)) == total


def test_give_up_after_max_attempts(
    sent: Engine, tmp_path: Path, smtp: tuple[Inbox, SmtpSettings]
) -> None:
    inbox, settings = smtp
    inbox.busy = True
    late = NOW + timedelta(hours=7)
    for _ in range(2):
        deliver_email(sent, tmp_path, settings, clock=Clock(late), max_attempts=2)
    inbox.busy = False
    run = deliver_email(sent, tmp_path, settings, clock=Clock(late), max_attempts=2)
    assert run.delivered == 0 and run.gave_up == len(outbox_sent(sent))
    assert inbox.messages == []


def test_a_send_rate_limit_paces_the_hand_overs(
    sent: Engine, tmp_path: Path, smtp: tuple[Inbox, SmtpSettings]
) -> None:
    inbox, settings = smtp
    due = sum(1 for r in outbox_sent(sent).values() if r.send_at <= NOW)
    started = time.monotonic()
    run = deliver_email(sent, tmp_path, settings, clock=Clock(NOW), max_per_second=40)
    took = time.monotonic() - started
    assert run.delivered == len(inbox.messages) == due > 10
    assert took >= (due - 1) / 40
    with pytest.raises(ValueError, match="positive"):
        deliver_email(sent, tmp_path, settings, clock=Clock(NOW), max_per_second=0)
