"""Columns that event and segment leaves of a condition read: computed here, per customer.

An event leaf ("did Order Completed with category = milk_tea at least twice in 30 days")
becomes one grouped count over the customer's events; a segment leaf becomes a membership
flag from ``segment_membership``. Both are left-joined onto the audience table under the
leaf's ``derived_column`` name, so the compiled condition is one expression over one table.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta

import ibis
import ibis.expr.types as ir

from closedloop.collect.tables import EVENTS
from closedloop.core.conditions import (
    Condition,
    EventCondition,
    SegmentRef,
    compile_condition,
    leaves,
)
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


def event_counts(engine: Engine, leaf: EventCondition, as_of: datetime) -> ir.Table:
    """(customer_id, count) of the customer's events matching ``leaf`` within its window."""
    e = customer_events(engine)
    e = e.filter((e.event == leaf.event) & (e.timestamp <= as_of))
    if leaf.within_days is not None:
        e = e.filter(e.timestamp > as_of - timedelta(days=leaf.within_days))
    if leaf.between is not None:
        first, last = leaf.between
        start = datetime.combine(first, time.min, tzinfo=as_of.tzinfo)
        end = datetime.combine(last + timedelta(days=1), time.min, tzinfo=as_of.tzinfo)
        e = e.filter((e.timestamp >= start) & (e.timestamp < end))
    cols = {}
    for i, f in enumerate(leaf.where):
        sample = f.value[0] if isinstance(f.value, list) and f.value else f.value
        numeric = isinstance(sample, int | float) and not isinstance(sample, bool)
        cols[f"__p{i}"] = _property(e, f.property, numeric)
    if cols:
        e = e.mutate(**cols)
        for i, f in enumerate(leaf.where):
            e = e.filter(compile_condition(f.as_field(f"__p{i}"), e))
    return e.group_by("customer_id").aggregate(n=e.count())


def with_derived(engine: Engine, table: ir.Table, cond: Condition, as_of: datetime) -> ir.Table:
    """``table`` plus one column per event or segment leaf of ``cond``."""
    seen: set[str] = set()
    for leaf in leaves(cond):
        if not isinstance(leaf, EventCondition | SegmentRef) or leaf.derived_column in seen:
            continue
        seen.add(leaf.derived_column)
        name = leaf.derived_column
        if isinstance(leaf, EventCondition):
            counts = event_counts(engine, leaf, as_of).rename({name: "n"})
        else:
            m = engine.table("segment_membership")
            m = m.filter((m.segment == leaf.in_segment) & m.exited_at.isnull())
            counts = m.select("customer_id", **{name: ibis.literal(True)}).distinct()
        table = table.left_join(counts, "customer_id").drop("customer_id_right")
    return table
