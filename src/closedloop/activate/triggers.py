"""Triggers: who should enter a journey because of what happened in a window (since, now].

Each trigger kind yields *candidates* — (customer, occasion, time, trigger id) — that the entry
rules (``activate.journeys.admit``) then accept or refuse. Windows may overlap between ticks
(a watermark is re-read with a margin for late loads): a candidate is identified by its
(campaign, occasion, customer), so reading it twice enters nobody twice.

* event: new events of that name (and property filters), mapped to their customer through
  ``event_customers`` or, for events identity has not resolved yet, ``identity_map`` by userId;
  the occasion is the event's local day (so "once per occasion" = once a day).
* segment entry: new stays in ``segment_membership``; occasion = the local day of entry.
* date trait: the trait's anniversary (or the date itself) plus an offset, at a local hour in
  the person's time zone; occasion = the anniversary's year.
* calendar: the first phase of a moment, at a local hour in the person's zone; occasion = year.
* schedule: every day / week / month at a local hour; occasion = the local day.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import ibis
import ibis.expr.types as ir
import pyarrow as pa

from closedloop.activate.calendar import anniversary, local_fire, phase_times
from closedloop.activate.policy import zone
from closedloop.core.conditions import PropertyFilter, evaluate_python
from closedloop.core.definitions.campaigns import (
    CalendarTrigger,
    DateTrigger,
    EventTrigger,
    Every,
    ScheduleTrigger,
    SegmentEntryTrigger,
)
from closedloop.core.engine import Engine
from closedloop.identity import tables as _identity_tables  # noqa: F401  (event_customers)
from closedloop.segments.audience import current_members

PROMOTED = ("order_id", "revenue", "category", "coupon")  # event columns beside properties


@dataclass(frozen=True)
class Candidate:
    customer_id: str
    occasion: str
    at: datetime  # when the trigger fired (UTC)
    trigger_id: str


@dataclass(frozen=True)
class Fired:
    candidates: list[Candidate]
    watermark: datetime  # read up to here (events: the latest received_at seen)


def customer_events(engine: Engine, events: ir.Table, id_types: Sequence[str]) -> ir.Table:
    """``events`` with the customer each belongs to (null when no one is known yet)."""
    ec = engine.table("event_customers").select("message_id", ec_customer="customer_id")
    im = engine.table("identity_map")
    im = im.filter(im.id_type.isin(list(id_types)) & ~im.quarantined.fill_null(False))
    im = im.group_by(uid="id_value").aggregate(im_customer=im.customer_id.min())
    j = events.left_join(ec, "message_id").left_join(im, events.user_id == im.uid)
    return j.select(*events.columns, customer_id=ibis.coalesce(j.ec_customer, j.im_customer))


def matches(filters: Sequence[PropertyFilter], row: dict[str, Any]) -> bool:
    """Whether one event row (promoted columns and its ``properties`` JSON) passes ``filters``."""
    if not filters:
        return True
    props = json.loads(row.get("properties") or "{}")
    if not isinstance(props, dict):
        props = {}
    for f in filters:
        value = row.get(f.property) if f.property in PROMOTED else None
        if value is None:  # promoted columns are filled by collect's loader, not every path
            value = props.get(f.property)
        if not evaluate_python(f.as_field("v"), {"v": value}):
            return False
    return True


def event_rows(
    engine: Engine,
    name: str,
    filters: Sequence[PropertyFilter],
    id_types: Sequence[str],
    *,
    customers: Iterable[str] | None = None,
    received_after: datetime | None = None,
    received_until: datetime | None = None,
    since: datetime | None = None,
) -> list[dict[str, Any]]:
    """Events named ``name`` passing ``filters``, each with its customer (unknown ones left out)."""
    ev = engine.table("events")
    cond = ev.event == name
    if received_after is not None:
        cond &= ev.received_at > received_after
    if received_until is not None:
        cond &= ev.received_at <= received_until
    if since is not None:
        cond &= ev.timestamp >= since
    cols = ["message_id", "user_id", "timestamp", "received_at", "properties", *PROMOTED]
    t = customer_events(engine, ev.filter(cond).select(*cols), id_types)
    t = t.filter(t.customer_id.notnull())
    if customers is not None:
        t = t.filter(t.customer_id.isin(sorted(set(customers))))
    rows: list[dict[str, Any]] = t.to_pyarrow().to_pylist()
    return [r for r in rows if matches(filters, r)]


def local_day(ts: datetime, tz: ZoneInfo) -> str:
    return ts.astimezone(tz).date().isoformat()


def fire_event(
    engine: Engine,
    trigger: EventTrigger,
    since: datetime,
    now: datetime,
    id_types: Sequence[str],
    tz: ZoneInfo,
    late: timedelta = timedelta(0),
) -> Fired:
    """Events received in (since − late, now]; the watermark never moves back."""
    rows = event_rows(
        engine,
        trigger.event,
        trigger.where,
        id_types,
        received_after=since - late,
        received_until=now,
    )
    out = [
        Candidate(
            customer_id=r["customer_id"],
            occasion=local_day(r["timestamp"], tz),
            at=min(r["timestamp"], now),
            trigger_id=r["message_id"],
        )
        for r in rows
    ]
    mark = max([since, *(r["received_at"] for r in rows)])
    return Fired(out, mark)


def fire_segment_entry(
    engine: Engine, trigger: SegmentEntryTrigger, since: datetime, now: datetime, tz: ZoneInfo
) -> Fired:
    m = engine.table("segment_membership")
    m = m.filter(
        (m.segment == trigger.segment_entry) & (m.entered_at > since) & (m.entered_at <= now)
    )
    rows = m.select("customer_id", "entered_at").to_pyarrow().to_pylist()
    out = [
        Candidate(
            r["customer_id"],
            local_day(r["entered_at"], tz),
            r["entered_at"],
            f"segment:{trigger.segment_entry}:{r['entered_at'].isoformat()}",
        )
        for r in rows
    ]
    return Fired(out, now)


def audience_zones(
    engine: Engine,
    audience: str,
    extra: Sequence[str] = (),
    zones: Sequence[str | None] | None = None,
    where: Callable[[ir.Table], ir.BooleanValue] | None = None,
) -> pa.Table:
    """Current members of ``audience`` with their time zone (and ``extra`` profile columns).

    ``zones`` limits them to people in those zones (None in it: people with no zone),
    ``where`` to the rows it accepts.
    """
    members = current_members(engine, audience).select("customer_id").distinct()
    profiles = engine.table("profiles")
    t = members.join(profiles, "customer_id").select("customer_id", "timezone", *extra)
    if where is not None:
        t = t.filter(where(t))
    if zones is not None:
        named = [z for z in zones if z is not None]
        cond = t.timezone.isin(named) if named else ibis.literal(False)
        if None in zones:
            cond |= t.timezone.isnull() | (t.timezone == "")
        t = t.filter(cond)
    result: pa.Table = t.to_pyarrow()
    return result


def audience_zone_names(engine: Engine, audience: str) -> list[str | None]:
    """The distinct time zones of an audience: time triggers fire per zone, so an idle tick
    reads these few values instead of every member."""
    members = current_members(engine, audience).select("customer_id").distinct()
    profiles = engine.table("profiles")
    t = members.join(profiles, "customer_id").select("timezone").distinct()
    names = {n or None for n in t.to_pyarrow().column("timezone").to_pylist()}
    return sorted(names, key=lambda n: n or "")


def _by_zone(people: pa.Table, default_tz: str) -> dict[str | None, list[int]]:
    """Row numbers per time zone (None: no zone known, the default applies)."""
    groups: dict[str | None, list[int]] = {}
    for i, name in enumerate(people.column("timezone").to_pylist()):
        groups.setdefault(name or None, []).append(i)
    return groups


def _as_date(value: Any, tz: ZoneInfo) -> date | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return aware.astimezone(tz).date()
    if isinstance(value, date):
        return value
    return None


def fire_date(
    engine: Engine,
    trigger: DateTrigger,
    audience: str,
    since: datetime,
    now: datetime,
    default_tz: str,
) -> Fired:
    people = audience_zones(
        engine, audience, [trigger.date_trait], where=_near_dates(trigger, since, now)
    )
    ids = people.column("customer_id").to_pylist()
    values = people.column(trigger.date_trait).to_pylist()
    offset = timedelta(days=trigger.offset_days)
    out: list[Candidate] = []
    for name, rows in _by_zone(people, default_tz).items():
        tz = zone(name, default_tz)
        # Fire times depend only on (date, zone): compute each distinct date once.
        memo: dict[date, list[tuple[str, datetime]]] = {}
        for i in rows:
            d = _as_date(values[i], tz)
            if d is None:
                continue
            hits = memo.get(d)
            if hits is None:
                hits = memo[d] = _date_hits(trigger, d, offset, tz, since, now)
            out.extend(Candidate(ids[i], occ, at, f"date:{trigger.date_trait}") for occ, at in hits)
    return Fired(out, now)


NEAR_DAYS = 62  # windows up to this long are pre-filtered in the warehouse by date


def _near_dates(
    trigger: DateTrigger, since: datetime, now: datetime
) -> Callable[[ir.Table], ir.BooleanValue] | None:
    """A filter keeping only people whose date can fire in (since, now]; None for long windows.

    A tick's window is short, so only the few trait dates (or, yearly, month-days) that land in
    it after the offset are read — not the whole audience. The window is widened by two days
    on each side for time zones (and a timestamp trait's UTC date); Python then checks exactly.
    """
    if now - since > timedelta(days=NEAR_DAYS):
        return None
    first, last = since.date() - timedelta(days=2), now.date() + timedelta(days=2)
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    wanted = [d - timedelta(days=trigger.offset_days) for d in days]
    column = trigger.date_trait

    def where(t: ir.Table) -> ir.BooleanValue:
        value = t[column].date() if t[column].type().is_timestamp() else t[column]
        if not trigger.yearly:
            result: ir.BooleanValue = value.isin(wanted)
            return result
        keys = {d.month * 100 + d.day for d in wanted}
        if 228 in keys:
            keys.add(229)  # 29 February's anniversary is 28 February in common years
        key = value.month() * 100 + value.day()
        found: ir.BooleanValue = key.isin(sorted(keys))
        return found

    return where


def _date_hits(
    trigger: DateTrigger,
    d: date,
    offset: timedelta,
    tz: ZoneInfo,
    since: datetime,
    now: datetime,
) -> list[tuple[str, datetime]]:
    if not trigger.yearly:
        at = local_fire(d + offset, trigger.at, tz)
        return [("once", at)] if since < at <= now else []
    hits = []
    first = (since - timedelta(days=400)).year
    for year in range(first, now.year + 2):
        at = local_fire(anniversary(d, year) + offset, trigger.at, tz)
        if since < at <= now and year >= d.year:
            hits.append((str(year), at))
    return hits


def fire_calendar(
    engine: Engine,
    trigger: CalendarTrigger,
    audience: str,
    since: datetime,
    now: datetime,
    default_tz: str,
) -> Fired:
    first = trigger.phases[0].name
    due: dict[str | None, list[tuple[str, datetime, str]]] = {}
    for name in audience_zone_names(engine, audience):
        tz = zone(name, default_tz)
        for year in range((since - timedelta(days=61)).year, now.year + 2):
            at = phase_times(trigger, year, tz)[first]
            if since < at <= now:
                tag = f"calendar:{trigger.calendar.value}:{year}"
                due.setdefault(name, []).append((str(year), at, tag))
    return _fire_in_zones(engine, audience, due, now, default_tz)


def _fire_in_zones(
    engine: Engine,
    audience: str,
    due: dict[str | None, list[tuple[str, datetime, str]]],
    now: datetime,
    default_tz: str,
) -> Fired:
    """Candidates for the occasions due per time zone: (occasion, fire time, tag) lists.

    The audience's members are read only for the zones where something fired.
    """
    out: list[Candidate] = []
    if not due:
        return Fired(out, now)
    people = audience_zones(engine, audience, zones=list(due))
    ids = people.column("customer_id").to_pylist()
    for name, rows in _by_zone(people, default_tz).items():
        for occasion, at, tag in due.get(name, []):
            out.extend(Candidate(ids[i], occasion, at, tag) for i in rows)
    return Fired(out, now)


def schedule_days(trigger: ScheduleTrigger, first: date, last: date) -> list[date]:
    """Local days from ``first`` to ``last`` (inclusive) on which the schedule fires."""
    s = trigger.schedule
    out = []
    d = first
    while d <= last:
        if (
            s.every is Every.DAY
            or (s.every is Every.WEEK and d.weekday() == s.weekday)
            or (s.every is Every.MONTH and d.day == s.day)
        ):
            out.append(d)
        d += timedelta(days=1)
    return out


def fire_schedule(
    engine: Engine,
    trigger: ScheduleTrigger,
    audience: str,
    since: datetime,
    now: datetime,
    default_tz: str,
) -> Fired:
    due: dict[str | None, list[tuple[str, datetime, str]]] = {}
    for name in audience_zone_names(engine, audience):
        tz = zone(name, default_tz)
        first = since.astimezone(tz).date()
        for d in schedule_days(trigger, first, now.astimezone(tz).date()):
            at = local_fire(d, trigger.schedule.at, tz)
            if since < at <= now:
                due.setdefault(name, []).append((d.isoformat(), at, "schedule"))
    return _fire_in_zones(engine, audience, due, now, default_tz)
