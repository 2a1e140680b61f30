"""The e-mail channel: outbox messages delivered over SMTP, each at most once when it succeeded.

``run_campaign`` decides and writes messages to the file outbox; this channel reads the
outbox's e-mail messages that are due (their ``sent_at`` — the send time after quiet hours —
has come) and hands them to an SMTP server with the standard library's ``smtplib``.

Every attempt is a row in ``message_attempts``: ``delivered`` (the server accepted it),
``bounced`` (a permanent 5xx refusal: never retried) or ``failed`` (a connection problem or a
temporary 4xx: retried by the next run, up to ``max_attempts``). A message with a
``delivered`` or ``bounced`` row is never sent again, so a restart re-sends nothing already
delivered. The row is written right after the server's answer; a crash in the gap between
the two could re-send that single message on restart, and for that case every message
carries a stable ``Message-ID`` (from its delivery) by which receivers drop the duplicate.
"""

from __future__ import annotations

import json
import smtplib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pyarrow as pa

from closedloop.activate import tables as _tables  # noqa: F401  (declares message_attempts)
from closedloop.core.clock import Clock
from closedloop.core.engine import Engine

FINAL = ("delivered", "bounced")


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    sender: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    starttls: bool = False
    timeout: float = 10.0
    message_id_domain: str = "closedloop.local"


@dataclass(frozen=True)
class SmtpRun:
    delivered: int
    bounced: int
    failed: int
    already_done: int
    not_due: int
    gave_up: int


def outbox_messages(outbox_dir: Path, channel: str = "email") -> Iterator[dict[str, Any]]:
    """Every message of ``channel`` in the outbox (all campaigns, all occasions), in file order."""
    for f in sorted(outbox_dir.glob("*/*.jsonl")):
        with f.open(encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    m = json.loads(line)
                    if m.get("channel") == channel:
                        yield m


def email_of(m: dict[str, Any], settings: SmtpSettings) -> EmailMessage:
    """The RFC 5322 message for one outbox line; the Message-ID is stable across retries."""
    msg = EmailMessage()
    msg["From"] = settings.sender
    msg["To"] = str(m["address"])
    msg["Subject"] = m.get("subject") or ""
    msg["Message-ID"] = f"<{m['message_id']}@{settings.message_id_domain}>"
    msg["X-Closedloop-Campaign"] = str(m["campaign"])
    msg["X-Closedloop-Delivery"] = str(m["delivery_id"])
    msg.set_content(m.get("body") or "")
    return msg


def deliver_email(
    engine: Engine,
    outbox_dir: Path,
    settings: SmtpSettings,
    *,
    clock: Clock | None = None,
    max_attempts: int = 5,
    max_per_second: float | None = None,
    checkpoint: Callable[[str], None] | None = None,
) -> SmtpRun:
    """Send every due, not yet delivered e-mail in the outbox; record each attempt.

    ``max_per_second`` paces the hand-overs (a provider's send-rate limit, or a warm-up for
    a new sending domain): attempt k starts no earlier than k / rate seconds after the first.
    """
    now = (clock or Clock()).now()
    pace = _Pacer(max_per_second)
    hook = checkpoint or (lambda _: None)
    attempts = engine.table("message_attempts")
    history = attempts.select("message_id", "status").to_pyarrow().to_pylist()
    done = {r["message_id"] for r in history if r["status"] in FINAL}
    tries: dict[str, int] = {}
    for r in history:
        tries[r["message_id"]] = tries.get(r["message_id"], 0) + 1
    counts = dict.fromkeys(("delivered", "bounced", "failed", "already", "not_due", "gave_up"), 0)
    client: smtplib.SMTP | None = None
    try:
        for m in outbox_messages(outbox_dir):
            mid = str(m["message_id"])
            if mid in done:
                counts["already"] += 1
                continue
            if datetime.fromisoformat(m["sent_at"]) > now:
                counts["not_due"] += 1
                continue
            if tries.get(mid, 0) >= max_attempts:
                counts["gave_up"] += 1
                continue
            status, error = "delivered", None
            pace.wait()
            try:
                if client is None:
                    client = _connect(settings)
                refused = client.send_message(email_of(m, settings))
                if refused:
                    code, text = next(iter(refused.values()))
                    status, error = _classify(code, text)
            except smtplib.SMTPRecipientsRefused as e:
                code, text = next(iter(e.recipients.values()))
                status, error = _classify(code, text)
            except smtplib.SMTPResponseException as e:
                status, error = _classify(e.smtp_code, e.smtp_error)
                if status == "failed":
                    _drop(client)
                    client = None
            except (OSError, smtplib.SMTPException) as e:
                status, error = "failed", f"{type(e).__name__}: {e}"
                _drop(client)
                client = None
            _record(engine, m, status, error, tries.get(mid, 0) + 1, (clock or Clock()).now())
            tries[mid] = tries.get(mid, 0) + 1
            if status in FINAL:
                done.add(mid)
            counts[status] += 1
            hook(status)
    finally:
        _drop(client)
    return SmtpRun(
        delivered=counts["delivered"],
        bounced=counts["bounced"],
        failed=counts["failed"],
        already_done=counts["already"],
        not_due=counts["not_due"],
        gave_up=counts["gave_up"],
    )


class _Pacer:
    """Spaces calls evenly at a given rate (monotonic clock; no burst beyond one call)."""

    def __init__(self, per_second: float | None) -> None:
        if per_second is not None and per_second <= 0:
            raise ValueError("max_per_second must be positive")
        self.interval = 1.0 / per_second if per_second else 0.0
        self.next = 0.0

    def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        if self.next > now:
            time.sleep(self.next - now)
        self.next = max(now, self.next) + self.interval


def _connect(settings: SmtpSettings) -> smtplib.SMTP:
    client = smtplib.SMTP(settings.host, settings.port, timeout=settings.timeout)
    client.ehlo()
    if settings.starttls:
        client.starttls()
        client.ehlo()
    if settings.username:
        client.login(settings.username, settings.password or "")
    return client


def _drop(client: smtplib.SMTP | None) -> None:
    """Close a connection that may already be broken; a failed close changes nothing."""
    if client is not None:
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            client.close()


def _classify(code: int, text: bytes | str) -> tuple[str, str]:
    """5xx is a permanent refusal (bounced, never retried); anything else may be retried."""
    msg = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    return ("bounced" if 500 <= code < 600 else "failed"), f"{code} {msg}"


def _record(
    engine: Engine,
    m: dict[str, Any],
    status: str,
    error: str | None,
    attempt: int,
    at: datetime,
) -> None:
    engine.append(
        "message_attempts",
        pa.table(
            {
                "message_id": pa.array([str(m["message_id"])], pa.string()),
                "attempt": pa.array([attempt], pa.int32()),
                "delivery_id": pa.array([m.get("delivery_id")], pa.string()),
                "campaign": pa.array([m.get("campaign")], pa.string()),
                "customer_id": pa.array([m.get("customer_id")], pa.string()),
                "channel": pa.array([m.get("channel")], pa.string()),
                "address": pa.array([str(m.get("address"))], pa.string()),
                "status": pa.array([status], pa.string()),
                "error": pa.array([error], pa.string()),
                "attempted_at": pa.array([at], pa.timestamp("us", tz="UTC")),
            }
        ),
    )
