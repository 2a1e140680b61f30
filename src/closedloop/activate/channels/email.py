"""E-mail over SMTP behind the Channel protocol (the message building of ``activate.smtp``).

One connection is kept for a delivery run and reopened after a connection error; a 5xx
refusal is ``bounced`` (permanent), a 4xx or a broken connection ``failed`` (retried by a
later run). The Message-ID is stable per message so receivers drop a rare duplicate.
"""

from __future__ import annotations

import os
import smtplib
from collections.abc import Callable
from typing import Any

from closedloop.activate.channels.base import Attempt, SendResult
from closedloop.activate.smtp import SmtpSettings, _classify, _connect, _drop, email_of
from closedloop.core.clock import Clock
from closedloop.core.definitions import ChannelConfig
from closedloop.core.errors import ClosedloopError


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
