"""Freshness: recompute only the customers whose portrait can have changed.

A refresh compares the state now with the state the last build read and recomputes the
per-customer part of the portrait (``build.base_expr``) and the traits only for the customers
it touches:

* events attributed differently — new messages, erased ones, or messages moved by an
  identity merge or split (``event_customers`` against the ``portrait_seen`` snapshot);
* events that the clock moved into view (timestamp between the last build's clock and now)
  or out of a trait's window (timestamp between the last clock and now, minus the window);
* customers without a profile yet.

Finding the attribution changes without the whole snapshot (``shortcut_diff``): the
candidates are the events stamped after the last clock or received after the identity
watermark the last run had read, and every event of a customer identity recorded as
changed since (``identity_changes``: merges and splits move old events). Only those pairs
are compared — after a check that nothing else changed: event_customers less the
candidates' pairs must have the count and hash-XOR the snapshot less theirs has (the
snapshot's signature is kept in ``portrait_marks``, written with the run record). A late
event with an old stamp, an erasure, a change identity did not record, or a bulk load
stamped at one instant (too many candidates) means the whole comparison, and
``RefreshResult.diff`` (and the marks row) says why. The check reads one table whole —
a hash per pair, a tenth of the outer join it replaces.

The snapshot (``portrait_seen``) keeps, beside each event's customer, the facts the portrait
reads from it with the JSON parsed (``build.event_facts``): a refresh parses only the events
new to it (an event a merge moved keeps its facts under its new customer) and reads the
affected customers' other events back from it, so their portrait is re-aggregated from
stored facts and the JSON of old events is never parsed again.

A change to the identity map alone, without any event moving, is seen when identity
records the customer as changed (identifiers gained or lost: ``identity_changes``) and the
last run left marks; otherwise (an identifier quarantined in place) it shows on the
customer's next event, or with ``--full``.

What depends on the clock or on everyone — age, recency, lifecycle, RFM ranks, and the
referral network — stands as stored when it cannot have moved: the network when no
relation event came, went, moved or came into view and identity changed nobody; the rest
on the last run's clock date when no buyer came or went and either nothing ``finish`` reads
moved for an affected customer, or what moved (orders, revenue, recency) crosses no other
buyer's RFM quintile boundary (``refresh_ranks``: then only the affected rows are finished,
their scores counted among everyone's keys) — a live refresh seconds after the last. Otherwise it is
recomputed for all customers on a narrow table (the customer id and the six stored columns
it reads, no events), so "no order in 30 days" becomes true on a scheduled refresh with no
new events at all; only the rows where those values moved are rewritten beside the
affected customers' (``RefreshResult.changed``).

Writes: on engines that delete rows (``temp_tables``), the profile rows and trait rows that
change are deleted and inserted in one transaction each (rows rewritten carry the clock in
``computed_at``; the latest run's clock says when all were current, see
``lookup.profiles_clock``); elsewhere (Spark) whole-table swaps (``Engine.replace``). The
snapshot gains the new events' rows and loses the pairs no longer attributed in the
transaction that appends the run record and its marks. A crash leaves each table as it was
or as new, never half-written; the snapshot and the run record are written last, so after
a crash the next refresh sees the same changes again and redoes them (recomputing is
idempotent, and rows already rewritten compare equal). A full build drops the marks before
it replaces the snapshot. A snapshot written before it kept the facts means a full build.

The steps live in small modules: ``refresh_state`` (the last run, its marks, identity's
runs), ``refresh_diff`` (the attribution diff and the affected customers), ``refresh_facts``
(their facts, their per-customer portrait, the network), ``refresh_compiled`` (that
portrait's SQL compiled once per process and zone set: a live refresh's fixed cost),
``refresh_ranks`` and ``refresh_write`` (the rows written). ``RefreshResult.steps`` gives
the CPU seconds of each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import ibis.expr.types as ir
import pyarrow as pa

from closedloop.core.clock import Clock
from closedloop.core.definitions.accounts import AccountsConfig
from closedloop.core.definitions.traits import TraitDef
from closedloop.core.engine import Engine
from closedloop.portrait.accounts import build_accounts
from closedloop.portrait.build import (
    build_profiles,
    fill_relationships,
    finish,
    parse_facts,
)
from closedloop.portrait.refresh_diff import (
    affected_by,
    find_diff,
    pair_signature,
    pair_values,
)
from closedloop.portrait.refresh_facts import (
    affected_base,
    affected_facts,
    network_now,
    network_stands,
    new_rows,
    seen_columns,
)
from closedloop.portrait.refresh_state import (
    Marks,
    identity_now,
    last_run,
    marks_now,
    shortcuts_possible,
    traits_digest,
)
from closedloop.portrait.refresh_write import (
    base_columns,
    write_profiles,
    write_traits,
)
from closedloop.portrait.tables import (
    COMPUTED_TRAITS,
    PORTRAIT_MARKS,
    PORTRAIT_RUNS,
    PORTRAIT_SEEN,
    PROFILES,
)
from closedloop.portrait.traits import build_traits

TS = "timestamp('UTC', 6)"


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
    # How the attribution diff was found: 'shortcut' (from the candidates, checked), or why
    # the whole snapshot was compared ('' after a full build). Also in ``portrait_marks``.
    diff: str = ""


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
    marks: Marks | None = None,
    how: str = "",
) -> RefreshResult:
    """Write the snapshot and the run record (last: they make the next refresh incremental).

    A full build gives the whole ``snapshot`` (the attributed events with their facts). A
    refresh gives only the new rows, and ``gone``, the pairs no longer attributed (None when
    there are none): the snapshot loses those rows and gains the new ones, rewritten whole
    where the engine cannot delete (Spark). Copying the whole snapshot again was an eighth
    of a refresh at 100,000 persons. ``marks`` (the snapshot's signature after the write,
    and the identity run read) go in the same transaction as the run record and, on a
    refresh, the snapshot's rows: a shortcut is only ever taken from marks that describe
    the snapshot. A full build drops every mark before it replaces the snapshot, so a crash
    in between leaves the next refresh comparing the whole snapshot. A crash after the
    snapshot and before the run record is harmless otherwise: the profiles of those
    customers were written already, and the clock part is redone from the old run's clock.
    """
    name = PORTRAIT_SEEN.name
    deletes = engine.can("temp_tables")
    new: ir.Table | None = None
    if mode == "full":
        if deletes and engine.exists(PORTRAIT_MARKS.name):
            marks_t = engine.table(PORTRAIT_MARKS.name)
            engine.delete_keys(PORTRAIT_MARKS.name, marks_t.select("finished_at"))
        engine.replace(name, snapshot)
    elif gone is None and not deletes:
        engine.append(name, snapshot)
    elif deletes:
        new = engine.scratch("refresh_seen_new", engine.conform(name, snapshot))
    else:
        seen = engine.table(name)
        kept = seen.anti_join(gone, ["message_id", "customer_id"])
        engine.replace(name, seen_columns(kept).union(seen_columns(snapshot)))
    customers = engine.count(PROFILES.name)
    seconds = time.perf_counter() - started
    finished = datetime.now(UTC)
    row = {
        "finished_at": [finished],
        "as_of": [as_of],
        "mode": [mode],
        "customers": [customers],
        "recomputed": [recomputed],
        "traits_digest": [digest],
        "seconds": [seconds],
    }
    with engine.transaction():
        if new is not None:
            if gone is not None:
                # By the message id alone, the snapshot's key: the same rows as by the
                # pair, for half the probing (0.5 CPU-s at 100,000 persons after 1%).
                engine.delete_keys(name, gone.select("message_id"))
            engine.con.insert(name, new)
        engine.append(PORTRAIT_RUNS.name, pa.table(row))
        if marks is not None and deletes:
            x = marks.pairs_xor - 2**64 if marks.pairs_xor >= 2**63 else marks.pairs_xor
            mark = {
                "finished_at": [finished],
                "identity_seq": [marks.identity_seq],
                "received": [marks.received],
                "pairs": [marks.pairs],
                "pairs_xor": [x],
                "diff": [how],
            }
            engine.append(PORTRAIT_MARKS.name, pa.table(mark))
    n_traits = engine.count(COMPUTED_TRAITS.name)
    if steps is not None:
        steps.lap("record")
    times = steps.times if steps is not None else {}
    return RefreshResult(
        mode,
        customers,
        recomputed,
        n_traits,
        seconds,
        times,
        affected=affected,
        changed=changed,
        diff=how,
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
    identity = identity_now(engine) if shortcuts_possible(engine) else None
    facts = parse_facts(engine)
    n = build_profiles(engine, clock, default_tz, accounts, facts=facts)
    build_traits(engine, traits, clock)
    pairs = None
    if identity is not None:
        pairs = pair_values(pair_signature(facts).to_pyarrow().to_pylist()[0])
    marks = marks_now(engine, identity, pairs)
    return _record(engine, as_of, "full", n, traits_digest(traits), started, facts, marks=marks)


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
    possible = shortcuts_possible(engine)
    identity = identity_now(engine) if possible else None
    d = find_diff(engine, last, identity, possible)
    affected = affected_by(engine, d, last, as_of, windows, identity)
    recomputed = int(affected.count().execute())
    steps.lap("diff")
    new = new_rows(engine, d)
    facts = affected_facts(engine, d, new, affected)
    steps.lap("facts")
    fresh = affected_base(engine, facts, affected, as_of, default_tz)
    steps.lap("affected_portrait")

    def everyones_network() -> ir.Table:
        return network_now(engine, d, new, as_of)

    net = None if network_stands(d, engine, new, last.as_of, as_of) else everyones_network()
    steps.lap("network")
    customers = engine.table("customers").select("customer_id")
    old = engine.table(PROFILES.name)
    keep = old.anti_join(affected, "customer_id").semi_join(customers, "customer_id")
    changed: ir.Table | None = None
    if engine.can("temp_tables"):
        changed = write_profiles(engine, as_of, last, fresh, keep, net, affected, everyones_network)
    else:  # no deletes (Spark): the whole table, swapped in one step
        net = everyones_network() if net is None else net
        base = base_columns(keep).union(fresh, distinct=False)
        base = base.left_join(net, "customer_id").drop("customer_id_right")
        base = engine.scratch("portrait_base", fill_relationships(base))  # read twice
        engine.replace(PROFILES.name, finish(base, as_of))
    steps.lap("profiles")
    build_accounts(engine, as_of, accounts)  # whole: see portrait.accounts
    steps.lap("accounts")
    write_traits(engine, traits, facts, affected, as_of)
    steps.lap("traits")
    return _record(
        engine,
        as_of,
        "incremental",
        recomputed,
        digest,
        started,
        new,
        d.gone if d.any_gone else None,
        steps=steps,
        affected=affected,
        changed=changed,
        marks=marks_now(engine, identity, d.pairs),
        how=d.how,
    )


class _Steps:
    """CPU seconds of each step of a refresh (``RefreshResult.steps``: where the time goes)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._at = time.process_time()

    def lap(self, name: str) -> None:
        at = time.process_time()
        self.times[name] = round(self.times.get(name, 0.0) + at - self._at, 3)
        self._at = at
