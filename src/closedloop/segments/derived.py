"""Columns that event and segment leaves of a condition read: computed here, per customer.

An event leaf ("did Order Completed with category = milk_tea at least twice in 30 days")
becomes one grouped count over the customer's events; a segment leaf becomes a membership
flag from ``segment_membership``; a sequence leaf ("viewed, then bought within 2 hours")
becomes a flag from window functions over the customer's step events (``sequence_flags``);
an account segment leaf ("my account is in X") a flag from ``account_membership`` through
``account_contacts`` (``account_flags``).
All are left-joined onto the audience table under the
leaf's ``derived_column`` name, so the compiled condition is one expression over one table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import ibis
import ibis.expr.types as ir

from closedloop.collect.tables import EVENTS
from closedloop.core.conditions import (
    Condition,
    EventCondition,
    PropertyFilter,
    SegmentRef,
    SequenceCondition,
    compile_condition,
    leaves,
    window_bounds,
)
from closedloop.core.definitions.segments import account_target
from closedloop.core.engine import Engine
from closedloop.portrait.build import customer_events

# Event columns a property filter reads directly; any other name is read from `properties`.
PROMOTED = {c for c, t in EVENTS.columns.items() if c not in ("properties", "traits", "context")}


def _property(events: ir.Table, name: str, numeric: bool) -> ir.Value:
    if name in PROMOTED:
        return events[name]
    node = events.properties.cast("json")[name]
    text = node.unwrap_as("string")
    if not numeric:
        return text
    # A number may arrive as a JSON number or as numeric text ("12.5"): accept both.
    return ibis.coalesce(node.unwrap_as("float64"), text.try_cast("float64"))


def _matching(
    events: ir.Table,
    event: str,
    where: list[PropertyFilter],
    as_of: datetime,
    window: tuple[datetime | None, datetime | None] = (None, None),
) -> ir.Table:
    """Events named ``event`` passing ``where``, up to ``as_of`` and inside ``window``."""
    e = events.filter((events.event == event) & (events.timestamp <= as_of))
    lo, hi = window
    if lo is not None:
        e = e.filter(e.timestamp > lo)
    if hi is not None:
        e = e.filter(e.timestamp < hi)
    cols = {}
    for i, f in enumerate(where):
        sample = f.value[0] if isinstance(f.value, list) and f.value else f.value
        numeric = isinstance(sample, int | float) and not isinstance(sample, bool)
        cols[f"__p{i}"] = _property(e, f.property, numeric)
    if cols:
        e = e.mutate(**cols)
        for i, f in enumerate(where):
            e = e.filter(compile_condition(f.as_field(f"__p{i}"), e))
    return e


def _events_of(
    engine: Engine, customers: ir.Table | None, events: ir.Table | None = None
) -> ir.Table:
    """The customers' events (all customers' when None): a live refresh reads only the
    events of the customers it re-evaluates. ``events``: ``leaf_events`` made already."""
    if events is not None:
        return events if customers is None else events.semi_join(customers, "customer_id")
    if customers is None:
        return customer_events(engine)
    ec = engine.table("event_customers").semi_join(customers, "customer_id")
    return engine.table("events").join(ec, "message_id")


def leaf_events(engine: Engine, conds: Sequence[Condition], as_of: datetime) -> ir.Table | None:
    """The customers' events that the event and sequence leaves of ``conds`` read, made once.

    Each such leaf joined the events it reads with ``event_customers``, building a hash
    table of every attributed event per leaf: in a build of twenty segments that was most
    of their time. This is one join, of the events named by any leaf (up to ``as_of``),
    narrowed to the columns their property filters read, materialised; every leaf filters
    it as it filtered the log (``_matching``). None when fewer than two leaves would share it.
    """
    steps: list[tuple[str, list[PropertyFilter]]] = []
    shared = 0
    for cond in conds:
        for leaf in leaves(cond):
            if isinstance(leaf, EventCondition):
                steps.append((leaf.event, leaf.where))
                shared += 1
            elif isinstance(leaf, SequenceCondition):
                steps.extend((step.event, step.where) for step in leaf.sequence)
                shared += 1
    if shared < 2:
        return None
    read = {f.property if f.property in PROMOTED else "properties" for _, w in steps for f in w}
    cols = sorted(read - {"timestamp", "event"})
    ev = engine.table("events")
    ev = ev.filter(ev.event.isin(sorted({name for name, _ in steps})) & (ev.timestamp <= as_of))
    ev = ev.select("message_id", "timestamp", "event", *[c for c in cols if c != "message_id"])
    ec = engine.table("event_customers")
    j = ev.join(ec, "message_id")
    j = j.select(ec.customer_id, ev.timestamp, ev.event, *[ev[c] for c in cols])
    return engine.scratch("segment_leaf_events", j)


def event_counts(
    engine: Engine,
    leaf: EventCondition,
    as_of: datetime,
    customers: ir.Table | None = None,
    events: ir.Table | None = None,
) -> ir.Table:
    """(customer_id, count) of the customer's events matching ``leaf`` within its window.

    ``events``: ``leaf_events`` (the log joined with customers when None)."""
    window = window_bounds(leaf.within_days, leaf.between, as_of)
    e = _matching(_events_of(engine, customers, events), leaf.event, leaf.where, as_of, window)
    return e.group_by("customer_id").aggregate(n=e.count())


def sequence_flags(
    engine: Engine,
    leaf: SequenceCondition,
    as_of: datetime,
    customers: ir.Table | None = None,
    events: ir.Table | None = None,
) -> ir.Table:
    """(customer_id, ok) for customers who did the sequence — one pass of window functions.

    Each step's matching events become rows tagged with the step number (an event matching
    two steps gives two rows), ordered by time and, at equal times, later steps first, so an
    event never "follows" one at the same instant. For step k the latest possible start of a
    chain ending at a row is the running max of step k-1's chain starts before it (the latest
    start is the best: it leaves the most room for ``within``). A chain ending at step n
    matches when it spans at most ``within``; with an absent last step, the next absent-event
    after the chain's end must be later than ``within`` (and that time must have passed).
    """
    events = _events_of(engine, customers, events)
    window = window_bounds(leaf.within_days, leaf.between, as_of)
    ts_type = "timestamp('UTC', 6)"
    parts = []
    for k, step in enumerate(leaf.sequence, start=1):
        e = _matching(
            events, step.event, step.where, as_of, (None, None) if step.absent else window
        )
        parts.append(
            e.select(
                "customer_id",
                ts=e.timestamp.cast(ts_type),
                step=ibis.literal(k, "int16"),
            )
        )
    rows = parts[0]
    for p in parts[1:]:
        rows = rows.union(p, distinct=False)
    order = ibis.window(
        group_by=rows.customer_id, order_by=[rows.ts, ibis.desc(rows.step)], rows=(None, 0)
    )
    null_ts = ibis.null(ts_type)
    rows = rows.mutate(start=ibis.ifelse(rows.step == 1, rows.ts, null_ts))
    last = len(leaf.positive)
    for k in range(2, last + 1):
        prev = ibis.ifelse(rows.step == k - 1, rows.start, null_ts).max().over(order)
        rows = rows.mutate(start=ibis.ifelse(rows.step == k, prev, rows.start))
        order = ibis.window(
            group_by=rows.customer_id, order_by=[rows.ts, ibis.desc(rows.step)], rows=(None, 0)
        )
    if leaf.absent_step is not None:
        after = ibis.window(
            group_by=rows.customer_id, order_by=[rows.ts, ibis.desc(rows.step)], rows=(0, None)
        )
        next_gone = ibis.ifelse(rows.step == last + 1, rows.ts, null_ts).min().over(after)
        rows = rows.mutate(next_gone=next_gone)
    ok = (rows.step == last) & rows.start.notnull() & (rows.ts <= rows.start + leaf.within)
    if leaf.absent_step is not None:
        end = rows.ts + leaf.within
        ok = ok & (end <= as_of) & (rows.next_gone.isnull() | (rows.next_gone > end))
    hits = rows.filter(ok)
    return hits.select("customer_id", ok=ibis.literal(True)).distinct()


def account_flags(engine: Engine, segment: str) -> ir.Table:
    """(customer_id, ok) for the contacts of the accounts now in account segment ``segment``.

    ``account_in_segment``: a customer is in when any account they are a contact of has an
    open stay in ``account_membership`` (a person in two accounts qualifies through either).
    Account segments are evaluated before customer segments in a build, so the stays read
    here are this run's.
    """
    from closedloop.segments.accounts import ACCOUNT_MEMBERSHIP  # declares the table

    m = engine.table(ACCOUNT_MEMBERSHIP.name)
    m = m.filter((m.segment == segment) & m.exited_at.isnull()).select("account_id")
    c = engine.table("account_contacts").select("account_id", "customer_id")
    hits = c.semi_join(m, "account_id")
    return hits.select("customer_id", ok=ibis.literal(True)).distinct()


def with_derived(
    engine: Engine,
    table: ir.Table,
    cond: Condition,
    as_of: datetime,
    members: Mapping[str, ir.Table] | None = None,
    customers: ir.Table | None = None,
    events: ir.Table | None = None,
) -> ir.Table:
    """``table`` plus one column per event, sequence or segment leaf of ``cond``.

    ``customers``: ``table`` holds only these customers; event leaves read only their events.
    ``events``: the events leaves read, ``leaf_events`` of this and other conditions.

    A segment leaf reads ``members[segment]`` (a ``customer_id`` table of that segment's
    members, evaluated earlier in the same run) when given, else its open stays; an
    ``account_in_segment`` leaf reads the account segment's open stays (``account_flags``).
    """
    seen: set[str] = set()
    for leaf in leaves(cond):
        if (
            not isinstance(leaf, EventCondition | SequenceCondition | SegmentRef)
            or leaf.derived_column in seen
        ):
            continue
        seen.add(leaf.derived_column)
        name = leaf.derived_column
        if isinstance(leaf, EventCondition):
            counts = event_counts(engine, leaf, as_of, customers, events).rename({name: "n"})
        elif isinstance(leaf, SequenceCondition):
            flags = sequence_flags(engine, leaf, as_of, customers, events)
            counts = flags.rename({name: "ok"})
        elif (target := account_target(leaf)) is not None:
            counts = account_flags(engine, target).rename({name: "ok"})
        elif members is not None and leaf.in_segment in members:
            m = members[leaf.in_segment]
            counts = m.select("customer_id", **{name: ibis.literal(True)}).distinct()
        else:
            m = engine.table("segment_membership")
            m = m.filter((m.segment == leaf.in_segment) & m.exited_at.isnull())
            counts = m.select("customer_id", **{name: ibis.literal(True)}).distinct()
        table = table.left_join(counts, "customer_id").drop("customer_id_right")
    return table
