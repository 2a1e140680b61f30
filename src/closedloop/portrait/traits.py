"""Computed traits from ``traits/*.yaml``: windowed aggregations over a customer's events.

Each trait is one grouped aggregation in Ibis (count, sum, avg, min, max, distinct count,
first, last, most frequent), over events filtered by name, within the last N days or the
customer's lifetime. Results are stored long (customer, trait, number or text) so adding a
trait never changes a table's schema; segments pivot the traits they use.
"""

from __future__ import annotations

import ibis
import ibis.expr.types as ir

from closedloop.collect.tables import EVENTS
from closedloop.core.clock import Clock
from closedloop.core.definitions.traits import Aggregation, TraitDef, TraitKind, ValueType
from closedloop.core.engine import Engine
from closedloop.core.errors import Problem
from closedloop.portrait.build import customer_events, most_frequent
from closedloop.portrait.profile_traits import profile_trait_values
from closedloop.portrait.tables import COMPUTED_TRAITS, PROFILES

NUMERIC = {
    Aggregation.COUNT,
    Aggregation.SUM,
    Aggregation.AVG,
    Aggregation.MIN,
    Aggregation.MAX,
    Aggregation.DISTINCT_COUNT,
}
NEEDS_NUMBER_COLUMN = {Aggregation.SUM, Aggregation.AVG, Aggregation.MIN, Aggregation.MAX}
NUMBER_COLUMNS = {c for c, t in EVENTS.columns.items() if t in ("float64", "int64")}


def trait_dtype(t: TraitDef) -> str:
    if t.kind is TraitKind.PROFILE:
        return "float64" if t.type is ValueType.NUMBER else "string"
    return "float64" if t.aggregation in NUMERIC else "string"


def check_trait(t: TraitDef) -> list[Problem]:
    where = f"traits/{t.name}.yaml"
    if t.name in PROFILES.columns:
        return [
            Problem(
                where, f"trait name {t.name!r} clashes with a built-in profile field", key="name"
            )
        ]
    if t.kind is TraitKind.PROFILE:
        return []
    if t.column is not None and t.column not in EVENTS.columns:
        return [
            Problem(
                where,
                f"unknown events column {t.column!r}; known: {', '.join(EVENTS.columns)}",
                key="column",
            )
        ]
    if t.aggregation in NEEDS_NUMBER_COLUMN and t.column not in NUMBER_COLUMNS:
        return [
            Problem(
                where,
                f"{t.aggregation.value} needs a numeric column ({', '.join(sorted(NUMBER_COLUMNS))})",
                key="column",
            )
        ]
    return []


def _aggregate(t: TraitDef, e: ir.Table) -> ir.Value:
    a = t.aggregation
    if a is Aggregation.COUNT:
        return e.count().cast("float64")
    col = e[t.column]
    if a is Aggregation.DISTINCT_COUNT:
        return col.nunique().cast("float64")
    if a is Aggregation.SUM:
        return col.sum().cast("float64")
    if a is Aggregation.AVG:
        return col.mean().cast("float64")
    if a is Aggregation.MIN:
        return col.min().cast("float64")
    if a is Aggregation.MAX:
        return col.max().cast("float64")
    if a is Aggregation.FIRST:
        return col.argmin(e.timestamp, where=col.notnull()).cast("string")
    return col.argmax(e.timestamp, where=col.notnull()).cast("string")  # LAST


def trait_values(
    engine: Engine,
    t: TraitDef,
    as_of: ibis.Value,
    customers: ir.Table | None = None,
    events: ir.Table | None = None,
) -> ir.Table:
    """(customer_id, trait, number_value, text_value) of one trait.

    ``customers`` (a table with ``customer_id``) limits the work to those customers;
    ``events`` may give their events already selected (``customer_events`` otherwise).
    """
    if t.kind is TraitKind.PROFILE:
        agg = profile_trait_values(engine, t, as_of, customers, events)
        return _long(t, agg)
    e = customer_events(engine) if events is None else events
    e = e.filter(e.timestamp <= as_of)
    if customers is not None:
        e = e.semi_join(customers, "customer_id")
    if t.event:
        e = e.filter(e.event == t.event)
    if t.window_days:
        e = e.filter(e.timestamp > as_of - ibis.interval(days=t.window_days))
    if t.aggregation is Aggregation.MOST_FREQUENT:
        assert t.column is not None  # noqa: S101 - required by the model validator
        top = most_frequent(e, t.column, "v")
        agg = top.select("customer_id", v=top.v.cast("string"))
    else:
        agg = e.group_by("customer_id").aggregate(v=_aggregate(t, e))
    if t.aggregation in (Aggregation.COUNT, Aggregation.DISTINCT_COUNT):
        # "No orders in 30 days" is a count of 0, not unknown: every customer gets a value.
        everyone = engine.table("customers").select("customer_id")
        if customers is not None:
            everyone = everyone.semi_join(customers, "customer_id")
        agg = everyone.left_join(agg, "customer_id").select("customer_id", v=agg.v.fill_null(0.0))
    return _long(t, agg)


def _long(t: TraitDef, agg: ir.Table) -> ir.Table:
    numeric = trait_dtype(t) == "float64"
    return agg.select(
        "customer_id",
        trait=ibis.literal(t.name),
        number_value=agg.v if numeric else ibis.null("float64"),
        text_value=ibis.null("string") if numeric else agg.v,
    )


def build_traits(engine: Engine, traits: dict[str, TraitDef], clock: Clock | None = None) -> int:
    """Recompute every computed trait as of the clock; returns the number of rows written."""
    now = (clock or Clock()).now()
    as_of = ibis.literal(now).cast("timestamp('UTC', 6)")
    parts = [trait_values(engine, t, as_of) for t in traits.values()]
    if not parts:
        engine.replace(COMPUTED_TRAITS.name, engine.table(COMPUTED_TRAITS.name).limit(0))
        return 0
    union = parts[0]
    for p in parts[1:]:
        union = union.union(p, distinct=False)
    engine.replace(COMPUTED_TRAITS.name, union.mutate(computed_at=as_of))
    return engine.count(COMPUTED_TRAITS.name)
