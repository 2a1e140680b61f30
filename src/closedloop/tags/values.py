"""One tag's values as an Ibis expression ``(customer_id, value)``, per tag type.

Everything here is written once in Ibis and compiled per engine, so DuckDB, PostgreSQL and
Spark give the same values. Ties are broken explicitly (by time then message id for
first/last; by count then value for top-N) because SQL leaves them to each engine.
"""

from __future__ import annotations

import itertools
from datetime import datetime

import ibis
import ibis.expr.datatypes as dt
import ibis.expr.types as ir

from closedloop.core.conditions import compile_condition
from closedloop.core.definitions.tags import BucketRange, RfmPart, TagDef, TagType
from closedloop.core.engine import Engine
from closedloop.portrait.extras import top_counted

TS = "timestamp('UTC', 6)"


def only(t: ir.Table, customers: ir.Table | None) -> ir.Table:
    """``t``'s rows of the given customers (a ``customer_id`` table); all when None.

    Why: a live refresh recomputes per-customer tags only for the customers whose inputs
    changed (``tags.incremental``); every reader below narrows its input with this.
    """
    return t if customers is None else t.semi_join(customers, "customer_id")


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


def numeric_field(engine: Engine, tag: TagDef, customers: ir.Table | None = None) -> ir.Table:
    """``(customer_id, x)``: a numeric profile field, or a numeric computed trait."""
    assert tag.field is not None  # noqa: S101 - checked by check_tag
    p = engine.table("profiles")
    if tag.field in p.columns:
        p = only(p, customers)
        return p.select("customer_id", x=p[tag.field].cast("float64"))
    ct = engine.table("computed_traits")
    ct = only(ct.filter(ct.trait == tag.field), customers)
    return ct.select("customer_id", x=ct.number_value)


def bucket_values(engine: Engine, tag: TagDef, customers: ir.Table | None = None) -> ir.Table:
    """Explicit ranges (first match), or percentile buckets of the population.

    Percentile cut points are computed over customers that have a value (continuous
    quantiles, the same on every engine). A value goes to the first bucket whose upper cut it
    does not exceed, so on constant values every customer lands in the first bucket.
    """
    if customers is not None and not tag.ranges:
        raise ValueError(f"tag {tag.name}: percentile buckets depend on everyone")
    f = numeric_field(engine, tag, customers)
    f = f.filter(f.x.notnull())
    if tag.ranges:
        return f.select("customer_id", value=_ranges_expr(tag.ranges, f.x))
    labels = percentile_labels(tag)
    cuts = f.aggregate(**{f"c{i}": f.x.quantile(p) for i, p in enumerate(tag.percentiles)})
    j = f.cross_join(cuts)
    cases = [(j.x <= j[f"c{i}"], labels[i]) for i in range(len(tag.percentiles))]
    return j.select("customer_id", value=ibis.cases(*cases, else_=labels[-1]))


def profile_bucket_values(
    engine: Engine, tag: TagDef, customers: ir.Table | None = None
) -> ir.Table | None:
    """``with_default(bucket_values(...), default)`` for a profile field, in one scan.

    Every customer has a profile row, so the default needs no join back to ``profiles``:
    a customer without a value (or outside every range) gets it directly. None when the
    field is a computed trait (``bucket_values`` and ``with_default`` then).
    """
    assert tag.field is not None  # noqa: S101 - checked by check_tag
    p = engine.table("profiles")
    if tag.field not in p.columns:
        return None
    if customers is not None and not tag.ranges:
        raise ValueError(f"tag {tag.name}: percentile buckets depend on everyone")
    p = only(p, customers)
    x = p[tag.field].cast("float64")
    if tag.ranges:
        value = _ranges_expr(tag.ranges, x)
    else:
        labels = percentile_labels(tag)
        known = p.filter(x.notnull())
        kx = known[tag.field].cast("float64")
        cuts = known.aggregate(**{f"c{i}": kx.quantile(q) for i, q in enumerate(tag.percentiles)})
        p = p.cross_join(cuts)
        x = p[tag.field].cast("float64")
        cases = [(x <= p[f"c{i}"], labels[i]) for i in range(len(tag.percentiles))]
        value = ibis.ifelse(x.notnull(), ibis.cases(*cases, else_=labels[-1]), ibis.null("string"))
    if tag.default is not None:
        value = value.fill_null(tag.default)
    return p.select("customer_id", value=value)


def _event_value(e: ir.Table, tag: TagDef) -> ir.StringValue:
    if tag.column is not None:
        return e[tag.column].cast("string")
    assert tag.property is not None  # noqa: S101 - checked by check_tag
    return e.properties.cast("json")[tag.property].unwrap_as("string")


