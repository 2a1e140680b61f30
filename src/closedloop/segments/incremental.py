"""Segments for the customers whose inputs changed: the segment step of a live refresh.

``evaluate_segments`` evaluates every condition for every customer and diffs the result
against the open stays. After a load of a few events nearly all of that is wasted: a
customer's membership can change only if something the condition reads changed for them.
:func:`evaluate_changed` evaluates each segment only for

* the customers given as changed — whose profile row, traits, attributed events or tags
  changed since the run at ``since`` (``serving.changes`` and ``tags.incremental`` find them);
* for segments with event or sequence leaves, the customers with an event the clock moved
  across one of the segment's edges since then (``tags.incremental.crossed``): into view
  (timestamp in (since, as_of]), out of a look-back window of D days (in
  (since - D, as_of - D]), or past a sequence's ``within`` (an absent step's deadline) —
  found once for the edges of all segments, one scan of the events, not one per segment;
* for segments naming other segments (``in_segment``), the customers who entered or left
  those in this run — segments are evaluated in dependency order, so they are known.
  An account segment whose contacts must be in a segment of customers is evaluated after
  that segment's moves are written (``segments.accounts.segment_batches``).

Everyone else's condition reads exactly what it read before, so their stays are left as
they are. The condition's value for the customers evaluated is that of a full evaluation,
so memberships equal ``evaluate_segments`` at the same clock
(``tests/segments/test_incremental.py``). A segment that reads account memberships
(``account_in_segment``) and account segments are evaluated whole.

Writes: the stays of those who left are closed and new stays opened in one transaction
(delete the open rows, insert them closed, insert the new ones) where the engine has them;
elsewhere ``segment_membership`` is replaced whole. A crash leaves old or new.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import ibis
import ibis.expr.types as ir

from closedloop.core.clock import Clock
from closedloop.core.conditions import EventCondition, SegmentRef, SequenceCondition, leaves
from closedloop.core.definitions import SegmentDef
from closedloop.core.definitions.segments import account_target
from closedloop.core.engine import Engine
from closedloop.core.errors import DefinitionError
from closedloop.segments.accounts import (
    evaluate_account_segment,
    evaluate_in_batches,
    segment_batches,
)
from closedloop.segments.audience import (
    TS,
    Fields,
    SegmentResult,
    kind_problems,
    members_expr,
)
from closedloop.tags.incremental import Narrowing, crossed, narrowed
from closedloop.tags.values import only

MEMBERSHIP = "segment_membership"
# More customers in scope than this share of all: every segment is evaluated for everyone
# (``evaluate_in_batches``, the same stays). Twenty segments cost about as much for a few
# customers as for all 100,000 (compiling and planning each query is most of it), and for
# 10% of them twice as much as for all (bench/refresh.py).
WIDE = 0.02
STAY = ["segment", "customer_id", "entered_at"]


def event_windows(seg: SegmentDef) -> list[timedelta] | None:
    """The windows the clock moves ``seg``'s event and sequence leaves across; None: it has
    none (the clock alone never moves its members)."""
    windows: list[timedelta] = []
    events = False
    for leaf in leaves(seg.where):
        if isinstance(leaf, EventCondition):
            events = True
            if leaf.within_days:
                windows.append(timedelta(days=leaf.within_days))
        elif isinstance(leaf, SequenceCondition):
            events = True
            windows.append(leaf.within)
            if leaf.within_days:
                windows.append(timedelta(days=leaf.within_days))
    return windows if events else None


def scope(
    seg: SegmentDef,
    changed: ir.Table,
    moved: dict[str, ir.Table],
    clock_moved: ir.Table | None,
) -> ir.Table | None:
    """The customers whose membership of ``seg`` may differ from the last run; None: anyone.

    ``clock_moved``: customers with an event the clock moved across an edge of any
    segment's windows (``crossed``, found once for all segments: one scan of the events
    instead of one per segment). For a segment with narrower windows that is more customers
    than needed, never fewer, and each is evaluated exactly.
    """
    parts = [changed]
    for leaf in leaves(seg.where):
        if isinstance(leaf, SegmentRef):
            if account_target(leaf) is not None:
                return None  # account memberships: not followed customer by customer
            if leaf.in_segment in moved:
                parts.append(moved[leaf.in_segment])
    if clock_moved is not None and event_windows(seg) is not None:
        parts.append(clock_moved)
    out = parts[0]
    for p in parts[1:]:
        out = out.union(p)
    return out.distinct()


def segment_windows(segs: Sequence[SegmentDef]) -> list[timedelta] | None:
    """The windows the clock moves the event and sequence leaves of ``segs`` (of customers)
    across; None: none has such leaves."""
    found = [event_windows(s) for s in segs if s.of != "accounts"]
    if all(ws is None for ws in found):
        return None
    return [w for ws in found if ws is not None for w in ws]


def clock_moved(
    engine: Engine, segs: Sequence[SegmentDef], since: datetime, as_of: datetime
) -> ir.Table | None:
    """Customers with an event the clock moved across an edge of any of ``segs``' event or
    sequence leaves from ``since`` to ``as_of`` (``crossed``), materialised; None: no
    segment has such leaves."""
    windows = segment_windows(segs)
    if windows is None:
        return None
    return engine.scratch("seg_crossed", crossed(engine, since, as_of, windows))


def evaluate_changed(
    engine: Engine,
    segs: Sequence[SegmentDef],
    fields: Fields,
    clock: Clock,
    *,
    changed: ir.Table,
    since: datetime,
    moved_by_clock: ir.Table | bool | None = False,
    reuse: Narrowing | None = None,
    population: int | None = None,
) -> dict[str, SegmentResult]:
    """Re-evaluate ``segs`` (in dependency order) for the customers that may have moved.

    ``changed``: customers (``customer_id``) whose profile, traits, events or tags changed
    since the run at ``since`` (gone customers included: their stays close).
    ``moved_by_clock``: ``clock_moved`` of these segments at this clock, if the caller found
    it already (a table, or None: no segment has event leaves); False: found here. ``reuse``: per-customer tables the tag step narrowed
    (``TagRefresh.narrowing``), read instead of the whole ones when they hold everyone
    evaluated here. ``population``: the number of profiles, if the caller knows it.

    Few queries, since at small sizes each costs more than the rows it reads: per segment
    one materialised table of its moves (stays closing and opening); the open stays
    counted once before, the moves once after, one write.
    """
    if not segs:
        return {}
    problems = kind_problems(segs)
    if problems:
        raise DefinitionError(problems)
    done: dict[str, SegmentResult] = {}
    moved: dict[str, ir.Table] = {}  # per segment of customers: who entered or left it
    base = changed.select("customer_id")
    if isinstance(moved_by_clock, bool):
        by_clock = clock_moved(engine, segs, since, clock.now())
    else:
        by_clock = moved_by_clock
    # Every segment evaluated for a scope is evaluated for a part of these customers (its
    # moves too, so a segment naming it stays inside): read through a view of their rows.
    inside = base if by_clock is None else base.union(by_clock)
    inside = engine.scratch("seg_inside", inside.distinct())
    if population is None:
        population = engine.count("profiles")
    if int(inside.count().to_pyarrow().as_py()) > WIDE * max(population, 1):
        return evaluate_in_batches(engine, segs, fields, clock)  # everyone: cheaper here
    view = narrowed(engine, inside, "seg", reuse=reuse)
    narrow: set[str] = set()  # segments evaluated through the view: their moves are inside
    for b, batch in enumerate(segment_batches(segs)):
        done |= _evaluate_batch(
            engine, (view, inside, narrow), batch, fields, clock, base, moved, by_clock, b
        )
    return {s.name: done[s.name] for s in segs}


def _evaluate_batch(
    engine: Engine,
    narrowing: tuple[Engine, ir.Table, set[str]],
    segs: Sequence[SegmentDef],
    fields: Fields,
    clock: Clock,
    base: ir.Table,
    moved: dict[str, ir.Table],
    clock_moved: ir.Table | None,
    batch: int,
) -> dict[str, SegmentResult]:
    """One run of ``segment_batches``: its account segments whole, then its segments of
    customers for those in scope, their moves written at once (before the next run reads
    them). ``moved`` gains this run's moves for the runs after it.

    ``narrowing``: ``engine`` narrowed to the customers any scope can hold (``narrowed``),
    those customers, and the segments read through it so far (gains this run's). A segment
    is read through it when its scope stays inside — not when it names a segment evaluated
    for everyone, whose moves may be anyone's. Segments with the same scope share one
    materialised table of it: each scope is a union read several times by its query."""
    view, inside, narrow = narrowing
    as_of = clock.now()
    now = ibis.literal(as_of).cast(TS)
    done: dict[str, SegmentResult] = {}
    accounts = [s for s in segs if s.of == "accounts"]
    for s in accounts:  # whole, first (customer segments may read their stays)
        done[s.name] = SegmentResult(s.name, *evaluate_account_segment(engine, s, clock))
    people = [s for s in segs if s.of != "accounts"]
    if not people:
        return done
    m = engine.table(MEMBERSHIP)
    open_all = m.filter(m.exited_at.isnull() & m.segment.isin([s.name for s in people]))
    sizes = _counts(open_all.group_by("segment").aggregate(n=open_all.count()))
    open_inside = engine.scratch(f"seg_open_{batch}", open_all.semi_join(inside, "customer_id"))
    scopes: dict[tuple[object, ...], ir.Table | None] = {}
    current: dict[str, ir.Table] = {}
    tables: list[ir.Table] = []
    for i, seg in enumerate(people):
        refs = {x.in_segment for x in leaves(seg.where) if isinstance(x, SegmentRef)}
        key = (
            tuple(sorted(refs & set(moved))),
            any(
                account_target(x) is not None
                for x in leaves(seg.where)
                if isinstance(x, SegmentRef)
            ),
            clock_moved is not None and event_windows(seg) is not None,
        )
        if key not in scopes:
            found = scope(seg, base, moved, clock_moved)
            scopes[key] = None if found is None else engine.scratch(f"seg_scope_{batch}_{i}", found)
        todo = scopes[key]
        through = view if todo is not None and refs & set(moved) <= narrow else engine
        if through is view:
            narrow.add(seg.name)
        now_in = members_expr(through, seg, fields, as_of, current, todo)
        mine = open_all.filter(open_all.segment == seg.name)
        stays = open_inside if through is view else open_all
        before = only(stays.filter(stays.segment == seg.name), todo)
        leaving = before.anti_join(now_in, "customer_id").select(
            *STAY, exited_at=now, kind=ibis.literal("out")
        )
        arriving = now_in.anti_join(before, "customer_id").select(
            segment=ibis.literal(seg.name),
            customer_id=now_in.customer_id,
            entered_at=now,
            exited_at=ibis.null(TS),
            kind=ibis.literal("in"),
        )
        moves = engine.scratch(f"seg_moves_{batch}_{i}", leaving.union(arriving, distinct=False))
        tables.append(moves)
        out = moves.filter(moves.kind == "out").select("customer_id")
        current[seg.name] = (
            mine.select("customer_id")
            .anti_join(out, "customer_id")
            .union(moves.filter(moves.kind == "in").select("customer_id"), distinct=False)
        )
        moved[seg.name] = moves.select("customer_id")
    all_moves = _union(tables)
    counts = _counts(
        all_moves.group_by(["segment", "kind"]).aggregate(n=all_moves.count()), ("segment", "kind")
    )
    for seg in people:
        n_in, n_out = counts.get((seg.name, "in"), 0), counts.get((seg.name, "out"), 0)
        done[seg.name] = SegmentResult(seg.name, sizes.get(seg.name, 0) - n_out + n_in, n_in, n_out)
    if any(done[s.name].entered or done[s.name].exited for s in people):
        _write(engine, all_moves)
    return done


def _counts(t: ir.Table, keys: tuple[str, ...] = ("segment",)) -> dict[Any, int]:
    rows = t.to_pyarrow().to_pylist()
    if len(keys) == 1:
        return {r[keys[0]]: int(r["n"]) for r in rows}
    return {tuple(r[k] for k in keys): int(r["n"]) for r in rows}


def _union(parts: list[ir.Table]) -> ir.Table:
    out = parts[0]
    for p in parts[1:]:
        out = out.union(p, distinct=False)
    return out


def _write(engine: Engine, moves: ir.Table) -> None:
    """Close the stays of those who left, open stays for those who came in.

    ``moves``: rows as they will be (closed stays with their exit time, new stays open),
    ``kind`` saying which.
    """
    rows = engine.conform(MEMBERSHIP, moves)
    if not engine.can("temp_tables"):  # no DELETE (Spark): the table replaced whole
        m = engine.table(MEMBERSHIP)
        kept = m.anti_join(moves.filter(moves.kind == "out"), STAY)
        whole = engine.conform(MEMBERSHIP, kept).union(rows, distinct=False)
        engine.replace(MEMBERSHIP, engine.scratch("seg_new", whole))
        return
    with engine.transaction():
        engine.delete_keys(MEMBERSHIP, moves.filter(moves.kind == "out").select(*STAY))
        engine.append(MEMBERSHIP, rows)
