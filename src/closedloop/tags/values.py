"""One tag's values as an Ibis expression ``(customer_id, value)``, per tag type.

Everything here is written once in Ibis and compiled per engine, so DuckDB, PostgreSQL and
Spark give the same values. Ties are broken explicitly (by time then message id for
first/last; by count then value for top-N) because SQL leaves them to each engine.
"""

from __future__ import annotations

import itertools
from datetime import datetime

import ibis
import ibis.expr.types as ir

from closedloop.core.conditions import compile_condition
from closedloop.core.definitions.tags import BucketRange, RfmPart, TagDef, TagType
from closedloop.core.engine import Engine

TS = "timestamp('UTC', 6)"


def rule_value_expr(tag: TagDef, profiles: ir.Table) -> ir.StringValue:
    """The first rule whose condition holds gives the value; else the default (or null)."""
    cases = [(compile_condition(r.when, profiles), r.value) for r in tag.rules]
    return ibis.cases(*cases, else_=tag.default)


def _ranges_expr(ranges: list[BucketRange], x: ir.NumericValue) -> ir.StringValue:
    cases = []
    for r in ranges:
        cond = x.notnull()
        if r.min is not None:
            cond = cond & (x >= r.min)
        if r.max is not None:
            cond = cond & (x < r.max)
        cases.append((cond, r.value))
    return ibis.cases(*cases, else_=ibis.null("string"))


def percentile_labels(tag: TagDef) -> list[str]:
    """Bucket names: the declared labels, or ``p0_25``, ``p25_50``, ... from the cut points."""
    if tag.labels:
        return list(tag.labels)
    edges = [0, *(round(p * 100) for p in tag.percentiles), 100]
    return [f"p{a}_{b}" for a, b in itertools.pairwise(edges)]


def numeric_field(engine: Engine, tag: TagDef) -> ir.Table:
    """``(customer_id, x)``: a numeric profile field, or a numeric computed trait."""
    assert tag.field is not None  # noqa: S101 - checked by check_tag
    p = engine.table("profiles")
    if tag.field in p.columns:
        return p.select("customer_id", x=p[tag.field].cast("float64"))
    ct = engine.table("computed_traits")
    ct = ct.filter(ct.trait == tag.field)
    return ct.select("customer_id", x=ct.number_value)


def bucket_values(engine: Engine, tag: TagDef) -> ir.Table:
    """Explicit ranges (first match), or percentile buckets of the population.

    Percentile cut points are computed over customers that have a value (continuous
    quantiles, the same on every engine). A value goes to the first bucket whose upper cut it
    does not exceed, so on constant values every customer lands in the first bucket.
    """
    f = numeric_field(engine, tag)
    f = f.filter(f.x.notnull())
    if tag.ranges:
        return f.select("customer_id", value=_ranges_expr(tag.ranges, f.x))
    labels = percentile_labels(tag)
    cuts = f.aggregate(**{f"c{i}": f.x.quantile(p) for i, p in enumerate(tag.percentiles)})
    j = f.cross_join(cuts)
    cases = [(j.x <= j[f"c{i}"], labels[i]) for i in range(len(tag.percentiles))]
    return j.select("customer_id", value=ibis.cases(*cases, else_=labels[-1]))


def _event_value(e: ir.Table, tag: TagDef) -> ir.StringValue:
    if tag.column is not None:
        return e[tag.column].cast("string")
    assert tag.property is not None  # noqa: S101 - checked by check_tag
    return e.properties.cast("json")[tag.property].unwrap_as("string")


def matching_events(engine: Engine, tag: TagDef, now: datetime) -> ir.Table:
    """The customer's events the tag reads, with the value column ``v`` (non-null).

    Events are filtered and narrowed to four columns before they meet ``event_customers``,
    so the join carries only what the tag reads.
    """
    e = engine.table("events")
    as_of = ibis.literal(now).cast(TS)
    e = e.filter(e.timestamp <= as_of)
    e = e.filter(e.event == tag.event) if tag.event else e.filter(e.type == "track")
    if tag.window_days:
        e = e.filter(e.timestamp > as_of - ibis.interval(days=tag.window_days))
    e = e.select("message_id", "timestamp", v=_event_value(e, tag))
    e = e.filter(e.v.notnull() & (e.v != ""))
    ec = engine.table("event_customers")
    j = e.join(ec, "message_id")
    return j.select(ec.customer_id, e.timestamp, e.message_id, e.v)


def first_last_values(engine: Engine, tag: TagDef, now: datetime) -> ir.Table:
    """The value on the first (or last) matching event; same-time ties go to the message id."""
    e = matching_events(engine, tag, now)
    first = tag.type is TagType.FIRST
    order = (
        [e.timestamp, e.message_id] if first else [ibis.desc(e.timestamp), ibis.desc(e.message_id)]
    )
    ranked = e.mutate(rank=ibis.row_number().over(group_by=e.customer_id, order_by=order))
    top = ranked.filter(ranked.rank == 0)
    return top.select("customer_id", value=top.v)


def top_n_values(engine: Engine, tag: TagDef, now: datetime) -> ir.Table:
    """The N most frequent values, most frequent first, comma-separated; ties by value."""
    e = matching_events(engine, tag, now)
    counts = e.group_by("customer_id", "v").aggregate(n=e.count())
    rank = ibis.row_number().over(
        group_by=counts.customer_id, order_by=[ibis.desc(counts.n), counts.v]
    )
    top = counts.mutate(rank=rank).filter(lambda t: t.rank < tag.n)
    return top.group_by("customer_id").aggregate(value=top.v.group_concat(",", order_by=top.rank))


def rfm_values(engine: Engine, tag: TagDef) -> ir.Table:
    """The portrait's RFM group, or its scores as ``R5F3M2`` (customers without scores: none)."""
    p = engine.table("profiles")
    if tag.rfm is RfmPart.GROUP:
        return p.select("customer_id", value=p.rfm_group)
    scores = (
        ibis.literal("R")
        + p.r_score.cast("string")
        + "F"
        + p.f_score.cast("string")
        + "M"
        + p.m_score.cast("string")
    )
    return p.select("customer_id", value=scores)


def manual_values(engine: Engine, tag: TagDef) -> ir.Table:
    """The latest setting per customer; a cleared tag (null value) holds no value."""
    m = engine.table("tag_manual")
    m = m.filter(m.tag == tag.name)
    rank = ibis.row_number().over(group_by=m.customer_id, order_by=ibis.desc(m.set_at))
    latest = m.mutate(rank=rank).filter(lambda t: t.rank == 0)
    return latest.select("customer_id", value=latest.value)


def model_values(engine: Engine, tag: TagDef) -> ir.Table:
    """The model's score per customer: cut by ``ranges``, else its label, else the score."""
    s = engine.table("model_scores")
    s = s.filter(s.model == tag.model)
    if tag.ranges:
        value = _ranges_expr(tag.ranges, s.score)
    else:
        value = s.label.fill_null(s.score.round(4).cast("string"))
    return s.select("customer_id", value=value)


def rule_values(engine: Engine, tag: TagDef) -> ir.Table:
    p = engine.table("profiles")
    return p.select("customer_id", value=rule_value_expr(tag, p).cast("string"))


def with_default(engine: Engine, values: ir.Table, default: str | None) -> ir.Table:
    """Every customer without a value gets ``default`` (when one is declared)."""
    if default is None:
        return values
    c = engine.table("profiles").select("customer_id")
    j = c.left_join(values, "customer_id")
    return j.select(c.customer_id, value=j.value.fill_null(default))
