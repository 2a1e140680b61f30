"""Channels: how a campaign's decided messages leave closedloop.

``run_campaign`` decides and writes messages to the file outbox; ``deliver`` hands a
channel's due messages to its transport — SMTP e-mail, signed webhooks (SMS, WeChat
template messages, push), staff tasks, or a hand-off file — as configured under
``channels:`` in ``closedloop.yaml``, and brings the outcomes back as events.
"""

from __future__ import annotations

from pathlib import Path

from closedloop.activate.channels.base import Attempt, Channel, Pacer, SendResult
from closedloop.activate.channels.dispatch import DeliveryRun, deliver
from closedloop.core.clock import Clock
from closedloop.core.definitions import Channel as ChannelName
from closedloop.core.definitions import ChannelConfig, Transport
from closedloop.core.engine import Engine

__all__ = [
    "Attempt",
    "Channel",
    "DeliveryRun",
    "Pacer",
    "SendResult",
    "deliver",
    "deliver_channel",
    "open_channel",
]


def open_channel(
    engine: Engine,
    name: ChannelName,
    config: ChannelConfig | None,
    *,
    handoff_dir: Path,
    clock: Clock | None = None,
) -> Channel:
    """The transport a channel is configured with (no configuration: the hand-off file)."""
    if config is not None and config.transport is Transport.WEBHOOK:
        from closedloop.activate.channels.webhook import WebhookChannel

        return WebhookChannel(name.value, config, clock=clock)
    if config is not None and config.transport is Transport.SMTP:
        from closedloop.activate.channels.email import SmtpChannel, smtp_settings

        return SmtpChannel(smtp_settings(config), clock=clock)
    if config is not None and config.transport is Transport.STAFF_TASK:
        from closedloop.activate.channels.staff import StaffTaskChannel

        return StaffTaskChannel(engine, config.owner_trait, clock=clock)
    from closedloop.activate.channels.handoff import HandoffChannel

    return HandoffChannel(name.value, handoff_dir, clock=clock)


def deliver_channel(
    engine: Engine,
    name: ChannelName,
    config: ChannelConfig | None,
    *,
    outbox_dir: Path,
    handoff_dir: Path,
    clock: Clock | None = None,
) -> DeliveryRun:
    """Deliver one channel's due messages with its configured transport and limits."""
    ch = open_channel(engine, name, config, handoff_dir=handoff_dir, clock=clock)
    return deliver(
        engine,
        outbox_dir,
        ch,
        clock=clock,
        max_attempts=config.max_attempts if config is not None else 5,
        rate_per_second=config.rate_per_second if config is not None else None,
        address_id_type=config.address_id_type if config is not None else None,
    )
