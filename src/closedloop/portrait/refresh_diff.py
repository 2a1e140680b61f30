"""Which event → customer attributions changed since the last run, and whose portrait.

The shortcut (``shortcut_diff``) looks only at candidate messages and proves with the
count + XOR signature (``core.signature``) that nothing else changed; otherwise the whole
snapshot is compared (``attribution_diff``). See ``portrait.refresh`` for the design.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import ibis
import ibis.expr.types as ir

from closedloop.core.engine import Engine
from closedloop.core.signature import signature
from closedloop.core.signature import values as signature_values
from closedloop.portrait.refresh_state import LastRun, Marks, changed_customers
from closedloop.portrait.tables import PORTRAIT_SEEN, PROFILES

TS = "timestamp('UTC', 6)"


def attribution_changes(engine: Engine) -> tuple[ir.Table, ir.Table]:
    """(added, gone): event → customer pairs in ``event_customers`` and not in the snapshot,
    and the reverse. New events are ``added``; an event moved by a merge or split is both."""
    return sides(attribution_diff(engine))


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


def pair_signature(t: ir.Table) -> ir.Table:
    """(n, x): the count of ``t``'s (message_id, customer_id) pairs and the XOR of their
    hashes (``core.signature``; message ids are keys: no pair twice)."""
    return signature(t, "message_id", "customer_id")


def pair_values(row: dict[str, object], n: str = "n", x: str = "x") -> tuple[int, int]:
    return signature_values(row, n, x)


@dataclass(frozen=True)
class Shortcut:
    """The attribution diff found without the whole snapshot (``shortcut_diff``)."""

    diff: ir.Table
    pairs: tuple[int, int]  # the signature of event_customers: the snapshot's after the run
    recent: ir.Table  # the events the new messages were looked for in
    identity_changed: int  # customers identity changed since the last run
    changed: ir.Table  # those customers (``customer_id``)


def shortcut_diff(engine: Engine, last: LastRun, marks: Marks) -> tuple[Shortcut | None, str]:
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
    changed = changed_customers(engine, marks.identity_seq)
    if changed is None:
        return None, "identity records no changes"
    ec = engine.table("event_customers").select("message_id", "customer_id")
    seen = engine.table(PORTRAIT_SEEN.name)
    recent = recent_events(engine, last.as_of, marks.received)
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
    a, b = pair_signature(now_m), pair_signature(seen_m).rename(sn="n", sx="x")
    both = pair_signature(ec).rename(en="n", ex="x").cross_join(a).cross_join(b)
    row = both.to_pyarrow().to_pylist()[0]
    n_e, x_e = pair_values(row, "en", "ex")
    n_em, x_em = pair_values(row)
    n_sm, x_sm = pair_values(row, "sn", "sx")
    if n_e - n_em != marks.pairs - n_sm or x_e ^ x_em != marks.pairs_xor ^ x_sm:
        return None, (
            "the check failed (a late event with an old stamp, an erasure, or a change "
            "identity did not record): the whole snapshot is compared"
        )
    return Shortcut(_diff(now_m, seen_m), (n_e, x_e), recent, n_changed, changed), ""


def recent_events(engine: Engine, since: datetime, received: datetime | None) -> ir.Table:
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


def sides(diff: ir.Table) -> tuple[ir.Table, ir.Table]:
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


@dataclass(frozen=True)
class Diff:
    """The attribution diff of a refresh and what was learnt finding it."""

    diff: ir.Table  # ``attribution_diff``'s columns, materialised
    added: ir.Table  # (message_id, customer_id) pairs now attributed and not in the snapshot
    gone: ir.Table  # pairs in the snapshot no longer attributed
    any_gone: bool
    how: str  # 'shortcut', or why the whole snapshot was compared
    short: Shortcut | None  # set when the shortcut held
    pairs: tuple[int, int] | None  # the signature of event_customers (None: not taken)


def find_diff(
    engine: Engine, last: LastRun, identity: tuple[int, datetime | None] | None, possible: bool
) -> Diff:
    """The attribution diff, once: it finds the affected customers, then updates the snapshot.

    From the candidates when the last run left marks and the check holds (``shortcut_diff``);
    else by comparing the whole snapshot, signing event_customers for the next run's marks.
    """
    short: Shortcut | None = None
    if not possible:
        how = f"{engine.backend}: no shortcut (it needs deletes and DuckDB's hash)"
    elif identity is None:
        how = "identity has recorded no run"
    elif last.marks is None:
        how = "the last run left no marks"
    else:
        short, how = shortcut_diff(engine, last, last.marks)
    pairs: tuple[int, int] | None = None
    if short is not None:
        how = "shortcut"
        diff = engine.scratch("refresh_diff", short.diff)
        pairs = short.pairs
    else:
        diff = engine.scratch("refresh_diff", attribution_diff(engine))
        if identity is not None:
            ec = engine.table("event_customers")
            pairs = pair_values(pair_signature(ec).to_pyarrow().to_pylist()[0])
    added, gone = sides(diff)
    any_gone = int(gone.count().execute()) > 0
    return Diff(diff, added, gone, any_gone, how, short, pairs)


def affected_by(
    engine: Engine,
    d: Diff,
    last: LastRun,
    as_of: datetime,
    windows: set[int],
    identity: tuple[int, datetime | None] | None,
) -> ir.Table:
    """The customers to recompute (``affected_customers`` of the diff), materialised, with
    those identity recorded as changed: identifiers gained or lost may leave every event in
    place and still change the contact points."""
    expr = affected_customers(engine, last.as_of, as_of, windows, (d.added, d.gone))
    id_changed = None
    if d.short is not None:
        id_changed = d.short.changed
    elif identity is not None and last.marks is not None:
        id_changed = changed_customers(engine, last.marks.identity_seq)
    if id_changed is not None:
        expr = expr.union(id_changed.select("customer_id"), distinct=True)
    return engine.scratch("refresh_affected", expr)
