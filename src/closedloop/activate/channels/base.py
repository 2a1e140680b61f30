"""The Channel protocol: hand one outbox message to a provider and say what happened.

A channel knows one transport (SMTP, a signed webhook, a staff-task table, a hand-off file);
``dispatch.deliver`` does everything channels share — which messages are due, which were
already delivered, pacing to the channel's send rate, the attempt log and the feedback
events — so an adapter is small and the exactly-once rules are written once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

FINAL = ("delivered", "bounced")


@dataclass(frozen=True)
class Attempt:
    """One hand-over: ``delivered`` (accepted), ``bounced`` (permanent) or ``failed`` (retry)."""

    status: str
    error: str | None
    at: datetime


@dataclass(frozen=True)
class SendResult:
    """Every attempt made for one message in one call (a webhook retries within the call)."""

    attempts: list[Attempt] = field(default_factory=list)
    provider_id: str | None = None

    @property
    def status(self) -> str:
        return self.attempts[-1].status if self.attempts else "failed"


class Channel(Protocol):
    """A transport for one channel's messages (see the module docstring)."""

    name: str

    def send(
        self, message: dict[str, Any], *, attempts_left: int, pace: Callable[[], None]
    ) -> SendResult:
        """Hand ``message`` (an outbox line) over in at most ``attempts_left`` attempts.

        ``pace()`` is called before every attempt (the channel's send-rate limit).
        """
        ...

    def close(self) -> None:
        """Release connections; called once after a delivery run."""
        ...


class Pacer:
    """Spaces calls evenly at a given rate (monotonic clock; no burst beyond one call).

    This is the channel's send-rate limit: attempt k starts no earlier than k / rate seconds
    after the first, retries included (a provider counts every request).
    """

    def __init__(self, per_second: float | None) -> None:
        if per_second is not None and per_second <= 0:
            raise ValueError("rate_per_second must be positive")
        self.interval = 1.0 / per_second if per_second else 0.0
        self.next = 0.0

    def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        if self.next > now:
            time.sleep(self.next - now)
        self.next = max(now, self.next) + self.interval