def value_key(tag: TagDef) -> str:
    """What an event tag reads from each event: a column or a property."""
    return f"column:{tag.column}" if tag.column is not None else f"property:{tag.property}"


def tag_events(
    engine: Engine,
    event: str | None,
    keys: list[str],
    now: datetime,
    customers: ir.Table | None = None,
) -> ir.Table:
    """The customers' events that event tags on ``event`` read, once for all of them.

    One row per event (up to ``now``, named ``event``, or every track event when None) with
    its customer, time, message id and one column ``v{i}`` per value ``keys[i]`` (see
    ``value_key``). Tags sharing it filter their window and non-empty values from it
    (``matching_events``), so the join with ``event_customers`` is made once, not per tag.
    """
    e = engine.table("events")
    as_of = ibis.literal(now).cast(TS)
    e = e.filter(e.timestamp <= as_of)
    e = e.filter(e.event == event) if event else e.filter(e.type == "track")
    cols = {}
    for i, key in enumerate(keys):
        kind, _, name = key.partition(":")
        cols[f"v{i}"] = (
            e[name].cast("string")
            if kind == "column"
            else e.properties.cast("json")[name].unwrap_as("string")
        )
    e = e.select("message_id", "timestamp", **cols)
    ec = only(engine.table("event_customers"), customers)
    j = e.join(ec, "message_id")
    return j.select(ec.customer_id, e.timestamp, e.message_id, *[e[c] for c in cols])


def matching_events(
    engine: Engine,
    tag: TagDef,
    now: datetime,
    shared: tuple[ir.Table, str] | None = None,
    customers: ir.Table | None = None,
) -> ir.Table:
    """The customer's events the tag reads, with the value column ``v`` (non-null).

    Events are filtered and narrowed to four columns before they meet ``event_customers``,
    so the join carries only what the tag reads. ``shared`` gives ``tag_events`` already
    materialised for this tag's event, and the name of its value column: the same rows.
    """
    as_of = ibis.literal(now).cast(TS)
    if shared is not None:
        e, column = shared
        if tag.window_days:
            e = e.filter(e.timestamp > as_of - ibis.interval(days=tag.window_days))
        e = e.select("customer_id", "timestamp", "message_id", v=e[column])
        return e.filter(e.v.notnull() & (e.v != ""))
    e = engine.table("events")
    e = e.filter(e.timestamp <= as_of)
    e = e.filter(e.event == tag.event) if tag.event else e.filter(e.type == "track")
    if tag.window_days:
        e = e.filter(e.timestamp > as_of - ibis.interval(days=tag.window_days))
    e = e.select("message_id", "timestamp", v=_event_value(e, tag))
    e = e.filter(e.v.notnull() & (e.v != ""))
    ec = only(engine.table("event_customers"), customers)
    j = e.join(ec, "message_id")
    return j.select(ec.customer_id, e.timestamp, e.message_id, e.v)


# An event's place in time: its timestamp, then its message id (unique: no two are equal).
EVENT_KEY = dt.Struct({"t": dt.Timestamp(timezone="UTC", scale=6), "m": dt.string})


@ibis.udf.agg.builtin(name="arg_min")
def _value_at_min(arg: dt.string, key: EVENT_KEY) -> dt.string:  # type: ignore[valid-type]
    """DuckDB's ``arg_min(arg, key)``: ``arg`` of the row with the smallest ``key``."""


@ibis.udf.agg.builtin(name="arg_max")
def _value_at_max(arg: dt.string, key: EVENT_KEY) -> dt.string:  # type: ignore[valid-type]
    """DuckDB's ``arg_max(arg, key)``: ``arg`` of the row with the largest ``key``."""


def first_last_values(
    engine: Engine,
    tag: TagDef,
    now: datetime,
    shared: tuple[ir.Table, str] | None = None,
    customers: ir.Table | None = None,
) -> ir.Table:
    """The value on the first (or last) matching event; same-time ties go to the message id.

    Grouped passes, not a window: the customer's first (last) time, its events at that time,
    and among those the smallest (largest) message id — message ids are unique, so that is
    one event. A row number over every customer's events sorted them all, the costliest step
    of a tag build.
    """
    e = matching_events(engine, tag, now, shared, customers)
    first = tag.type is TagType.FIRST
    if engine.backend == "duckdb":
        # One grouped pass: the value at the smallest (largest) (time, message id), the same
        # event as below without the edge join and the second grouping.
        key = ibis.struct({"t": e.timestamp, "m": e.message_id})
        pick = _value_at_min if first else _value_at_max
        return e.group_by("customer_id").aggregate(value=pick(e.v, key))
    edge = e.group_by("customer_id").aggregate(at=e.timestamp.min() if first else e.timestamp.max())
    edge = edge.rename(edge_customer="customer_id")
    j = e.join(edge, [e.customer_id == edge.edge_customer, e.timestamp == edge.at])
    value = j.v.argmin(j.message_id) if first else j.v.argmax(j.message_id)
    return j.group_by("customer_id").aggregate(value=value)


