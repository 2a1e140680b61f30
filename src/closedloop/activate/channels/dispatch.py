"""Delivering a channel's due outbox messages through its transport, each at most once.

The rules every channel shares, written once:

* a message with a ``delivered`` or ``bounced`` attempt in ``message_attempts`` is never
  handed over again (a restart re-sends nothing already delivered);
* a message is due when its ``sent_at`` (after quiet hours) has come;
* at most ``max_attempts`` attempts per message, across runs (a webhook's in-call retries
  count); after that the message is given up;
* every attempt is recorded right after the transport's answer, then the run's attempts come
  back into ``events`` as ``Message Sent`` / ``Message Bounced`` / ``Message Failed`` through
  collect's gate (``activate.feedback``);
* the channel's send-rate limit paces every attempt.

For WeChat and similar channels the address is an identifier of the person
(``address_id_type``, e.g. ``wechat_openid``), looked up in the identity map at send time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from closedloop.activate import tables as _tables  # noqa: F401  (declares message_attempts)
from closedloop.activate.channels.base import FINAL, Channel, Pacer, SendResult
from closedloop.activate.smtp import outbox_messages
from closedloop.core.clock import Clock
from closedloop.core.engine import Engine


@dataclass(frozen=True)
class DeliveryRun:
    channel: str
    delivered: int
    bounced: int
    failed: int
    already_done: int
    not_due: int
    gave_up: int
    attempts: int
    events: int  # feedback events accepted into `events`


def deliver(
    engine: Engine,
    outbox_dir: Path,
    channel: Channel,
    *,
    clock: Clock | None = None,
    max_attempts: int = 5,
    rate_per_second: float | None = None,
    address_id_type: str | None = None,
    feedback: bool = True,
    checkpoint: Callable[[str], None] | None = None,
) -> DeliveryRun:
    """Hand every due, not yet delivered message of ``channel.name`` to ``channel``."""
    clk = clock or Clock()
    now = clk.now()
    pace = Pacer(rate_per_second)
    hook = checkpoint or (lambda _: None)
    a = engine.table("message_attempts")
    history = a.filter(a.channel == channel.name).select("message_id", "status")
    done: set[str] = set()
    tries: dict[str, int] = {}
    for r in history.to_pyarrow().to_pylist():
        tries[r["message_id"]] = tries.get(r["message_id"], 0) + 1
        if r["status"] in FINAL:
            done.add(r["message_id"])
    counts = dict.fromkeys(("delivered", "bounced", "failed", "already", "not_due", "gave_up"), 0)
    due: list[dict[str, Any]] = []
    for m in outbox_messages(outbox_dir, channel.name):
        mid = str(m["message_id"])
        if mid in done:
            counts["already"] += 1
        elif datetime.fromisoformat(m["sent_at"]) > now:
            counts["not_due"] += 1
        elif tries.get(mid, 0) >= max_attempts:
            counts["gave_up"] += 1
        else:
            due.append(m)
    if address_id_type is not None:
        _resolve_addresses(engine, due, address_id_type)
    prepare = getattr(channel, "prepare", None)
    if prepare is not None:
        prepare(due)
    recorded: list[dict[str, Any]] = []
    try:
        for m in due:
            mid = str(m["message_id"])
            before = tries.get(mid, 0)
            if m.get("address") is None:  # no identifier of the kind the channel needs
                result = _no_address(m, address_id_type, clk)
            else:
                result = channel.send(m, attempts_left=max_attempts - before, pace=pace.wait)
            rows = _attempt_rows(m, result, before)
            engine.append("message_attempts", pa.Table.from_pylist(rows, schema=_SCHEMA))
            recorded.extend(rows)
            tries[mid] = before + len(rows)
            counts[result.status] += 1
            hook(result.status)
    finally:
        channel.close()
    events = 0
    if feedback and recorded:
        from closedloop.activate.feedback import attempt_events

        events = attempt_events(engine, recorded, clock=clk).accepted
    return DeliveryRun(
        channel=channel.name,
        delivered=counts["delivered"],
        bounced=counts["bounced"],
        failed=counts["failed"],
        already_done=counts["already"],
        not_due=counts["not_due"],
        gave_up=counts["gave_up"],
        attempts=len(recorded),
        events=events,
    )


def _no_address(m: dict[str, Any], id_type: str | None, clock: Clock) -> SendResult:
    from closedloop.activate.channels.base import Attempt

    why = f"no {id_type} known for {m.get('customer_id')}" if id_type else "no address"
    return SendResult([Attempt("bounced", why, clock.now())])


def _resolve_addresses(engine: Engine, messages: list[dict[str, Any]], id_type: str) -> None:
    """Replace each message's address by the person's most recent ``id_type`` identifier."""
    from closedloop.identity import tables as _identity  # noqa: F401  (declares identity_map)

    ids = sorted({str(m["customer_id"]) for m in messages})
    if not ids:
        return
    t = engine.table("identity_map")
    rows = (
        t.filter((t.id_type == id_type) & t.customer_id.isin(ids) & ~t.quarantined)
        .order_by(["customer_id", "last_seen", "id_value"])
        .select("customer_id", "id_value")
        .to_pyarrow()
        .to_pylist()
    )
    latest = {r["customer_id"]: r["id_value"] for r in rows}  # ordered: the last one wins
    for m in messages:
        m["address"] = latest.get(str(m["customer_id"]))


def _attempt_rows(m: dict[str, Any], result: SendResult, before: int) -> list[dict[str, Any]]:
    return [
        {
            "message_id": str(m["message_id"]),
            "attempt": before + k + 1,
            "delivery_id": m.get("delivery_id"),
            "campaign": m.get("campaign"),
            "customer_id": m.get("customer_id"),
            "channel": m.get("channel"),
            "address": None if m.get("address") is None else str(m["address"]),
            "status": a.status,
            "error": a.error,
            "attempted_at": a.at,
        }
        for k, a in enumerate(result.attempts)
    ]


_SCHEMA = pa.schema(
    [
        ("message_id", pa.string()),
        ("attempt", pa.int32()),
        ("delivery_id", pa.string()),
        ("campaign", pa.string()),
        ("customer_id", pa.string()),
        ("channel", pa.string()),
        ("address", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("attempted_at", pa.timestamp("us", tz="UTC")),
    ]
)
