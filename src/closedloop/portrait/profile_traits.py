"""Profile traits: one identify field per customer, merged from many records by a strategy.

A customer's records disagree (the CRM says gold, an old web form says silver); the trait's
``strategy`` (see ``core.definitions.traits``) says which value wins. Every strategy is one
ranking — a ``row_number`` over the customer's stated values with an explicit, total order —
so ties resolve identically on DuckDB, PostgreSQL and Spark.
"""

from __future__ import annotations

from datetime import datetime

import ibis
import ibis.expr.types as ir

from closedloop.core.definitions.traits import MergeStrategy, TraitDef, ValueType
from closedloop.core.engine import Engine
from closedloop.portrait.build import customer_events, json_text

NUMBER = r"^\s*-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?\s*$"


def stated_values(events: ir.Table, t: TraitDef) -> ir.Table:
    """(customer_id, timestamp, source, v, num): every non-empty value of the field."""
    assert t.field is not None  # noqa: S101 - required by the model validator
    e = events.filter(events.traits.notnull())
    text = json_text(e.traits.cast("json")[t.field])
    num = ibis.ifelse(text.re_search(NUMBER), text, ibis.null("string")).cast("float64")
    s = e.select("customer_id", "timestamp", "source", v=text, num=num)
    s = s.filter(s.v.notnull())
    if t.type is ValueType.NUMBER:
        s = s.filter(s.num.notnull())
    return s


def _order(t: TraitDef, s: ir.Table) -> list[ir.Value]:
    # (Ibis keeps one sort key per expression, so the same column must not appear twice.)
    number = t.type is ValueType.NUMBER
    smallest = [s.num.asc(), s.v.asc()] if number else [s.v.asc()]
    if t.strategy is MergeStrategy.LATEST:
        return [s.timestamp.desc(), *smallest]
    if t.strategy is MergeStrategy.FIRST:
        return [s.timestamp.asc(), *smallest]
    if t.strategy is MergeStrategy.MAX:
        return [s.num.desc(), s.v.asc()] if number else [s.v.desc()]
    if t.strategy is MergeStrategy.MOST_FREQUENT:
        return [s.k.desc(), s.timestamp.desc(), *smallest]
    assert t.sources is not None  # noqa: S101 - required by the model validator
    rank = ibis.cases(
        *[(s.source == src, i) for i, src in enumerate(t.sources)], else_=len(t.sources)
    )
    return [rank.asc(), s.timestamp.desc(), *smallest]


def profile_trait_values(
    engine: Engine,
    t: TraitDef,
    as_of: ibis.Value | datetime,
    customers: ir.Table | None = None,
    events: ir.Table | None = None,
) -> ir.Table:
    """(customer_id, v) — the merged value per customer with at least one stated value."""
    e = customer_events(engine) if events is None else events
    e = e.filter(e.timestamp <= as_of)
    if customers is not None:
        e = e.semi_join(customers, "customer_id")
    s = stated_values(e, t)
    if t.strategy is MergeStrategy.MOST_FREQUENT:
        s = s.group_by("customer_id", "v", "num").aggregate(
            k=s.count(), timestamp=s.timestamp.max(), source=s.source.max()
        )
    rank = ibis.row_number().over(group_by=s.customer_id, order_by=_order(t, s))
    top = s.mutate(rank=rank).filter(lambda x: x.rank == 0)
    v = top.num if t.type is ValueType.NUMBER else top.v
    return top.select("customer_id", v=v)
