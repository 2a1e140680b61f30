"""Deliveries, bounces, failures, opens, clicks and replies back into ``events``.

The loop closes through ``collect``: every outcome of a message becomes a Segment ``track``
event that passes the same gate as any other input (``ChunkBuilder``/``Intake``: validated,
deduplicated by messageId, counted in ``loads``) under a dedicated internal source,
``closedloop_activate``. Triggers, the no-response rule and measurement then read them like
any behaviour:

==================  ====================================================================
``Message Sent``     a transport accepted the message (SMTP server, webhook 2xx, task)
``Message Bounced``  permanently refused (SMTP 5xx, webhook 4xx, no address)
``Message Failed``   an attempt failed and may be retried
``Message Delivered`` / ``Opened`` / ``Clicked`` / ``Replied``   reported by a provider
==================  ====================================================================

Each carries ``campaign``, ``variant``, ``channel``, ``message_id`` (ours),
``delivery_id`` and ``customer_id`` in its properties. Its messageId is derived from the
outcome (message id + attempt number, or + the provider's report), so replaying a callback
file or re-running a delivery stores nothing twice.

The person is named as other sources name them: ``userId`` is the member id when the
profile has one; otherwise one contact identifier (the channel's) goes in ``context.traits``
beside an anonymous id of that message alone, so the event is attributed to whoever holds
that identifier but never joins two identifiers (see ``_who``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from closedloop.collect.loader import Intake, LoadResult
from closedloop.core.clock import Clock
from closedloop.core.definitions import DataClass, Source
from closedloop.core.engine import Engine
from closedloop.core.errors import InputError
from closedloop.core.feedback_events import (
    CALLBACK_EVENT,
    callback_message_id,
    message_anonymous_id,
)
from closedloop.core.ids import stable_hash64

#: The internal source feedback events are recorded under (not a project source).
FEEDBACK_SOURCE: Final = Source(
    name="closedloop_activate",
    channel="activate",
    data_class=DataClass.FIRST_PARTY,
    write_key="internal:closedloop_activate",
    description="message outcomes reported by closedloop's channels and providers",
)

ATTEMPT_EVENT: Final = {
    "delivered": "Message Sent",
    "bounced": "Message Bounced",
    "failed": "Message Failed",
}


@dataclass(frozen=True)
class FeedbackResult:
    received: int
    accepted: int
    duplicate: int
    unknown: list[str]  # places (file:line) of reports naming no message of ours, and why
    load_id: str | None = None


def _people(engine: Engine, customers: Iterable[str]) -> dict[str, dict[str, Any]]:
    from closedloop.portrait import tables as _portrait  # noqa: F401  (declares profiles)

    ids = sorted(set(customers))
    if not ids:
        return {}
    p = engine.table("profiles")
    rows = (
        p.filter(p.customer_id.isin(ids))
        .select("customer_id", "member_id", "email", "phone")
        .to_pyarrow()
        .to_pylist()
    )
    return {r["customer_id"]: r for r in rows}


def _who(info: dict[str, Any], person: dict[str, Any] | None) -> dict[str, Any]:
    """How the event names the person, without ever becoming evidence that joins two ids.

    The member id when there is one. Otherwise ONE contact identifier — the channel's own
    (phone for SMS, else e-mail first) — beside an anonymous id of this message alone: an
    event carrying both e-mail and phone, or an anonymous id shared by a person's events,
    would re-join identifiers that resolution (or a staff member's split) had kept apart.
    """
    # The message's own anonymous id is on every outcome event: identity ties it to the
    # person here, so a provider callback through collect, which knows only the message id,
    # lands on the same person (see ``core.feedback_events``).
    anonymous = message_anonymous_id(str(info.get("message_id")))
    if person and person.get("member_id"):
        return {"userId": person["member_id"], "anonymousId": anonymous}
    order = ("phone", "email") if info.get("channel") == "sms" else ("email", "phone")
    known = [k for k in order if person and person.get(k)]
    out: dict[str, Any] = {"anonymousId": anonymous}
    if known and person:
        out["context"] = {"traits": {known[0]: person[known[0]]}}
    return out


def _track(
    event: str,
    message_id: str,
    at: datetime,
    info: dict[str, Any],
    person: dict[str, Any] | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    customer = str(info.get("customer_id"))
    props = {
        "campaign": info.get("campaign"),
        "variant": info.get("variant"),
        "channel": info.get("channel"),
        "message_id": info.get("message_id"),
        "delivery_id": info.get("delivery_id"),
        "customer_id": customer,
        **{k: v for k, v in extra.items() if v is not None},
    }
    who = _who(info, person)
    context = {"library": {"name": "closedloop-activate"}, **who.pop("context", {})}
    return {
        "type": "track",
        "event": event,
        "messageId": message_id,
        "timestamp": at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "properties": props,
        "context": context,
        **who,
    }


def _load(
    engine: Engine, messages: Sequence[dict[str, Any]], *, name: str, clock: Clock | None
) -> LoadResult:
    intake = Intake(engine, FEEDBACK_SOURCE, import_name=name, location=name, clock=clock)
    builder = intake.builder()
    for i, m in enumerate(messages, 1):
        builder.offer(m, f"{name}:", i, json.dumps(m, default=str))
    if builder.pending:
        intake.write(builder.take())
    return intake.finish()


def _variants(engine: Engine, delivery_ids: Iterable[str]) -> dict[str, str]:
    from closedloop.activate import assignment as _assignment  # noqa: F401  (declares the table)

    ids = sorted({d for d in delivery_ids if d})
    if not ids:
        return {}
    t = engine.table("delivery_variants")
    rows = t.filter(t.delivery_id.isin(ids)).select("delivery_id", "variant").to_pyarrow()
    return dict(zip(rows["delivery_id"].to_pylist(), rows["variant"].to_pylist(), strict=True))


def attempt_events(
    engine: Engine, attempts: Sequence[dict[str, Any]], *, clock: Clock | None = None
) -> LoadResult:
    """``message_attempts`` rows as ``Message Sent/Bounced/Failed`` events, through collect."""
    people = _people(engine, (str(a["customer_id"]) for a in attempts))
    variants = _variants(engine, (str(a.get("delivery_id") or "") for a in attempts))
    out = []
    for a in attempts:
        info = {**a, "variant": variants.get(str(a.get("delivery_id")))}
        mid = "fb_" + format(
            stable_hash64("attempt", str(a["message_id"]), str(a["attempt"])), "016x"
        )
        extra = {"attempt": a["attempt"], "error": a.get("error"), "address": None}
        out.append(
            _track(
                ATTEMPT_EVENT[a["status"]],
                mid,
                a["attempted_at"],
                info,
                people.get(str(a["customer_id"])),
                extra,
            )
        )
    return _load(engine, out, name="activate:attempts", clock=clock)


def ingest_feedback(
    engine: Engine,
    reports: Sequence[dict[str, Any]],
    *,
    name: str = "feedback",
    places: Sequence[str] | None = None,
    clock: Clock | None = None,
) -> FeedbackResult:
    """Provider reports (delivered, opened, clicked, replied, bounced) as events.

    A report is an object with ``message_id`` (ours, as sent to the provider), ``event`` and
    ``timestamp``; optional ``id`` (the provider's own event id), ``url`` (a click),
    ``text`` (a reply) and ``reason`` (a bounce). A report naming no message we sent, or an
    event we do not know, is not loaded and is listed in ``unknown`` with its place.
    """
    from closedloop.activate import tables as _tables  # noqa: F401  (declares deliveries)

    now = (clock or Clock()).now()
    ids = sorted({str(r.get("message_id")) for r in reports if r.get("message_id")})
    d = engine.table("deliveries")
    known = {
        r["message_id"]: r
        for r in d.filter(d.message_id.isin(ids))
        .select("message_id", "delivery_id", "campaign", "customer_id", "channel")
        .to_pyarrow()
        .to_pylist()
    }
    people = _people(engine, (str(r["customer_id"]) for r in known.values()))
    variants = _variants(engine, (str(r["delivery_id"]) for r in known.values()))
    unknown: list[str] = []
    out = []
    for i, r in enumerate(reports, 1):
        place = places[i - 1] if places is not None else f"{name}:{i}"
        info = known.get(str(r.get("message_id")))
        event = CALLBACK_EVENT.get(str(r.get("event", "")).lower())
        if info is None:
            unknown.append(f"{place}: no message {r.get('message_id')!r} was sent")
            continue
        if event is None:
            ok = ", ".join(sorted(set(CALLBACK_EVENT)))
            unknown.append(f"{place}: unknown event {r.get('event')!r} (known: {ok})")
            continue
        at = _time(r.get("timestamp"), now)
        key = str(r.get("id") or f"{event}|{at.isoformat()}")
        mid = callback_message_id(str(r["message_id"]), key)
        extra = {"provider_event_id": r.get("id"), "url": r.get("url"), "reason": r.get("reason")}
        if r.get("text") is not None:
            extra["text"] = str(r["text"])[:2000]
        merged = {**info, "variant": variants.get(str(info["delivery_id"]))}
        out.append(_track(event, mid, at, merged, people.get(str(info["customer_id"])), extra))
    result = _load(engine, out, name=name, clock=clock)
    return FeedbackResult(
        received=len(reports),
        accepted=result.accepted,
        duplicate=result.duplicate,
        unknown=unknown,
        load_id=result.load_id,
    )


def _time(value: Any, default: datetime) -> datetime:
    if isinstance(value, str):
        try:
            t = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return default
        return t if t.tzinfo else t.replace(tzinfo=UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    return default


def load_feedback_file(engine: Engine, path: Path, *, clock: Clock | None = None) -> FeedbackResult:
    """A provider's callback export, one JSON report per line (``campaign feedback FILE``)."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    reports: list[dict[str, Any]] = []
    places: list[str] = []
    bad: list[str] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                bad.append(f"{path}:{n}: not JSON ({e})")
                continue
            if not isinstance(r, dict):
                bad.append(f"{path}:{n}: expected a JSON object")
                continue
            reports.append(r)
            places.append(f"{path}:{n}")
    result = ingest_feedback(engine, reports, name=str(path), places=places, clock=clock)
    return FeedbackResult(
        received=result.received + len(bad),
        accepted=result.accepted,
        duplicate=result.duplicate,
        unknown=bad + result.unknown,
        load_id=result.load_id,
    )
