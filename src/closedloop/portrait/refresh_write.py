"""Writing the refreshed profile rows: only those that change, in one transaction.

What depends on the clock or on everyone (``build.finish``: age, recency, RFM ranks,
lifecycle; the network) stands when it provably cannot have moved (``standing_rows``);
otherwise it is recomputed for all customers on a narrow table and compared with the
stored values. See ``portrait.refresh`` for the whole design.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import ibis
import ibis.expr.types as ir

from closedloop.core.definitions.traits import TraitDef
from closedloop.core.engine import Engine
from closedloop.portrait.build import fill_relationships, finish
from closedloop.portrait.extras import RELATIONSHIP_COLUMNS
from closedloop.portrait.refresh_ranks import rescored_rows
from closedloop.portrait.refresh_state import LastRun
from closedloop.portrait.tables import COMPUTED_TRAITS, FACT_COLUMNS, PROFILES
from closedloop.portrait.traits import trait_values

TS = "timestamp('UTC', 6)"
# Profile columns that ``build.finish`` computes from the stored ones (clock and everyone).
FINISH_COLUMNS = (
    "age",
    "age_band",
    "recency_days",
    "days_since_first",
    "r_score",
    "f_score",
    "m_score",
    "rfm_group",
    "lifecycle_stage",
    "ladder_stage",
    "computed_at",
)


BASE_COLUMNS = tuple(
    c for c in PROFILES.columns if c not in FINISH_COLUMNS and c not in RELATIONSHIP_COLUMNS
)


def base_columns(t: ir.Table) -> ir.Table:
    return t.select(*[t[c].cast(PROFILES.columns[c]).name(c) for c in BASE_COLUMNS])


FINISH_INPUTS = ("birthday", "last_order_at", "first_order_at", "orders", "revenue", "member_id")
# Profile columns that depend on everyone or on the clock (``finish``, the network).
DERIVED = tuple(c for c in (*FINISH_COLUMNS, *RELATIONSHIP_COLUMNS) if c != "computed_at")


def write_profiles(
    engine: Engine,
    as_of: datetime,
    last: LastRun,
    fresh: ir.Table,
    keep: ir.Table,
    net: ir.Table | None,
    affected: ir.Table,
    network_now: Callable[[], ir.Table],
) -> ir.Table:
    """Rewrite only the profile rows that change; returns their customer ids (and the gone).

    The shortcut (``standing_rows``): on the clock date of the last run, with the network
    standing (``net`` None) and nothing that ``finish`` reads moved for any affected
    customer, nobody's age, recency, lifecycle or RFM rank can have moved — only the
    affected rows are rewritten, their derived columns read back from their stored rows.

    Otherwise what depends on everyone or on the clock (RFM ranks, recency, age,
    lifecycle, the referral network) is recomputed for all customers on a narrow table —
    the customer id and the six stored columns ``finish`` reads — and compared with the
    stored values: a row is rewritten when its customer is affected or any of those values
    moved. A new day moves recency for every buyer and rewrites most rows, as it must.

    Either way the rows go in one transaction (delete, then insert): readers see old or
    new. Rows rewritten carry the clock in ``computed_at``; the others keep the clock of
    the run that wrote them, and the latest run's clock (``portrait_runs.as_of``) says
    when all of them were last known current (``lookup.computed_at`` reads it) — stamping
    every row each refresh was a whole-table write.
    """
    if net is None:
        standing = standing_rows(engine, as_of, last, fresh, affected)
        if standing is not None:
            rows, drop = standing
            with engine.transaction():
                engine.delete_keys(PROFILES.name, drop)
                engine.con.insert(PROFILES.name, rows)
            return drop
        net = network_now()
    cols = ["customer_id", *FINISH_INPUTS]
    narrow = keep.select(*cols).union(fresh.select(*cols), distinct=False)
    narrow = narrow.left_join(net, "customer_id").drop("customer_id_right")
    narrow = engine.scratch("refresh_narrow", fill_relationships(narrow))  # read twice
    derived = list(DERIVED)
    now = engine.scratch(
        "refresh_derived", finish(narrow, as_of).select("customer_id", *derived, "computed_at")
    )
    old = engine.table(PROFILES.name)
    stored = old.select(old_id=old.customer_id, **{f"old_{c}": old[c] for c in derived})
    j = now.join(stored, now.customer_id == stored.old_id)
    moved = ibis.literal(False)
    for c in derived:
        moved |= ~j[c].identical_to(j[f"old_{c}"])
    moved_ids = j.filter(moved).select("customer_id")
    gone = old.select("customer_id").anti_join(now, "customer_id")
    drop = affected.select("customer_id").union(moved_ids, distinct=True)
    drop = engine.scratch("refresh_drop", drop.union(gone, distinct=True))
    rows = base_columns(keep.semi_join(drop, "customer_id")).union(fresh, distinct=False)
    rows = rows.join(now, "customer_id")
    rows = engine.scratch("refresh_rows", engine.conform(PROFILES.name, rows))
    with engine.transaction():
        engine.delete_keys(PROFILES.name, drop)
        engine.con.insert(PROFILES.name, rows)
    return drop


def standing_rows(
    engine: Engine, as_of: datetime, last: LastRun, fresh: ir.Table, affected: ir.Table
) -> tuple[ir.Table, ir.Table] | None:
    """(rows to insert, customer ids to delete) when no derived value can have moved for
    anyone; None when one may have.

    ``finish`` reads only the clock's date and six stored columns, and ranks buyers among
    all buyers; so its values stand for everyone when the date is the last run's, every
    affected customer has a stored row whose six columns equal the fresh ones, and no
    buyer came or went. When some of those columns moved, the others' values still stand
    if no other buyer's RFM score can have crossed a quintile boundary
    (``refresh_ranks.rescored_rows``: then the affected rows are finished on their own) (the profile count is the one the last run left — an erasure
    deletes rows behind the refresh's back — and no customer gone held an order).
    """
    if last.customers < 0 or last.as_of.astimezone(as_of.tzinfo or UTC).date() != as_of.date():
        return None
    if engine.count(PROFILES.name) != last.customers:
        return None
    old = engine.table(PROFILES.name)
    gone = engine.scratch(
        "refresh_gone",
        old.select("customer_id", "orders").anti_join(engine.table("customers"), "customer_id"),
    )
    if int(gone.filter(gone.orders.fill_null(0) > 0).count().execute()):
        return None
    stored = old.semi_join(affected, "customer_id")
    stored = stored.select(
        old_id=stored.customer_id,
        **{f"old_{c}": stored[c] for c in (*FINISH_INPUTS, *DERIVED)},
    )
    j = fresh.left_join(stored, fresh.customer_id == stored.old_id)
    differs = j.old_id.isnull()
    for c in FINISH_INPUTS:
        differs |= ~j[c].identical_to(j[f"old_{c}"])
    rows: ir.Table | None
    if int(j.filter(differs).count().execute()):
        # Some input moved: the others' ranks may still stand (``refresh_ranks``).
        rows = rescored_rows(engine, as_of, fresh, affected)
        if rows is None:
            return None
    else:
        rows = j.select(
            *fresh.columns,
            **{c: j[f"old_{c}"] for c in DERIVED},
            computed_at=ibis.literal(as_of).cast(TS),
        )
        rows = engine.scratch("refresh_rows", engine.conform(PROFILES.name, rows))
    drop = affected.select("customer_id").union(gone.select("customer_id"), distinct=True)
    return rows, engine.scratch("refresh_drop", drop)


def write_traits(
    engine: Engine,
    traits: dict[str, TraitDef],
    facts: ir.Table,
    affected: ir.Table,
    as_of: datetime,
) -> None:
    """The affected customers' computed traits, from their facts; rows of customers gone
    dropped. Deletes and inserts in one transaction (Spark: the whole table swapped).

    The facts serve the traits when they read only columns the facts keep (as the built-in
    ones do); a trait may read any column of the log, and then the log's rows of those
    events are joined in.
    """
    as_of_lit = ibis.literal(as_of).cast(TS)
    customers = engine.table("customers").select("customer_id")
    ct = engine.table(COMPUTED_TRAITS.name)
    values: ir.Table | None = None
    if traits:
        mine = facts
        if any(t.column is not None and t.column not in FACT_COLUMNS for t in traits.values()):
            log = engine.table("events")
            j = log.join(facts.select("message_id", "customer_id"), "message_id")
            mine = engine.scratch("refresh_events", j)
        for t in traits.values():
            part = trait_values(engine, t, as_of_lit, customers=affected, events=mine)
            part = part.mutate(computed_at=as_of_lit)
            values = part if values is None else values.union(part, distinct=False)
    if not engine.can("temp_tables"):
        kept = ct.anti_join(affected, "customer_id").semi_join(customers, "customer_id")
        union = kept if values is None else kept.union(values, distinct=False)
        engine.replace(COMPUTED_TRAITS.name, union)
        return
    # Only the affected customers' rows and those of customers gone are rewritten.
    gone_ids = ct.select("customer_id").anti_join(customers, "customer_id")
    drop = engine.scratch(
        "refresh_trait_drop",
        affected.select("customer_id").union(gone_ids.distinct(), distinct=True),
    )
    rows = None
    if values is not None:
        rows = engine.scratch("refresh_traits", engine.conform(COMPUTED_TRAITS.name, values))
    with engine.transaction():
        engine.delete_keys(COMPUTED_TRAITS.name, drop)
        if rows is not None:
            engine.con.insert(COMPUTED_TRAITS.name, rows)
