"""Freshness: recompute only the customers whose portrait can have changed.

A refresh compares the state now with the state the last build read and recomputes the
per-customer part of the portrait (``build.base_expr``) and the traits only for the customers
it touches:

* events attributed differently — new messages, erased ones, or messages moved by an
  identity merge or split (``event_customers`` against the ``portrait_seen`` snapshot);
* events that the clock moved into view (timestamp between the last build's clock and now)
  or out of a trait's window (timestamp between the last clock and now, minus the window);
* customers without a profile yet.

Finding the attribution changes without the whole snapshot (``_shortcut_diff``): the
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
on the last run's clock date when nothing ``finish`` reads moved for an affected customer
and no buyer came or went (a live refresh seconds after the last). Otherwise it is
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
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import ibis
import ibis.expr.types as ir
import pyarrow as pa

from closedloop.core.clock import Clock
from closedloop.core.definitions.accounts import AccountsConfig
from closedloop.core.definitions.traits import TraitDef
from closedloop.core.engine import Engine
from closedloop.core.signature import signature
from closedloop.core.signature import values as signature_values
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
    PORTRAIT_MARKS,
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
    # How the attribution diff was found: 'shortcut' (from the candidates, checked), or why
    # the whole snapshot was compared ('' after a full build). Also in ``portrait_marks``.
    diff: str = ""


@dataclass(frozen=True)
class Marks:
    """What a run left for the next one's shortcut (``portrait_marks``)."""

    identity_seq: int  # the identity run event_customers was read after
    received: datetime | None  # that run's watermark (latest received_at it read)
    pairs: int  # the snapshot's (message, customer) pairs after the run
    pairs_xor: int  # XOR of their 64-bit hashes (unsigned)


@dataclass(frozen=True)
class LastRun:
    as_of: datetime
    traits_digest: str
    customers: int = -1  # profile rows the run left (-1: unknown)
    marks: Marks | None = None  # None: the next refresh compares the whole snapshot


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
    customers = rows[0]["customers"]
    return LastRun(
        as_of.astimezone(UTC),
        str(rows[0]["traits_digest"]),
        -1 if customers is None else int(customers),
        _marks(engine, rows[0]["finished_at"]),
    )


def _marks(engine: Engine, finished_at: datetime) -> Marks | None:
    """The marks written with the run that finished at ``finished_at`` (None: none)."""
    if not engine.exists(PORTRAIT_MARKS.name):
        return None
    t = engine.table(PORTRAIT_MARKS.name)
    at = ibis.literal(finished_at).cast(TS)
    rows = t.filter(t.finished_at == at).limit(1).to_pyarrow().to_pylist()
    if not rows or None in (rows[0]["identity_seq"], rows[0]["pairs"], rows[0]["pairs_xor"]):
        return None
    r = rows[0]
    received = r["received"].astimezone(UTC) if r["received"] is not None else None
    return Marks(int(r["identity_seq"]), received, int(r["pairs"]), int(r["pairs_xor"]) % 2**64)


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
    return _diff(ec, engine.table(PORTRAIT_SEEN.name))


def _diff(ec: ir.Table, seen: ir.Table) -> ir.Table:
    """``attribution_diff`` of two (message_id, customer_id) relations: now and the snapshot."""
    seen = seen.select(seen_message_id=seen.message_id, seen_customer_id=seen.customer_id)
    j = ec.outer_join(seen, ec.message_id == seen.seen_message_id)
    differs = j.customer_id.isnull() | j.seen_customer_id.isnull()
    differs |= j.customer_id != j.seen_customer_id
    return j.filter(differs).select(
        message_id=j.message_id.fill_null(j.seen_message_id),
        customer_id=j.customer_id,
        seen_customer_id=j.seen_customer_id,
    )


def _signature(t: ir.Table) -> ir.Table:
    """(n, x): the count of ``t``'s (message_id, customer_id) pairs and the XOR of their
    hashes (``core.signature``; message ids are keys: no pair twice)."""
    return signature(t, "message_id", "customer_id")


def _sig(row: dict[str, object], n: str = "n", x: str = "x") -> tuple[int, int]:
    return signature_values(row, n, x)


