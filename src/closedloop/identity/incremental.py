"""Incremental resolution: which path a run takes, and which part of the graph it touches.

Why: a resolution over the whole event log parses every event's JSON, normalises every raw
value and rebuilds every component, while new events usually touch a few thousand customers.
An incremental run reads only the events not resolved yet (those missing from
``identity_messages``), and recomputes only the *region* they touch: every identifier of
every cluster (``identity_clusters``: connected component of usable links, before the merge
rules) holding an identifier seen in the new events, plus the new identifiers. The evidence
of that region is read back from ``identity_occurrences`` (normalised identifiers per
resolved message), not from the event log.

Why the region is closed — the incremental result equals a full run's, row for row:

* new links join only identifiers seen in new events, all inside the region;
* whether an identifier is quarantined depends only on its own links and messages (distinct
  strong neighbours, names it was typed under), which change only for identifiers seen in
  new events; and these verdicts only ever flip one way as evidence grows (a count only
  rises; a link blocked "up to" a time is freed only by a newer message holding both ends),
  so a cluster outside the region never gains or loses a link;
* the merge rules (limits, windows, never-link) are decided within one cluster, from its own
  links, priorities and first-seen times; ids stay stable by the same rule, applied to the
  region's old customers, which lie wholly inside it.

The run checks the one consequence it relies on — no usable link leaves the region — and
falls back to a full run if it does not hold. A run is **full** exactly when:

1. the caller asks for it (``resolve(..., incremental=False)``) or passes a split ``reason``;
2. no earlier run is recorded in ``identity_runs`` (first run, or tables from before
   incremental resolution);
3. ``identity.yaml`` changed since the last run (types, rules, limits, blocked values,
   matching: its digest differs);
4. ``identity_blocks`` changed since the last run (a split or block re-partitions customers
   anywhere);
5. messages resolved before are no longer in the event log (erased);
6. the closure check above fails.

Probabilistic matching is not local: the Fellegi–Sunter model is fitted without labels over
*all* record pairs, so one new CRM row can move the weights and re-score pairs anywhere. An
incremental run therefore refits it over every record — kept per message in
``identity_records``, so no old JSON is parsed again — and every identifier of a scored pair
that appeared, vanished or changed (score, evidence) since the last run is touched too. The
scored pairs are few, so the region stays small.

**Finding the new events without reading the whole log.** Every message a run reads is
listed in ``identity_messages`` (with or without identifiers), and each run records a
*watermark* in ``identity_runs``: the latest ``received_at`` it read. The next run takes as
candidates only the events received after the watermark (or with no ``received_at``), minus
those already listed — a scan the warehouse's min/max statistics trim to the newest part of
the log. ``received_at`` is stamped when the collector accepts a message, not when the
loader commits it, so an event can land late with an older stamp (a spool written behind a
newer one, concurrent loaders, a long file import), or a message can be erased, or logged
twice. The watermark is therefore only trusted after a check that the log holds exactly the
listed messages plus the candidates: their counts and an XOR of 64-bit hashes of their ids
(two scans of one column each, no join) must agree. If the log holds more, the candidates
are taken again from ``WATERMARK_LAG`` before the watermark, and checked again. (Not from
there at once: a history loaded in bulk minutes before — after every import, in every
freshly built warehouse — lies wholly within the lag, and every refresh of the next quarter
of an hour would then pay an anti-join as large as the log.) If neither agrees, the run says
so and finds its new events by the anti-join of the whole log against
``identity_messages``, which then decides as before between an incremental run, an erasure
and a repeated id (full). Engines without a hash aggregate (Spark) always take the
anti-join.

The path taken and why are recorded in ``identity_runs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import ibis
import ibis.common.exceptions as ibis_errors
import ibis.expr.types as ir

from closedloop.core.definitions import IdentityConfig
from closedloop.core.engine import Engine
from closedloop.core.ids import stable_hash64
from closedloop.core.signature import key_hash, signature

SEP = "\x1f"
FULL = "full"
INCREMENTAL = "incremental"
# How far before the watermark candidates are still read: events stamped this much before
# the latest one read but committed after it are found without the whole-log anti-join.
WATERMARK_LAG = timedelta(minutes=15)


@dataclass(frozen=True)
class Plan:
    """What a run will read: every event (full) or the events not resolved yet."""

    path: str
    why: str
    events: ir.Table  # the events this run reads identifiers from: all, or the new ones
    new_messages: int  # how many new events an incremental run reads (0 when full)
    watermark: datetime | None = None  # the latest ``received_at`` read so far (None: unknown)


def config_digest(config: IdentityConfig) -> str:
    """A digest of everything in ``identity.yaml`` that can change a resolution."""
    return format(stable_hash64("identity.yaml", config.model_dump_json()), "016x")


def blocks_digest(engine: Engine) -> str:
    """A digest of ``identity_blocks`` (a handful of rows a person wrote)."""
    rows = engine.table("identity_blocks").to_pyarrow().to_pylist()
    keys = sorted(repr(sorted(r.items())) for r in rows)
    return format(stable_hash64("identity_blocks", *keys), "016x")


def last_run(engine: Engine) -> dict[str, object] | None:
    """The latest row of ``identity_runs``, or None before the first recorded run."""
    runs = engine.table("identity_runs")
    rows = runs.order_by(ibis.desc(runs.seq)).limit(1).to_pyarrow().to_pylist()
    return rows[0] if rows else None


def full_plan(engine: Engine, why: str) -> Plan:
    events = engine.table("events")
    # Read before the events: a later event stamped earlier only makes the next check fail.
    mark = events.received_at.max().execute()
    return Plan(FULL, why, events, 0, _instant(mark))


def _instant(value: object) -> datetime | None:
    """A timestamp read back from the warehouse as a ``datetime`` (None when missing)."""
    if value is None or value != value:  # NaN, and pandas' NaT (a datetime): none read
        return None
    if isinstance(value, datetime):
        return value
    stamp = getattr(value, "to_pydatetime", None)  # pandas.Timestamp
    if stamp is None:
        return None
    out = stamp()
    return out if isinstance(out, datetime) and out == out else None


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


def _id_hash(engine: Engine, column: ir.StringValue) -> ir.IntegerValue:
    """A 64-bit hash of each message id (``core.signature.key_hash``)."""
    return key_hash(engine.backend, column)


def _signature(engine: Engine, t: ir.Table) -> ir.Table:
    """(count, XOR of the 64-bit hashes of message ids) of ``t`` (``core.signature``)."""
    return signature(t, "message_id", backend=engine.backend)


def _by_watermark(engine: Engine, mark: datetime) -> tuple[Plan | None, str]:
    """The plan from the events received after ``mark``, or since ``mark`` less the lag,
    whichever first passes the check.

    Returns (plan, "") when one does, (None, why not) when the whole log must be read.

    Why two steps: the events read before were loaded in bulk minutes ago as often as not
    (after every import, and always in a freshly built warehouse), and then they all lie
    within the lag: taking them as candidates costs an anti-join as large as the whole log,
    for every refresh of the next quarter of an hour. The events stamped *after* the
    watermark are almost always exactly the new ones; the check says when they are not (an
    event committed late with an older stamp), and only then is the lag read.
    """
    events = engine.table("events")
    seen = engine.table("identity_messages")
    try:
        log_sig = _signature(engine, events)
        engine.con.compile(log_sig)
    except (ibis_errors.OperationNotDefinedError, ibis_errors.UnsupportedOperationError):
        return None, f"{engine.backend} has no hash aggregate for the watermark check"
    stamp = events.received_at
    after = ibis.literal(mark, type=stamp.type())
    since = ibis.literal(mark - WATERMARK_LAG, type=stamp.type())
    steps = (
        (stamp > after, "since the watermark"),
        (stamp >= since, "since the watermark less the lag (some stamped at or before it)"),
    )
    both: dict[str, int | None] | None = None
    for step, (after_mark, which) in enumerate(steps):
        # The candidates first: an event appended after them makes the log's side larger,
        # and the run reads the whole log instead (never wrong, only slower).
        if step == 0:
            # Stamped after the latest stamp read: none should be listed, so the list is
            # not joined with them; a listed one (a message id logged again) is counted by
            # the check's own scan of the list instead, and fails it. (The count and XOR
            # alone would not see it: the copy is on both sides.) Unstamped events may be
            # listed: they are taken off as below.
            fresh = events.filter(after_mark)
            unstamped = events.filter(stamp.isnull())
            if int(unstamped.count().execute()):
                fresh = fresh.union(_unlisted(engine, unstamped), distinct=False)
            new = engine.scratch("id_new_events", fresh)
        else:
            recent = events.filter(stamp.isnull() | after_mark)
            new = engine.scratch("id_new_events", _unlisted(engine, recent))
        cand = new.aggregate(
            n=new.count(), x=_id_hash(engine, new.message_id).bit_xor(), top=new.received_at.max()
        )
        got = cand.to_pyarrow().to_pylist()[0]
        if both is None:
            # One statement for both sides: the log and the list are read at one moment.
            listed = seen.aggregate(
                m=seen.count(),
                y=_id_hash(engine, seen.message_id).bit_xor(),
                again=seen.message_id.isin(new.message_id).sum(),
            )
            both = log_sig.cross_join(listed).to_pyarrow().to_pylist()[0]
            again = int(both["again"] or 0)
        else:
            again = 0  # these candidates were taken off the list by a join
        n_new = int(got["n"])
        # XOR of nothing is null: 0 is its neutral value.
        xor = int(both["y"] or 0) ^ int(got["x"] or 0)
        n_log, n_listed = int(both["n"] or 0), int(both["m"] or 0)
        if not again and n_log == n_listed + n_new and int(both["x"] or 0) == xor:
            why = f"{n_new} new message(s) {which}"
            return Plan(INCREMENTAL, why, new, n_new, _later(mark, _instant(got["top"]))), ""
    return None, (
        "the watermark check failed (an event logged late with an older stamp, an "
        "erasure or a repeated id): new events by the whole log"
    )


def _unlisted(engine: Engine, recent: ir.Table) -> ir.Table:
    """The events of ``recent`` not listed in ``identity_messages``."""
    seen = engine.table("identity_messages")
    listed: ir.Table = seen
    if int(recent.count().execute()) * 4 <= int(seen.count().execute()):
        # The listed candidates found by a semi-join of the list on the candidates, not an
        # anti-join of the candidates on the list: an engine hashes the right side of a join
        # (DuckDB always for anti and semi joins), and the candidates are the few. (When they
        # are many — a bulk load stamped at one instant — hashing the list is the cheaper
        # way.)
        listed = seen.semi_join(recent.select("message_id"), "message_id")
    return recent.anti_join(listed, "message_id")


def plan(engine: Engine, config: IdentityConfig, *, reason: str, allow: bool) -> Plan:
    """Choose the path of this run (see the module docstring for exactly when it is full)."""
    if not allow:
        return full_plan(engine, "a full run was asked for")
    if reason:
        return full_plan(engine, "split: the blocks re-partition customers")
    last = last_run(engine)
    if last is None:
        return full_plan(engine, "no earlier run recorded")
    if last["config_digest"] != config_digest(config):
        return full_plan(engine, "identity.yaml changed since the last run")
    if last["blocks_digest"] != blocks_digest(engine):
        return full_plan(engine, "identity_blocks changed since the last run")
    mark = _instant(last.get("watermark"))
    why_not = "no watermark recorded"
    if mark is not None:
        fast, why_not = _by_watermark(engine, mark)
        if fast is not None:
            return fast
    seen = engine.table("identity_messages")
    events = engine.table("events")
    # The new events themselves, copied once: every later step reads only these rows, and
    # events appended meanwhile wait for the next run.
    new = engine.scratch("id_new_events", events.anti_join(seen, "message_id"))
    n_new = int(new.count().execute())
    # Erased messages, counted without a second join: a message id is unique in both tables,
    # so the resolved messages still in the log number |events| - |new|; any fewer than
    # were resolved means some were erased. (Events appended between the two statements
    # make the counts disagree too: that run is full, which is never wrong. An erasure in
    # between is seen by the next run, as with any check made before the run reads.)
    n_seen = int(seen.count().execute())
    n_events = int(events.count().execute())
    kept = n_events - n_new
    if kept < n_seen:
        return full_plan(engine, f"{n_seen - kept} resolved message(s) were erased since")
    if kept > n_seen:
        # A message id logged twice (collect never does; a hand-made log can): a copy of a
        # resolved message would never count as new, so only a full run reads it.
        return full_plan(engine, "the event log holds a message id more than once")
    top = _instant(new.received_at.max().execute()) if n_new else None
    return Plan(INCREMENTAL, f"{n_new} new message(s) ({why_not})", new, n_new, _later(mark, top))


def split_node(node: ir.StringValue) -> tuple[ir.StringValue, ir.StringValue]:
    """(id_type, id_value) of a node ``type SEP value`` (a type name holds no SEP)."""
    id_type = node.split(SEP)[0]
    return id_type, node.substr(id_type.length() + 1)


def on_region(
    t: ir.Table, region_t: ir.Table, id_type: str, id_value: str
) -> list[ir.BooleanValue]:
    """Join predicates matching ``t``'s identifier columns with the region's.

    Why two columns, not the node text: the region is joined with whole tables (every
    occurrence, the identity map), and building ``type SEP value`` for each of their rows
    costs more than the join.
    """
    return [t[id_type] == region_t.id_type, t[id_value] == region_t.id_value]


def region(engine: Engine, touched: ir.Table) -> ir.Table:
    """(node, id_type, id_value) of every identifier in a cluster holding one of ``touched``
    (node), and those."""
    ty, va = split_node(touched.node)
    touched = engine.scratch("id_touched", touched.select("node", id_type=ty, id_value=va))
    cl = engine.table("identity_clusters")
    hit = cl.semi_join(touched, on_region(cl, touched, "id_type", "id_value"))
    members = cl.semi_join(hit.select("cluster").distinct(), "cluster")
    members = members.select(
        node=members.id_type + ibis.literal(SEP) + members.id_value,
        id_type="id_type",
        id_value="id_value",
    )
    return engine.scratch("id_region", members.union(touched).distinct())


def region_occurrences(engine: Engine, region_nodes: ir.Table, new_occ: ir.Table) -> ir.Table:
    """Node occurrences of every message holding a region identifier (old and new).

    Every message of a region identifier is included whole, so the evidence of each pair and
    each identifier touching the region is complete.
    """
    occ = engine.table("identity_occurrences")
    hit = occ.semi_join(region_nodes, on_region(occ, region_nodes, "id_type", "id_value"))
    old = occ.semi_join(hit.select("message_id").distinct(), "message_id")
    old = old.select(
        "message_id",
        "id_type",
        value=old.id_value,
        ts=old.ts,
        node=old.id_type + ibis.literal(SEP) + old.id_value,
    )
    schema = old.schema()
    new = new_occ.select(*[new_occ[c].cast(schema[c]).name(c) for c in old.columns])
    return engine.scratch("id_region_occ", old.union(new, distinct=False))


__all__ = [
    "FULL",
    "INCREMENTAL",
    "Plan",
    "blocks_digest",
    "config_digest",
    "full_plan",
    "last_run",
    "on_region",
    "plan",
    "region",
    "region_occurrences",
    "split_node",
]
