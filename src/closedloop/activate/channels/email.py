"""E-mail over SMTP behind the Channel protocol (standard library ``smtplib``).

One connection is kept for a delivery run and reopened after a connection error; a 5xx
refusal is ``bounced`` (permanent), a 4xx or a broken connection ``failed`` (retried by a
later run). The Message-ID is stable per message so receivers drop a rare duplicate.
"""

from __future__ import annotations

import os
import smtplib
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from closedloop.activate.channels.base import Attempt, SendResult
from closedloop.core.clock import Clock
from closedloop.core.definitions import ChannelConfig
from closedloop.core.errors import ClosedloopError


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


def smtp_settings(config: ChannelConfig) -> SmtpSettings:
    """Settings from a channel definition; the password comes from ``password_env``."""
    if config.host is None or config.sender is None:
        raise ClosedloopError("an smtp channel needs `host` and `sender`")
    password = os.environ.get(config.password_env) if config.password_env else None
    return SmtpSettings(
        host=config.host,
        port=config.port,
        sender=config.sender,
        username=config.username,
        password=password,
        starttls=config.starttls,
        timeout=config.timeout_seconds,
    )


class SmtpChannel:
    name = "email"

    def __init__(self, settings: SmtpSettings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or Clock()
        self.client: smtplib.SMTP | None = None

    def send(
        self, message: dict[str, Any], *, attempts_left: int, pace: Callable[[], None]
    ) -> SendResult:
        pace()
        status, error = "delivered", None
        try:
            if self.client is None:
                self.client = _connect(self.settings)
            refused = self.client.send_message(email_of(message, self.settings))
            if refused:
                code, text = next(iter(refused.values()))
                status, error = _classify(code, text)
        except smtplib.SMTPRecipientsRefused as e:
            code, text = next(iter(e.recipients.values()))
            status, error = _classify(code, text)
        except smtplib.SMTPResponseException as e:
            status, error = _classify(e.smtp_code, e.smtp_error)
            if status == "failed":
                self.close()
        except (OSError, smtplib.SMTPException) as e:
            status, error = "failed", f"{type(e).__name__}: {e}"
            self.close()
        return SendResult([Attempt(status, error, self.clock.now())])

    def close(self) -> None:
        _drop(self.client)
        self.client = None
