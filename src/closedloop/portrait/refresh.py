"""Freshness: recompute only the customers whose portrait can have changed.

A refresh compares the state now with the state the last build read and recomputes the
per-customer part of the portrait (``build.base_expr``) and the traits only for the customers
it touches:

* events attributed differently — new messages, erased ones, or messages moved by an
  identity merge or split (``event_customers`` against the ``portrait_seen`` snapshot);
* events that the clock moved into view (timestamp between the last build's clock and now)
  or out of a trait's window (timestamp between the last clock and now, minus the window);
* customers without a profile yet.

The snapshot (``portrait_seen``) keeps, beside each event's customer, the facts the portrait
reads from it with the JSON parsed (``build.event_facts``): a refresh parses only the events
new to it and reads the affected customers' other events back from it, so their portrait
is re-aggregated from stored facts and the JSON of old events is never parsed again.

Not seen by the comparison: a change to the identity map alone (an identifier quarantined
or blocked without any event moving) — it shows on the customer's next event, or with
``--full``.

What depends on the clock or on everyone — age, recency, lifecycle, RFM ranks, and the
referral network — is then recomputed for all customers on a narrow table (the customer id
and the six stored columns it reads, no events), so "no order in 30 days" becomes true on a
scheduled refresh with no new events at all; only the rows where those values moved are
rewritten beside the affected customers' (``RefreshResult.changed``).

Writes: on engines that delete rows (``temp_tables``), the profile rows and trait rows that
change are deleted and inserted in one transaction each (every profile's ``computed_at``
set to the clock in the profiles one); elsewhere (Spark) whole-table swaps
(``Engine.replace``). The snapshot gains the new events' rows and loses the pairs no longer
attributed in one transaction. A crash leaves each table as it was or as new, never
half-written; the snapshot and the run record are written last, so after a crash the next
refresh sees the same changes again and redoes them (recomputing is idempotent, and rows
already rewritten compare equal). A snapshot written before it kept the facts means a full
build.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import ibis
import ibis.expr.types as ir
import pyarrow as pa

from closedloop.core.clock import Clock
from closedloop.core.definitions.accounts import AccountsConfig
from closedloop.core.definitions.traits import TraitDef
from closedloop.core.engine import Engine
from closedloop.portrait import localtime
from closedloop.portrait.accounts import build_accounts
from closedloop.portrait.build import (
    _zones,
    base_expr,
    build_profiles,
    event_facts,
    fill_relationships,
    finish,
    parse_facts,
)
from closedloop.portrait.extras import RELATION_EVENTS, RELATIONSHIP_COLUMNS, network
from closedloop.portrait.tables import (
    COMPUTED_TRAITS,
    FACT_COLUMNS,
    PORTRAIT_RUNS,
    PORTRAIT_SEEN,
    PROFILES,
)
from closedloop.portrait.traits import build_traits, trait_values

TS = "timestamp('UTC', 6)"
# Profile columns recomputed for everyone on every refresh (see ``build.finish``).
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


@dataclass(frozen=True)
class RefreshResult:
    mode: str  # 'full' or 'incremental'
    customers: int
    recomputed: int  # customers whose per-customer portrait and traits were recomputed
    traits: int  # rows in computed_traits
    seconds: float
    steps: dict[str, float] = field(default_factory=dict)  # CPU seconds per step (refresh)
    # An incremental refresh's customers (``customer_id``), as scratch tables of the engine's
    # connection, valid until its next refresh (None after a full build: everyone):
    affected: ir.Table | None = None  # per-customer portrait and traits recomputed
    changed: ir.Table | None = None  # profile rows rewritten or deleted (None: all rewritten)


@dataclass(frozen=True)
class LastRun:
    as_of: datetime
    traits_digest: str


def traits_digest(traits: dict[str, TraitDef]) -> str:
    """A fingerprint of the trait definitions: a changed definition needs a full trait build."""
    text = json.dumps(
        [t.model_dump(mode="json") for _, t in sorted(traits.items())], sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def last_run(engine: Engine) -> LastRun | None:
    """The last recorded build or refresh; None when a full build is needed.

    A snapshot without the parsed facts (written before they were kept) needs one too.
    """
    if not engine.exists(PORTRAIT_RUNS.name) or not engine.exists(PROFILES.name):
        return None
    if not engine.exists(PORTRAIT_SEEN.name):
        return None
    if set(PORTRAIT_SEEN.columns) - set(engine.table(PORTRAIT_SEEN.name).columns):
        return None
    runs = engine.table(PORTRAIT_RUNS.name)
    rows = runs.order_by(ibis.desc(runs.finished_at)).limit(1).to_pyarrow().to_pylist()
    if not rows:
        return None
    as_of = rows[0]["as_of"]
    return LastRun(as_of.astimezone(UTC), str(rows[0]["traits_digest"]))


def attribution_changes(engine: Engine) -> tuple[ir.Table, ir.Table]:
    """(added, gone): event → customer pairs in ``event_customers`` and not in the snapshot,
    and the reverse. New events are ``added``; an event moved by a merge or split is both."""
    return _sides(attribution_diff(engine))


def attribution_diff(engine: Engine) -> ir.Table:
    """Events whose attribution differs from the snapshot's: (message_id, customer_id — now,
    null when the event left —, seen_customer_id — in the snapshot, null when new).

    One outer join on the message id (the key of both relations) gives both sides: two
    anti-joins on the pair hashed each relation once more, a tenth of a refresh at 100,000
    persons. Materialise it when both sides are read.
    """
    ec = engine.table("event_customers").select("message_id", "customer_id")
    seen = engine.table(PORTRAIT_SEEN.name)
    seen = seen.select(seen_message_id=seen.message_id, seen_customer_id=seen.customer_id)
    j = ec.outer_join(seen, ec.message_id == seen.seen_message_id)
    differs = j.customer_id.isnull() | j.seen_customer_id.isnull()
    differs |= j.customer_id != j.seen_customer_id
    return j.filter(differs).select(
        message_id=j.message_id.fill_null(j.seen_message_id),
        customer_id=j.customer_id,
        seen_customer_id=j.seen_customer_id,
    )


def _sides(diff: ir.Table) -> tuple[ir.Table, ir.Table]:
    """(added, gone) pairs of an ``attribution_diff``: an event moved is in both."""
    added = diff.filter(diff.customer_id.notnull()).select("message_id", "customer_id")
    gone = diff.filter(diff.seen_customer_id.notnull())
    return added, gone.select("message_id", customer_id=gone.seen_customer_id)


def affected_customers(
    engine: Engine,
    since: datetime,
    as_of: datetime,
    windows: set[int],
    changes: tuple[ir.Table, ir.Table] | None = None,
) -> ir.Table:
    """Customers whose per-customer portrait or traits may differ from the last build's.

    ``changes`` may give ``attribution_changes`` already materialised. Events the clock
    moves are looked up in the snapshot (customer and time, no join with the log): an event
    not in it is ``added``, so its customer is affected already.
    """
    added, gone = changes or attribution_changes(engine)
    parts = [
        added.select("customer_id"),
        gone.select("customer_id"),
        engine.table("customers")
        .anti_join(engine.table(PROFILES.name), "customer_id")
        .select("customer_id"),
    ]
    ev = engine.table(PORTRAIT_SEEN.name)
    lo, hi = ibis.literal(since).cast(TS), ibis.literal(as_of).cast(TS)
    moved = (ev.timestamp > lo) & (ev.timestamp <= hi)
    for days in sorted(windows):
        w = ibis.interval(days=days)
        moved |= (ev.timestamp > lo - w) & (ev.timestamp <= hi - w)
    parts.append(ev.filter(moved).select("customer_id"))
    out = parts[0]
    for p in parts[1:]:
        out = out.union(p, distinct=True)
    return out.distinct()


def _base_columns(t: ir.Table) -> ir.Table:
    return t.select(*[t[c].cast(PROFILES.columns[c]).name(c) for c in BASE_COLUMNS])


def _record(
    engine: Engine,
    as_of: datetime,
    mode: str,
    recomputed: int,
    digest: str,
    started: float,
    snapshot: ir.Table,
    gone: ir.Table | None = None,
    *,
    steps: _Steps | None = None,
    affected: ir.Table | None = None,
    changed: ir.Table | None = None,
) -> RefreshResult:
    """Write the snapshot and the run record (last: they make the next refresh incremental).

    A full build gives the whole ``snapshot`` (the attributed events with their facts). A
    refresh gives only the new rows, and ``gone``, the pairs no longer attributed (None when
    there are none): the snapshot loses those rows and gains the new ones, in one
    transaction where the engine has them, rewritten whole where it cannot delete (Spark).
    Copying the whole snapshot again was an eighth of a refresh at 100,000 persons. A crash
    after the snapshot and before the run record is harmless: the profiles of those
    customers were written already, and the clock part is redone from the old run's clock.
    """
    name = PORTRAIT_SEEN.name
    if mode == "full":
        engine.replace(name, snapshot)
    elif gone is None:
        engine.append(name, snapshot)
    elif engine.can("temp_tables"):
        new = engine.scratch("refresh_seen_new", engine.conform(name, snapshot))
        with engine.transaction():
            engine.delete_keys(name, gone)
            engine.con.insert(name, new)
    else:
        seen = engine.table(name)
        kept = seen.anti_join(gone, ["message_id", "customer_id"])
        engine.replace(name, _seen_columns(kept).union(_seen_columns(snapshot)))
    customers = engine.count(PROFILES.name)
    seconds = time.perf_counter() - started
    row = {
        "finished_at": [datetime.now(UTC)],
        "as_of": [as_of],
        "mode": [mode],
        "customers": [customers],
        "recomputed": [recomputed],
        "traits_digest": [digest],
        "seconds": [seconds],
    }
    engine.append(PORTRAIT_RUNS.name, pa.table(row))
    n_traits = engine.count(COMPUTED_TRAITS.name)
    if steps is not None:
        steps.lap("record")
    times = steps.times if steps is not None else {}
    return RefreshResult(
        mode, customers, recomputed, n_traits, seconds, times, affected=affected, changed=changed
    )


def full_build(
    engine: Engine,
    traits: dict[str, TraitDef],
    clock: Clock | None = None,
    default_tz: str = "UTC",
    accounts: AccountsConfig | None = None,
) -> RefreshResult:
    """Rebuild profiles and traits for everyone, and record the state a refresh starts from."""
    started = time.perf_counter()
    clock = clock or Clock()
    as_of = clock.now()
    facts = parse_facts(engine)
    n = build_profiles(engine, clock, default_tz, accounts, facts=facts)
    build_traits(engine, traits, clock)
    return _record(engine, as_of, "full", n, traits_digest(traits), started, facts)


def refresh(
    engine: Engine,
    traits: dict[str, TraitDef],
    clock: Clock | None = None,
    default_tz: str = "UTC",
    *,
    full: bool = False,
    accounts: AccountsConfig | None = None,
) -> RefreshResult:
    """Bring profiles and traits up to the clock, recomputing only affected customers.

    Falls back to a full build when there is no previous run, when asked, when the clock went
    backwards, or when the trait definitions changed. B2B accounts are rebuilt whole either
    way, with roles read as ``accounts`` (the project's accounts.yaml) says.
    """
    clock = clock or Clock()
    as_of = clock.now()
    last = last_run(engine)
    digest = traits_digest(traits)
    if full or last is None or as_of < last.as_of or last.traits_digest != digest:
        return full_build(engine, traits, clock, default_tz, accounts)
    started = time.perf_counter()
    steps = _Steps()
    windows = {t.window_days for t in traits.values() if t.window_days}
    duckdb = engine.backend == "duckdb"
    # The attribution diff, once: it finds affected customers and then updates the snapshot.
    added, gone = _sides(engine.scratch("refresh_diff", attribution_diff(engine)))
    any_gone = int(gone.count().execute()) > 0
    affected = engine.scratch(
        "refresh_affected",
        affected_customers(engine, last.as_of, as_of, windows, (added, gone)),
    )
    recomputed = int(affected.count().execute())
    customers = engine.table("customers").select("customer_id")

    steps.lap("diff")
    # Only the events new to the snapshot are parsed; the affected customers' other events
    # are read back from it, facts and all (the snapshot's pairs still attributed).
    log = engine.table("events")
    new = engine.scratch("refresh_new", event_facts(log.join(added, "message_id"), duckdb))
    seen = engine.table(PORTRAIT_SEEN.name)
    pair = ["message_id", "customer_id"]
    still = seen.semi_join(affected, "customer_id")
    if any_gone:
        still = still.anti_join(gone, pair)
    facts = engine.scratch(
        "portrait_facts",
        _seen_columns(still).union(_seen_columns(new.semi_join(affected, "customer_id"))),
    )
    steps.lap("facts")
    current = facts.filter(facts.timestamp <= as_of)
    zones, lo = _zones(current, default_tz)
    with engine.temporary(localtime.offsets_table(zones, lo, as_of)) as offsets:
        fresh = base_expr(
            engine,
            as_of,
            offsets,
            zones,
            default_tz,
            customers=affected,
            with_relationships=False,
            facts=facts,
        )
        fresh = engine.scratch("refresh_fresh", _base_columns(fresh))
    steps.lap("affected_portrait")
    # The network reads everyone's relation events: from the snapshot and the new ones,
    # sender, kind and named member already parsed.
    rel = list(RELATION_EVENTS)
    rseen = seen.filter(seen.event.isin(rel))
    if any_gone:
        rseen = rseen.anti_join(gone, pair)
    rnew = new.filter(new.event.isin(rel))
    related = rseen.select("customer_id", "event", "member", "timestamp").union(
        rnew.select("customer_id", "event", "member", "timestamp")
    )
    related = related.filter(related.timestamp <= as_of)
    net = engine.scratch("refresh_net", network(related, engine.table("identity_map")))
    steps.lap("network")
    old = engine.table(PROFILES.name)
    keep = old.anti_join(affected, "customer_id").semi_join(customers, "customer_id")
    if engine.can("temp_tables"):
        changed = _write_profiles(engine, as_of, fresh, keep, net, affected)
    else:  # no deletes (Spark): the whole table, swapped in one step
        base = _base_columns(keep).union(fresh, distinct=False)
        base = base.left_join(net, "customer_id").drop("customer_id_right")
        base = engine.scratch("portrait_base", fill_relationships(base))  # read twice
        engine.replace(PROFILES.name, finish(base, as_of))
        changed = None
    steps.lap("profiles")
    build_accounts(engine, as_of, accounts)  # whole: see portrait.accounts
    steps.lap("accounts")

    as_of_lit = ibis.literal(as_of).cast(TS)
    ct = engine.table(COMPUTED_TRAITS.name)
    values: ir.Table | None = None
    if traits:
        # The affected customers' facts serve the traits when they read only columns the
        # facts keep (as the built-in ones do); a trait may read any column of the log, and
        # then the log's rows of those events are joined in.
        mine = facts
        if any(t.column is not None and t.column not in FACT_COLUMNS for t in traits.values()):
            j = log.join(facts.select("message_id", "customer_id"), "message_id")
            mine = engine.scratch("refresh_events", j)
        for t in traits.values():
            part = trait_values(engine, t, as_of_lit, customers=affected, events=mine)
            part = part.mutate(computed_at=as_of_lit)
            values = part if values is None else values.union(part, distinct=False)
    if engine.can("temp_tables"):
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
    else:
        kept = ct.anti_join(affected, "customer_id").semi_join(customers, "customer_id")
        union = kept if values is None else kept.union(values, distinct=False)
        engine.replace(COMPUTED_TRAITS.name, union)
    steps.lap("traits")
    gone_pairs = gone if any_gone else None
    return _record(
        engine,
        as_of,
        "incremental",
        recomputed,
        digest,
        started,
        new,
        gone_pairs,
        steps=steps,
        affected=affected,
        changed=changed,
    )


# The stored columns ``finish`` reads (beside the customer id).
FINISH_INPUTS = ("birthday", "last_order_at", "first_order_at", "orders", "revenue", "member_id")


def _write_profiles(
    engine: Engine,
    as_of: datetime,
    fresh: ir.Table,
    keep: ir.Table,
    net: ir.Table,
    affected: ir.Table,
) -> ir.Table:
    """Rewrite only the profile rows that change; returns their customer ids (and the gone).

    What depends on everyone or on the clock (RFM ranks, recency, age, lifecycle, the
    referral network) is recomputed for all customers on a narrow table — the customer id
    and the six stored columns ``finish`` reads — and compared with the stored values: a
    row is rewritten when its customer is affected or any of those values moved. On a live
    refresh seconds after the last one that is a handful of rows, so the write no longer
    grows with the warehouse (a whole-table swap was a third of a refresh at 100,000
    persons); a new day moves recency for every buyer and rewrites most rows, as it must.
    The rows go in one transaction (delete, then insert, then every row's ``computed_at``
    set to the clock): readers see old or new.
    """
    cols = ["customer_id", *FINISH_INPUTS]
    narrow = keep.select(*cols).union(fresh.select(*cols), distinct=False)
    narrow = narrow.left_join(net, "customer_id").drop("customer_id_right")
    narrow = engine.scratch("refresh_narrow", fill_relationships(narrow))  # read twice
    derived = [c for c in (*FINISH_COLUMNS, *RELATIONSHIP_COLUMNS) if c != "computed_at"]
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
    rows = _base_columns(keep.semi_join(drop, "customer_id")).union(fresh, distinct=False)
    rows = rows.join(now, "customer_id")
    rows = engine.scratch("refresh_rows", engine.conform(PROFILES.name, rows))
    with engine.transaction():
        engine.delete_keys(PROFILES.name, drop)
        engine.con.insert(PROFILES.name, rows)
        _stamp(engine, PROFILES.name, as_of)
    return drop


def _stamp(engine: Engine, name: str, as_of: datetime) -> None:
    """Set every row's ``computed_at`` to the refresh's clock: rows not rewritten are
    current as of it too, and readers rely on one clock for all profiles (the lookup store
    keeps it once). One narrow column; the statement is built with sqlglot (Ibis has no
    UPDATE) from the declared table name and a timestamp, never from user text."""
    import sqlglot as sg
    import sqlglot.expressions as sge

    stamp = sg.cast(sge.Literal.string(as_of.astimezone(UTC).isoformat()), "TIMESTAMPTZ")
    stmt = sge.Update(
        this=sge.table_(name, quoted=True),
        expressions=[sge.EQ(this=sg.column("computed_at", quoted=True), expression=stamp)],
    )
    engine.con.raw_sql(stmt.sql(engine.con.dialect))


class _Steps:
    """CPU seconds of each step of a refresh (``RefreshResult.steps``: where the time goes)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._at = time.process_time()

    def lap(self, name: str) -> None:
        at = time.process_time()
        self.times[name] = round(self.times.get(name, 0.0) + at - self._at, 3)
        self._at = at


def _seen_columns(t: ir.Table) -> ir.Table:
    """``t`` with the snapshot's columns in its order and types (for unions and writes)."""
    return t.select(*[t[c].cast(typ).name(c) for c, typ in PORTRAIT_SEEN.columns.items()])
