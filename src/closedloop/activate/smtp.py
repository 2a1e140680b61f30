"""``deliver_email``: the e-mail channel's delivery run, kept as a function of its own.

``run_campaign`` decides and writes messages to the file outbox; this reads the outbox's due
e-mail messages and hands them to an SMTP server — through the one delivery loop every
channel shares (``activate.channels.dispatch.deliver``: each message at most once once
delivered or bounced, attempts journaled and recorded in ``message_attempts``, retries up to
``max_attempts``, pacing) with the SMTP transport (``activate.channels.email``). Every message
carries a stable ``Message-ID`` (from its delivery) by which receivers drop a rare duplicate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from closedloop.activate.channels.dispatch import deliver, outbox_messages
from closedloop.activate.channels.email import SmtpChannel, SmtpSettings, email_of
from closedloop.core.clock import Clock
from closedloop.core.engine import Engine

__all__ = ["SmtpRun", "SmtpSettings", "deliver_email", "email_of", "outbox_messages"]


@dataclass(frozen=True)
class SmtpRun:
    delivered: int
    bounced: int
    failed: int
    already_done: int
    not_due: int
    gave_up: int


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
    a new sending domain). No feedback events: ``closedloop campaign deliver`` adds them.
    """
    run = deliver(
        engine,
        outbox_dir,
        SmtpChannel(settings, clock=clock),
        clock=clock,
        max_attempts=max_attempts,
        rate_per_second=max_per_second,
        feedback=False,
        checkpoint=checkpoint,
    )
    return SmtpRun(
        delivered=run.delivered,
        bounced=run.bounced,
        failed=run.failed,
        already_done=run.already_done,
        not_due=run.not_due,
        gave_up=run.gave_up,
    )
