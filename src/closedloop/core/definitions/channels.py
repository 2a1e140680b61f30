"""How each channel's messages leave: SMTP, a signed webhook, a staff task, or the file outbox.

Configured per channel in ``closedloop.yaml`` under ``channels:``; a channel not configured
stays in the file outbox (nothing leaves). Secrets are never written in the YAML: a webhook
names the environment variable that holds its signing secret (``secret_env``).

Outbound URLs are checked again at send time against private, loopback and link-local
ranges (see ``activate.channels.webhook``); ``allowed_hosts`` is the explicit exception.
"""

from __future__ import annotations

import re
from enum import StrEnum
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from closedloop.core.definitions.base import Definition
from closedloop.core.definitions.policy import Channel

ENV_NAME = r"^[A-Z_][A-Z0-9_]*$"


class Transport(StrEnum):
    SMTP = "smtp"
    WEBHOOK = "webhook"
    STAFF_TASK = "staff_task"
    OUTBOX = "outbox"


#: Which transports make sense for which channel.
TRANSPORTS: dict[Channel, frozenset[Transport]] = {
    Channel.EMAIL: frozenset({Transport.SMTP, Transport.WEBHOOK, Transport.OUTBOX}),
    Channel.SMS: frozenset({Transport.WEBHOOK, Transport.OUTBOX}),
    Channel.WECHAT: frozenset({Transport.WEBHOOK, Transport.OUTBOX}),
    Channel.PUSH: frozenset({Transport.WEBHOOK, Transport.OUTBOX}),
    Channel.STAFF_TASK: frozenset({Transport.STAFF_TASK, Transport.OUTBOX}),
    Channel.OUTBOX: frozenset({Transport.OUTBOX}),
}


class ChannelConfig(Definition):
    """One channel's transport and its limits."""

    transport: Transport
    rate_per_second: float | None = Field(None, gt=0, description="send-rate limit")
    max_attempts: int = Field(5, ge=1, le=20, description="per message, across runs")
    timeout_seconds: float = Field(10.0, gt=0, le=120)
    # webhook
    url: str | None = None
    secret_env: str | None = Field(None, pattern=ENV_NAME)
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="hosts allowed although they resolve to private/loopback addresses",
    )
    backoff_seconds: float = Field(0.5, ge=0, le=60, description="first retry delay; doubles")
    address_id_type: str | None = Field(
        None, description="send to this identifier of the person (e.g. wechat_openid)"
    )
    # smtp
    host: str | None = None
    port: int = Field(25, ge=1, le=65535)
    sender: str | None = None
    username: str | None = None
    password_env: str | None = Field(None, pattern=ENV_NAME)
    starttls: bool = False
    # staff tasks
    owner_trait: str | None = Field(
        None, description="computed trait holding the person's shopping guide / sales owner"
    )

    @model_validator(mode="after")
    def _check(self) -> ChannelConfig:
        t = self.transport
        if t is Transport.WEBHOOK:
            if not self.url:
                raise ValueError("a webhook channel needs `url`")
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"webhook url {self.url!r} must be http(s)://host/...")
            if not self.secret_env:
                raise ValueError(
                    "a webhook channel needs `secret_env`: the environment variable holding "
                    "its signing secret"
                )
        elif self.url or self.secret_env:
            raise ValueError(f"`url` and `secret_env` are for webhooks, not {t.value}")
        if t is Transport.SMTP and not (self.host and self.sender):
            raise ValueError("an smtp channel needs `host` and `sender`")
        for h in self.allowed_hosts:
            if not re.fullmatch(r"[A-Za-z0-9.\-:\[\]]+", h):
                raise ValueError(f"allowed_hosts: {h!r} is not a host name or address")
        return self


def check_channels(channels: dict[Channel, ChannelConfig]) -> None:
    """Each channel's transport must suit it (an SMS cannot go over SMTP)."""
    for ch, cfg in channels.items():
        if cfg.transport not in TRANSPORTS[ch]:
            ok = ", ".join(sorted(t.value for t in TRANSPORTS[ch]))
            raise ValueError(
                f"channel {ch.value!r} cannot use transport {cfg.transport.value!r} "
                f"(use one of: {ok})"
            )
