"""Replaying failed events: after a definition is fixed, send kept rejections through again.

Each selected ``failed_events`` row's payload is parsed again (a whole refused request is
replayed message by message) and offered to the same gate, under the source it was kept
for. Accepted messages are written by ``Intake`` — so a message already in ``events`` is a
duplicate, never a second copy — and the rows they came from are then removed from
``failed_events``. A row whose messages are still refused stays, with its original reason.

The order (events first, then the removal) makes a crash harmless: replaying again finds
the messages already stored, counts them as duplicates, and removes the rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from typing import Any

from closedloop.collect.loader import Intake
from closedloop.collect.messages import AcceptedMessage, check_message
from closedloop.collect.tracking_plan import Mode, TrackingPlan
from closedloop.core.clock import Clock
from closedloop.core.definitions import Source
from closedloop.core.engine import Engine


@dataclass(frozen=True)
class ReplayResult:
    """Rows looked at, rows resolved (removed from failed events), rows left, and messages."""

    rows: int
    resolved: int
    still_failing: int
    skipped_unknown_source: int
    accepted: int
    duplicate: int


def _messages(payload: str) -> list[Any] | None:
    """The messages a payload holds: one message, or a batch's; None if it is not JSON."""
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, dict) and isinstance(value.get("batch"), list):
        shared = {k: value[k] for k in ("context", "sentAt") if k in value}
        out: list[Any] = []
        for m in value["batch"]:
            if isinstance(m, dict) and "context" in shared and isinstance(m.get("context"), dict):
                m = {**m, "context": {**shared["context"], **m["context"]}}
            out.append(m)
        return out
    if isinstance(value, dict):
        value.pop("writeKey", None)
    return [value]


def replay_failed(
    engine: Engine,
    sources: list[Source],
    *,
    source: str | None = None,
    reason: str | None = None,
    failure_ids: list[str] | None = None,
    to_source: str | None = None,
    clock: Clock | None = None,
    plans: dict[str, TrackingPlan] | None = None,
) -> ReplayResult:
    """Replay the failed events selected by source, reason code and/or ids.

    ``to_source`` replays rows kept under an unknown source (a bad write key) as that
    source; without it such rows are skipped. ``plans`` are the sources' tracking plans as
    they are now: a message that still breaks an enforced plan stays failed.
    """
    plans = plans or {}
    clock = clock or Clock()
    by_name = {s.name: s for s in sources}
    t = engine.table("failed_events")
    if source is not None:
        t = t.filter(t.source == source)
    if reason is not None:
        t = t.filter(t.reason_code == reason)
    if failure_ids:
        t = t.filter(t.failure_id.isin(failure_ids))
    rows: list[dict[str, Any]] = engine.to_arrow(
        t.order_by(["failed_at", "failure_id"])
    ).to_pylist()
    resolved: list[str] = []
    skipped = accepted = duplicate = 0
    intakes: dict[str, Intake] = {}
    for row in rows:
        target = by_name.get(to_source or row["source"])
        if target is None:
            skipped += 1
            continue
        messages = _messages(row["payload"] or "")
        if not messages:
            continue
        now = clock.now()
        verdicts = [check_message(m, target, now) for m in messages]
        if not all(isinstance(v, AcceptedMessage) for v in verdicts):
            continue
        plan = plans.get(target.name)
        if (
            plan is not None
            and plan.mode is not Mode.ALLOW
            and any(isinstance(m, dict) and plan.violation(m) for m in messages)
        ):
            continue  # still breaks the source's plan
        intake = intakes.get(target.name)
        if intake is None:
            intake = Intake(
                engine, target, import_name="replay", location="failed_events", clock=clock
            )
            intakes[target.name] = intake
        builder = intake.builder()
        for i, m in enumerate(messages):
            builder.offer(m, f"replay:{row['failure_id']}#", i, partial(json.dumps, m))
        before = intake.accepted, intake.duplicate
        intake.write(builder.take())
        accepted += intake.accepted - before[0]
        duplicate += intake.duplicate - before[1]
        resolved.append(row["failure_id"])
    for intake in intakes.values():
        intake.finish()
    if resolved:
        stored = engine.table("failed_events")
        keep = stored.filter(~stored.failure_id.isin(resolved))
        engine.replace("failed_events", keep)
    return ReplayResult(
        rows=len(rows),
        resolved=len(resolved),
        still_failing=len(rows) - len(resolved) - skipped,
        skipped_unknown_source=skipped,
        accepted=accepted,
        duplicate=duplicate,
    )
