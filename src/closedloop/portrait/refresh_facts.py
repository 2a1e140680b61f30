"""The affected customers' facts, their per-customer portrait, and everyone's network.

Only the events new to the snapshot are parsed (looked for among the shortcut's recent
events first); an event moved by a merge or split keeps its parsed facts from the snapshot
under its new customer; the affected customers' other events are read back from the
snapshot (``portrait_seen``), facts and all. See ``portrait.refresh`` for the whole design.
"""

from __future__ import annotations

from datetime import UTC, datetime

import ibis
import ibis.expr.types as ir

from closedloop.core.engine import Engine
from closedloop.portrait import localtime
from closedloop.portrait.build import _zones, base_expr, event_facts
from closedloop.portrait.extras import RELATION_EVENTS, network
from closedloop.portrait.refresh_compiled import cached_scratch
from closedloop.portrait.refresh_diff import Diff
from closedloop.portrait.refresh_write import base_columns
from closedloop.portrait.tables import PORTRAIT_SEEN

TS = "timestamp('UTC', 6)"
# Valid time zones the refreshes of this process met (see ``affected_base``).
_ZONES_SEEN: set[str] = set()
MAX_ZONES = 100
# The clock the base statement is compiled with when no fact lies after the real one.
FAR_CLOCK = datetime(9999, 12, 31, tzinfo=UTC)
PAIR = ["message_id", "customer_id"]


def seen_columns(t: ir.Table) -> ir.Table:
    """``t`` with the snapshot's columns in its order and types (for unions and writes)."""
    return t.select(*[t[c].cast(typ).name(c) for c, typ in PORTRAIT_SEEN.columns.items()])


def new_rows(engine: Engine, d: Diff) -> ir.Table:
    """The snapshot's rows to add: the new events parsed, the moved ones under their new
    customer with the facts the snapshot holds (materialised: read up to four times)."""
    diff, duckdb = d.diff, engine.backend == "duckdb"
    fresh_ids = diff.filter(diff.seen_customer_id.isnull() & diff.customer_id.notnull())
    fresh_ids = fresh_ids.select("message_id", "customer_id")
    parsed = None
    if d.short is not None:
        parsed = engine.scratch(
            "refresh_parsed", event_facts(d.short.recent.join(fresh_ids, "message_id"), duckdb)
        )
        if int(parsed.count().execute()) != int(fresh_ids.count().execute()):
            parsed = None  # a new message outside the recent events: from the whole log
    if parsed is None:
        log = engine.table("events")
        parsed = engine.scratch(
            "refresh_parsed", event_facts(log.join(fresh_ids, "message_id"), duckdb)
        )
    seen = engine.table(PORTRAIT_SEEN.name)
    moved_ids = diff.filter(diff.seen_customer_id.notnull() & diff.customer_id.notnull())
    moved = seen.drop("customer_id").join(
        moved_ids.select("message_id", "customer_id"), "message_id"
    )
    return engine.scratch(
        "refresh_new", seen_columns(parsed).union(seen_columns(moved), distinct=False)
    )


def affected_facts(engine: Engine, d: Diff, new: ir.Table, affected: ir.Table) -> ir.Table:
    """All the affected customers' events as facts: their snapshot rows still attributed,
    and their new rows (materialised as ``portrait_facts``)."""
    seen = engine.table(PORTRAIT_SEEN.name)
    still = seen.semi_join(affected, "customer_id")
    if d.any_gone:
        still = still.anti_join(d.gone, PAIR)
    return engine.scratch(
        "portrait_facts",
        seen_columns(still).union(seen_columns(new.semi_join(affected, "customer_id"))),
    )


def affected_base(
    engine: Engine, facts: ir.Table, affected: ir.Table, as_of: datetime, default_tz: str
) -> ir.Table:
    """The per-customer portrait (``build.base_expr``, no relationships) of the affected
    customers from their facts, materialised with the profile's base columns.

    Compiled once per set of zones (``refresh_compiled``): the customers, their facts and
    the zones' offsets come in as scratch tables of fixed names, and the clock only as
    ``base_expr``'s cut of the facts at ``as_of`` — when no fact lies after the clock (the
    usual case: an event stamped in the future is rare) that cut keeps every row whatever
    the clock, so the statement is compiled with a fixed far clock and serves every refresh.
    """
    current = facts.filter(facts.timestamp <= as_of)
    zones, lo = _zones(current, default_tz)
    # Every valid zone met before in this process joins the list: a superset changes no
    # value (a customer's zone is checked for validity, the offsets joined by zone) and
    # keeps the statement the same from one live refresh to the next.
    if len(_ZONES_SEEN) + len(zones) > MAX_ZONES:
        _ZONES_SEEN.clear()
    _ZONES_SEEN.update(zones)
    zones = sorted(_ZONES_SEEN)
    later = int(facts.filter(facts.timestamp > as_of).count().execute())
    cut = FAR_CLOCK if not later else as_of
    with engine.temporary(localtime.offsets_table(zones, lo, as_of)) as data:
        offsets = engine.scratch("refresh_offsets", data)

    def build() -> ir.Table:
        fresh = base_expr(
            engine,
            cut,
            offsets,
            zones,
            default_tz,
            customers=affected,
            with_relationships=False,
            facts=facts,
        )
        return base_columns(fresh)

    if later:
        return engine.scratch("refresh_fresh", build())
    return cached_scratch(engine, "refresh_fresh", (tuple(zones), default_tz), build)


def network_now(engine: Engine, d: Diff, new: ir.Table, as_of: datetime) -> ir.Table:
    """Everyone's network, from the relation events of the snapshot and the new ones,
    sender, kind and named member already parsed."""
    seen = engine.table(PORTRAIT_SEEN.name)
    rel = list(RELATION_EVENTS)
    rseen = seen.filter(seen.event.isin(rel))
    if d.any_gone:
        rseen = rseen.anti_join(d.gone, PAIR)
    rnew = new.filter(new.event.isin(rel))
    related = rseen.select("customer_id", "event", "member", "timestamp").union(
        rnew.select("customer_id", "event", "member", "timestamp")
    )
    related = related.filter(related.timestamp <= as_of)
    return engine.scratch("refresh_net", network(related, engine.table("identity_map")))


def network_stands(
    d: Diff, engine: Engine, new: ir.Table, since: datetime, as_of: datetime
) -> bool:
    """Whether everyone's network is as stored: no relation event came, went, moved or came
    into view and identity changed nobody (a named member may have become a customer) —
    known only from the shortcut."""
    if d.short is None or d.short.identity_changed:
        return False
    return not relations_moved(engine.table(PORTRAIT_SEEN.name), new, d.gone, since, as_of)


def relations_moved(
    seen: ir.Table, new: ir.Table, gone: ir.Table, since: datetime, as_of: datetime
) -> bool:
    """Whether a relation event is among the new or moved events, the pairs gone, or the
    snapshot's events the clock brought into view (stamped after the last clock)."""
    rel = list(RELATION_EVENTS)
    lo, hi = ibis.literal(since).cast(TS), ibis.literal(as_of).cast(TS)
    into_view = seen.event.isin(rel) & (seen.timestamp > lo) & (seen.timestamp <= hi)
    hits = [
        new.filter(new.event.isin(rel)).count(),
        seen.semi_join(gone.select("message_id"), "message_id")
        .filter(lambda t: t.event.isin(rel))
        .count(),
        seen.filter(into_view).count(),
    ]
    return any(int(h.execute()) for h in hits)