def _identity_now(engine: Engine) -> tuple[int, datetime | None] | None:
    """(seq, watermark) of the latest identity run: read before ``event_customers``, so
    every later change to it comes from a later run. None: no run recorded."""
    if not engine.exists("identity_runs"):
        return None
    runs = engine.table("identity_runs")
    if "watermark" not in runs.columns:
        return None
    rows = runs.order_by(ibis.desc(runs.seq)).limit(1).to_pyarrow().to_pylist()
    if not rows or rows[0]["seq"] is None:
        return None
    mark = rows[0]["watermark"]
    return int(rows[0]["seq"]), None if mark is None else mark.astimezone(UTC)


def _identity_changed(engine: Engine, since_seq: int) -> ir.Table | None:
    """Customers identity recorded as changed (merged, split, grown...) by runs after
    ``since_seq``, materialised; None when identity keeps no such record."""
    if not engine.exists("identity_changes"):
        return None
    runs = engine.table("identity_runs")
    later = runs.filter(runs.seq > since_seq).select("run_id")
    ch = engine.table("identity_changes")
    return engine.scratch(
        "refresh_id_changed", ch.semi_join(later, "run_id").select("customer_id").distinct()
    )


@dataclass(frozen=True)
class _Shortcut:
    """The attribution diff found without the whole snapshot (``_shortcut_diff``)."""

    diff: ir.Table
    pairs: tuple[int, int]  # the signature of event_customers: the snapshot's after the run
    recent: ir.Table  # the events the new messages were looked for in
    identity_changed: int  # customers identity changed since the last run
    changed: ir.Table  # those customers (``customer_id``)


def _shortcut_diff(engine: Engine, last: LastRun, marks: Marks) -> tuple[_Shortcut | None, str]:
    """The attribution diff from the messages that can have changed, if the check holds.

    Candidates: events stamped after the last run's clock or received after the identity
    watermark it had read (or never stamped), and every event, now or in the snapshot, of
    a customer identity changed since (a merge or split moves old events). The shortcut
    trusts that nothing else changed only after checking it: event_customers less the
    candidates' pairs must have the count and hash-XOR of the snapshot less theirs (the
    snapshot's own are kept in ``portrait_marks``; one scan of one table, no join). A late
    event with an old stamp, an erasure, or anything else outside the candidates fails
    the check: then (None, why) and the caller compares the whole snapshot.
    """
    changed = _identity_changed(engine, marks.identity_seq)
    if changed is None:
        return None, "identity records no changes"
    ec = engine.table("event_customers").select("message_id", "customer_id")
    seen = engine.table(PORTRAIT_SEEN.name)
    recent = _recent_events(engine, last.as_of, marks.received)
    cand = recent.select("message_id")
    n_changed = int(changed.count().execute())
    if n_changed:
        cand = cand.union(ec.semi_join(changed, "customer_id").select("message_id"))
        cand = cand.union(seen.semi_join(changed, "customer_id").select("message_id"))
    cand = engine.scratch("refresh_candidates", cand.distinct())
    n_cand = int(cand.count().execute())
    if n_cand * 4 > marks.pairs:
        return None, f"{n_cand} candidate messages: the whole snapshot is compared"
    now_m = engine.scratch("refresh_now_m", ec.semi_join(cand, "message_id"))
    seen_m = engine.scratch(
        "refresh_seen_m", seen.select("message_id", "customer_id").semi_join(cand, "message_id")
    )
    # One statement: the whole of event_customers and the candidates' pairs on both sides.
    a, b = _signature(now_m), _signature(seen_m).rename(sn="n", sx="x")
    both = _signature(ec).rename(en="n", ex="x").cross_join(a).cross_join(b)
    row = both.to_pyarrow().to_pylist()[0]
    n_e, x_e = _sig(row, "en", "ex")
    n_em, x_em = _sig(row)
    n_sm, x_sm = _sig(row, "sn", "sx")
    if n_e - n_em != marks.pairs - n_sm or x_e ^ x_em != marks.pairs_xor ^ x_sm:
        return None, (
            "the check failed (a late event with an old stamp, an erasure, or a change "
            "identity did not record): the whole snapshot is compared"
        )
    return _Shortcut(_diff(now_m, seen_m), (n_e, x_e), recent, n_changed, changed), ""