def first_last_together(
    tags: list[TagDef], shared: ir.Table, columns: list[str], now: datetime
) -> ir.Table:
    """First/last tags on one ``tag_events`` table, on DuckDB, in one grouped pass.

    ``columns[i]`` is the value column of ``tags[i]`` in ``shared``. The result has
    ``customer_id`` and a column ``f{i}`` per tag: its value as ``first_last_values`` gives
    it (null where the customer has no matching event). One hash of the customers' events
    for all of them instead of one per tag, each a third of a tag build's time.
    """
    e = shared
    as_of = ibis.literal(now).cast(TS)
    key = ibis.struct({"t": e.timestamp, "m": e.message_id})
    aggs = {}
    for i, (tag, column) in enumerate(zip(tags, columns, strict=True)):
        v = e[column]
        ok = v.notnull() & (v != "")
        if tag.window_days:
            ok = ok & (e.timestamp > as_of - ibis.interval(days=tag.window_days))
        pick = _value_at_min if tag.type is TagType.FIRST else _value_at_max
        aggs[f"f{i}"] = pick(v, key, where=ok)
    return e.group_by("customer_id").aggregate(**aggs)


def counts_together(tags: list[TagDef], shared: ir.Table, column: str, now: datetime) -> ir.Table:
    """Top-N tags on one value column of one ``tag_events`` table: the counts they rank.

    One row per customer and non-empty value with a count ``n{d}`` per window of ``d`` days
    the tags use (``n0``: no window), from one grouped pass instead of one per tag.
    ``top_n_from_counts`` ranks a tag's column of it.
    """
    e = shared
    as_of = ibis.literal(now).cast(TS)
    e = e.select("customer_id", "timestamp", v=e[column])
    e = e.filter(e.v.notnull() & (e.v != ""))
    aggs = {}
    for days in sorted({t.window_days or 0 for t in tags}):
        inside = e.timestamp > as_of - ibis.interval(days=days) if days else None
        aggs[f"n{days}"] = e.count(where=inside)
    return e.group_by("customer_id", "v").aggregate(**aggs)


def top_n_from_counts(tag: TagDef, counts: ir.Table, duckdb: bool = False) -> ir.Table:
    """``top_n_values`` of ``tag`` from ``counts_together``'s table (customers holding none
    in the tag's window have no row)."""
    n = counts[f"n{tag.window_days or 0}"]
    c = counts.filter(n > 0).select("customer_id", "v", n=n)
    return top_counted(c, "v", "n", tag.n, "value", duckdb)


def top_n_values(
    engine: Engine,
    tag: TagDef,
    now: datetime,
    shared: tuple[ir.Table, str] | None = None,
    customers: ir.Table | None = None,
) -> ir.Table:
    """The N most frequent values, most frequent first, comma-separated; ties by value."""
    e = matching_events(engine, tag, now, shared, customers)
    counts = e.group_by("customer_id", "v").aggregate(n=e.count())
    return top_counted(counts, "v", "n", tag.n, "value", engine.backend == "duckdb")


def rfm_values(engine: Engine, tag: TagDef, customers: ir.Table | None = None) -> ir.Table:
    """The portrait's RFM group, or its scores as ``R5F3M2`` (customers without scores: none).

    Per customer although ranks compare everyone: the portrait has ranked them already, so
    the value is a function of the customer's own profile row.
    """
    p = only(engine.table("profiles"), customers)
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


def rule_values(engine: Engine, tag: TagDef, customers: ir.Table | None = None) -> ir.Table:
    p = only(engine.table("profiles"), customers)
    return p.select("customer_id", value=rule_value_expr(tag, p).cast("string"))


def with_default(
    engine: Engine, values: ir.Table, default: str | None, customers: ir.Table | None = None
) -> ir.Table:
    """Every customer without a value gets ``default`` (when one is declared)."""
    if default is None:
        return values
    c = only(engine.table("profiles"), customers).select("customer_id")
    j = c.left_join(values, "customer_id")
    return j.select(c.customer_id, value=j.value.fill_null(default))
