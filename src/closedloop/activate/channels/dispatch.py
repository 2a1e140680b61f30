"""Delivering a channel's due outbox messages through its transport, each at most once.

The rules every channel shares, written once:

* a message with a ``delivered`` or ``bounced`` attempt in ``message_attempts`` is never
  handed over again (a restart re-sends nothing already delivered);
* a message is due when its ``sent_at`` (after quiet hours) has come;
* at most ``max_attempts`` attempts per message, across runs (a webhook's in-call retries
  count); after that the message is given up;
* every attempt is recorded right after the transport's answer — first as a line in the
  channel's attempt journal (``OUTBOX/.CHANNEL.attempts.jsonl``, written and flushed per
  message: a process that dies loses nothing the OS has), then in batches of ``batch``
  messages into ``message_attempts`` (journal fsynced → rows appended → journal emptied; a
  crash in between is repaired at the next start by replaying the journal, anti-joined on
  the attempt key). One warehouse write per message would cap a channel at a few dozen
  messages a second; the journal keeps the exactly-once rule at thousands;
* the run's attempts come back into ``events`` as ``Message Sent`` / ``Message Bounced`` /
  ``Message Failed`` through collect's gate (``activate.feedback``);
* the channel's send-rate limit paces every attempt.

For WeChat and similar channels the address is an identifier of the person
(``address_id_type``, e.g. ``wechat_openid``), looked up in the identity map at send time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import pyarrow as pa

from closedloop.activate import tables as _tables  # noqa: F401  (declares message_attempts)
from closedloop.activate.channels.base import FINAL, Channel, Pacer, SendResult
from closedloop.core.clock import Clock
from closedloop.core.engine import Engine


def outbox_messages(outbox_dir: Path, channel: str = "email") -> Iterator[dict[str, Any]]:
    """Every message of ``channel`` in the outbox (all campaigns, all occasions), in file order."""
    for f in sorted(outbox_dir.glob("*/*.jsonl")):
        with f.open(encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    m = json.loads(line)
                    if m.get("channel") == channel:
                        yield m


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
    batch: int = 500,
) -> DeliveryRun:
    """Hand every due, not yet delivered message of ``channel.name`` to ``channel``."""
    clk = clock or Clock()
    now = clk.now()
    pace = Pacer(rate_per_second)
    hook = checkpoint or (lambda _: None)
    journal = _Journal(engine, outbox_dir / f".{channel.name}.attempts.jsonl")
    recorded: list[dict[str, Any]] = journal.replay()  # a crashed run's last attempts
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
    try:
        for m in due:
            mid = str(m["message_id"])
            before = tries.get(mid, 0)
            if m.get("address") is None:  # no identifier of the kind the channel needs
                result = _no_address(m, address_id_type, clk)
            else:
                result = channel.send(m, attempts_left=max_attempts - before, pace=pace.wait)
            rows = _attempt_rows(m, result, before)
            journal.write(rows)
            if journal.pending >= batch:
                journal.commit()
            recorded.extend(rows)
            tries[mid] = before + len(rows)
            counts[result.status] += 1
            hook(result.status)
    finally:
        channel.close()
        journal.commit()
        journal.close()
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


class _Journal:
    """The attempt journal of one channel (see the module docstring)."""

    def __init__(self, engine: Engine, path: Path) -> None:
        self.engine = engine
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.file: IO[str] | None = None

    @property
    def pending(self) -> int:
        return len(self.rows)

    def replay(self) -> list[dict[str, Any]]:
        """Append what a crashed run journaled but did not commit; return those rows."""
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except ValueError:  # a line cut short by the crash: its send is not recorded
                continue
            r["attempted_at"] = datetime.fromisoformat(r["attempted_at"])
            rows.append(r)
        new = self._append(rows)
        self.path.unlink()
        return new

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a", encoding="utf-8")
        for r in rows:
            self.file.write(json.dumps(r, default=_iso) + "\n")
        self.file.flush()
        self.rows.extend(rows)

    def commit(self) -> None:
        """Journal durable → rows in ``message_attempts`` → journal emptied."""
        if not self.rows or self.file is None:
            return
        os.fsync(self.file.fileno())
        self._append(self.rows)
        self.file.seek(0)
        self.file.truncate()
        self.file.flush()
        self.rows = []

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
            if self.path.exists() and self.path.stat().st_size == 0:
                self.path.unlink()

    def _append(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append rows not yet stored (by message id and attempt); return the new ones."""
        if not rows:
            return []
        data = pa.Table.from_pylist(rows, schema=_SCHEMA)
        with self.engine.temporary(data) as t:
            stored = self.engine.table("message_attempts")
            fresh = t.anti_join(stored, ["message_id", "attempt"]).to_pyarrow()
        if fresh.num_rows:
            self.engine.append("message_attempts", fresh)
        out: list[dict[str, Any]] = fresh.to_pylist()
        return out


def _iso(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot journal {type(value).__name__}")