def _recent_events(engine: Engine, since: datetime, received: datetime | None) -> ir.Table:
    """The log's events stamped after ``since`` or received after ``received`` (or never
    stamped received): the new messages' rows, all columns.

    Three disjoint filters of one or two columns each, added up: an engine tests each
    against its per-block minima and maxima and reads only the newest blocks, where an OR
    across columns read every column of every event (a third of a live refresh).
    """
    events = engine.table("events")
    rt = events.received_at.type()
    late = events.timestamp > ibis.literal(since, type=events.timestamp.type())
    parts = [events.filter(events.received_at.isnull())]
    if received is None:
        parts.append(events.filter(late, events.received_at.notnull()))
    else:
        mark = ibis.literal(received, type=rt)
        parts.append(events.filter(events.received_at > mark))
        parts.append(events.filter(late, events.received_at <= mark))
    out = parts[0]
    for part in parts[1:]:
        out = out.union(part, distinct=False)
    return out


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
        engine.replace(name, _seen_columns(kept).union(_seen_columns(snapshot)))
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


def _marks_now(
    engine: Engine, identity: tuple[int, datetime | None] | None, pairs: tuple[int, int] | None
) -> Marks | None:
    """The marks to record: the identity run read before event_customers, and the
    signature of event_customers as read (the snapshot's once the run is written)."""
    if identity is None or pairs is None:
        return None
    return Marks(identity[0], identity[1], pairs[0], pairs[1])


def _shortcuts(engine: Engine) -> bool:
    """Whether the engine has what the shortcuts need: deletes and DuckDB's hash."""
    return engine.backend == "duckdb" and engine.can("temp_tables")


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
    identity = _identity_now(engine) if _shortcuts(engine) else None
    facts = parse_facts(engine)
    n = build_profiles(engine, clock, default_tz, accounts, facts=facts)
    build_traits(engine, traits, clock)
    pairs = None
    if identity is not None:
        pairs = _sig(_signature(facts).to_pyarrow().to_pylist()[0])
    marks = _marks_now(engine, identity, pairs)
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
    duckdb = engine.backend == "duckdb"
    identity = _identity_now(engine) if _shortcuts(engine) else None
    # The attribution diff, once: it finds affected customers and then updates the snapshot.
    # From the candidates when the last run left marks and the check holds; else whole.
    short: _Shortcut | None = None
    if not _shortcuts(engine):
        how = f"{engine.backend}: no shortcut (it needs deletes and DuckDB's hash)"
    elif identity is None:
        how = "identity has recorded no run"
    elif last.marks is None:
        how = "the last run left no marks"
    else:
        short, how = _shortcut_diff(engine, last, last.marks)
    how = "shortcut" if short is not None else how
    if short is not None:
        diff = engine.scratch("refresh_diff", short.diff)
        pairs: tuple[int, int] | None = short.pairs
    else:
        diff = engine.scratch("refresh_diff", attribution_diff(engine))
        pairs = None
        if identity is not None:
            ec = engine.table("event_customers")
            pairs = _sig(_signature(ec).to_pyarrow().to_pylist()[0])
    added, gone = _sides(diff)
    any_gone = int(gone.count().execute()) > 0
    affected_expr = affected_customers(engine, last.as_of, as_of, windows, (added, gone))
    # Customers identity changed (identifiers gained or lost) may keep all their events
    # and still have other contact points: recomputed too, when known.
    id_changed = None
    if short is not None:
        id_changed = short.changed
    elif identity is not None and last.marks is not None:
        id_changed = _identity_changed(engine, last.marks.identity_seq)
    if id_changed is not None:
        affected_expr = affected_expr.union(id_changed.select("customer_id"), distinct=True)
    affected = engine.scratch("refresh_affected", affected_expr)
    recomputed = int(affected.count().execute())
    customers = engine.table("customers").select("customer_id")

    steps.lap("diff")
    # Only the events new to the snapshot are parsed (looked for among the candidates first
    # when the shortcut found them); an event moved by a merge or split keeps its facts
    # from the snapshot under its new customer. The affected customers' other events are
    # read back from the snapshot, facts and all (its pairs still attributed).
    log = engine.table("events")
    seen = engine.table(PORTRAIT_SEEN.name)
    fresh_ids = diff.filter(diff.seen_customer_id.isnull() & diff.customer_id.notnull())
    fresh_ids = fresh_ids.select("message_id", "customer_id")
    parsed = None
    if short is not None:
        parsed = engine.scratch(
            "refresh_parsed",
            event_facts(short.recent.join(fresh_ids, "message_id"), duckdb),
        )
        if int(parsed.count().execute()) != int(fresh_ids.count().execute()):
            parsed = None  # a new message outside the recent events: from the whole log
    if parsed is None:
        parsed = engine.scratch(
            "refresh_parsed", event_facts(log.join(fresh_ids, "message_id"), duckdb)
        )
    moved_ids = diff.filter(diff.seen_customer_id.notnull() & diff.customer_id.notnull())
    moved = seen.drop("customer_id").join(
        moved_ids.select("message_id", "customer_id"), "message_id"
    )
    new = engine.scratch(
        "refresh_new", _seen_columns(parsed).union(_seen_columns(moved), distinct=False)
    )
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

    def network_now() -> ir.Table:
        """Everyone's network, from the relation events of the snapshot and the new ones,
        sender, kind and named member already parsed."""
        rel = list(RELATION_EVENTS)
        rseen = seen.filter(seen.event.isin(rel))
        if any_gone:
            rseen = rseen.anti_join(gone, pair)
        rnew = new.filter(new.event.isin(rel))
        related = rseen.select("customer_id", "event", "member", "timestamp").union(
            rnew.select("customer_id", "event", "member", "timestamp")
        )
        related = related.filter(related.timestamp <= as_of)
        return engine.scratch("refresh_net", network(related, engine.table("identity_map")))

    # The network stands when no relation event came, went, moved or came into view and
    # identity changed nobody (a named member may have become a customer): known only
    # from the shortcut. Otherwise it is recomputed for everyone.
    net: ir.Table | None = None
    if (
        short is None
        or short.identity_changed
        or _relations_moved(seen, new, gone, last.as_of, as_of)
    ):
        net = network_now()
    steps.lap("network")
    old = engine.table(PROFILES.name)
    keep = old.anti_join(affected, "customer_id").semi_join(customers, "customer_id")
    if engine.can("temp_tables"):
        changed = _write_profiles(engine, as_of, last, fresh, keep, net, affected, network_now)
    else:  # no deletes (Spark): the whole table, swapped in one step
        net = network_now() if net is None else net
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
        marks=_marks_now(engine, identity, pairs),
        how=how,
    )


def _relations_moved(
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


# The stored columns ``finish`` reads (beside the customer id).
FINISH_INPUTS = ("birthday", "last_order_at", "first_order_at", "orders", "revenue", "member_id")
# Profile columns that depend on everyone or on the clock (``finish``, the network).
DERIVED = tuple(c for c in (*FINISH_COLUMNS, *RELATIONSHIP_COLUMNS) if c != "computed_at")


def _write_profiles(
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

    The shortcut (``_standing_rows``): on the clock date of the last run, with the network
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
        standing = _standing_rows(engine, as_of, last, fresh, affected)
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
    rows = _base_columns(keep.semi_join(drop, "customer_id")).union(fresh, distinct=False)
    rows = rows.join(now, "customer_id")
    rows = engine.scratch("refresh_rows", engine.conform(PROFILES.name, rows))
    with engine.transaction():
        engine.delete_keys(PROFILES.name, drop)
        engine.con.insert(PROFILES.name, rows)
    return drop


def _standing_rows(
    engine: Engine, as_of: datetime, last: LastRun, fresh: ir.Table, affected: ir.Table
) -> tuple[ir.Table, ir.Table] | None:
    """(rows to insert, customer ids to delete) when no derived value can have moved for
    anyone; None when one may have.

    ``finish`` reads only the clock's date and six stored columns, and ranks buyers among
    all buyers; so its values stand for everyone when the date is the last run's, every
    affected customer has a stored row whose six columns equal the fresh ones, and no
    buyer came or went (the profile count is the one the last run left — an erasure
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
    if int(j.filter(differs).count().execute()):
        return None
    rows = j.select(
        *fresh.columns,
        **{c: j[f"old_{c}"] for c in DERIVED},
        computed_at=ibis.literal(as_of).cast(TS),
    )
    rows = engine.scratch("refresh_rows", engine.conform(PROFILES.name, rows))
    drop = affected.select("customer_id").union(gone.select("customer_id"), distinct=True)
    return rows, engine.scratch("refresh_drop", drop)


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
