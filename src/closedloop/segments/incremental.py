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
  (since - D, as_of - D]), or past a sequence's ``within`` (an absent step's deadline);
* for segments naming other segments (``in_segment``), the customers who entered or left
  those in this run — segments are evaluated in dependency order, so they are known.

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

import ibis
import ibis.expr.types as ir

from closedloop.core.clock import Clock
from closedloop.core.conditions import EventCondition, SegmentRef, SequenceCondition, leaves
from closedloop.core.definitions import SegmentDef
from closedloop.core.definitions.segments import account_target
from closedloop.core.engine import Engine
from closedloop.core.errors import DefinitionError
from closedloop.segments.audience import (
    TS,
    Fields,
    SegmentResult,
    kind_problems,
    members_expr,
)
from closedloop.tags.incremental import crossed
from closedloop.tags.values import only

MEMBERSHIP = "segment_membership"
STAY = ["segment", "customer_id", "entered_at"]


def scope(
    engine: Engine,
    seg: SegmentDef,
    changed: ir.Table,
    moved: dict[str, ir.Table],
    since: datetime,
    as_of: datetime,
) -> ir.Table | None:
    """The customers whose membership of ``seg`` may differ from the last run; None: anyone."""
    parts = [changed]
    windows: list[timedelta] = []
    events = False
    for leaf in leaves(seg.where):
        if isinstance(leaf, SegmentRef):
            if account_target(leaf) is not None:
                return None  # account memberships: not followed customer by customer
            if leaf.in_segment in moved:
                parts.append(moved[leaf.in_segment])
        elif isinstance(leaf, EventCondition):
            events = True
            if leaf.within_days:
                windows.append(timedelta(days=leaf.within_days))
        elif isinstance(leaf, SequenceCondition):
            events = True
            windows.append(leaf.within)
            if leaf.within_days:
                windows.append(timedelta(days=leaf.within_days))
    if events:
        parts.append(crossed(engine, since, as_of, windows))
    out = parts[0]
    for p in parts[1:]:
        out = out.union(p)
    return out.distinct()


def evaluate_changed(
    engine: Engine,
    segs: Sequence[SegmentDef],
    fields: Fields,
    clock: Clock,
    *,
    changed: ir.Table,
    since: datetime,
) -> dict[str, SegmentResult]:
    """Re-evaluate ``segs`` (in dependency order) for the customers that may have moved.

    ``changed``: customers (``customer_id``) whose profile, traits, events or tags changed
    since the run at ``since`` (gone customers included: their stays close).
    """
    as_of = clock.now()
    now = ibis.literal(as_of).cast(TS)
    if not segs:
        return {}
    problems = kind_problems(segs)
    if problems:
        raise DefinitionError(problems)
    done: dict[str, SegmentResult] = {}
    accounts = [s for s in segs if s.of == "accounts"]
    if accounts:  # whole, first (customer segments may read their stays)
        from closedloop.segments.accounts import evaluate_account_segment

        for s in accounts:
            done[s.name] = SegmentResult(s.name, *evaluate_account_segment(engine, s, clock))
    base = engine.scratch("seg_changed", changed.select("customer_id").distinct())
    m = engine.table(MEMBERSHIP)
    open_all = m.filter(m.exited_at.isnull())
    moved: dict[str, ir.Table] = {}
    current: dict[str, ir.Table] = {}
    leaving_parts: list[ir.Table] = []
    arriving_parts: list[ir.Table] = []
    for i, seg in enumerate(s for s in segs if s.of != "accounts"):
        todo = scope(engine, seg, base, moved, since, as_of)
        if todo is not None:
            todo = engine.scratch(f"seg_todo_{i}", todo)
        now_in = engine.scratch(
            f"seg_in_{i}", members_expr(engine, seg, fields, as_of, current, todo)
        )
        mine = open_all.filter(open_all.segment == seg.name)
        before = only(mine, todo)
        leaving = engine.scratch(
            f"seg_leaving_{i}", before.anti_join(now_in, "customer_id").select(*STAY)
        )
        arriving = engine.scratch(
            f"seg_arriving_{i}",
            now_in.anti_join(before, "customer_id").select(
                segment=ibis.literal(seg.name), customer_id=now_in.customer_id, entered_at=now
            ),
        )
        n_out, n_in = int(leaving.count().execute()), int(arriving.count().execute())
        if todo is None:
            size = int(now_in.count().execute())
            current[seg.name] = now_in
        else:
            size = int(mine.count().execute()) - n_out + n_in
            current[seg.name] = (
                mine.select("customer_id")
                .anti_join(leaving, "customer_id")
                .union(arriving.select("customer_id"), distinct=False)
            )
        moved[seg.name] = leaving.select("customer_id").union(arriving.select("customer_id"))
        done[seg.name] = SegmentResult(seg.name, size, n_in, n_out)
        if n_out:
            leaving_parts.append(leaving)
        if n_in:
            arriving_parts.append(arriving)
    _write(engine, leaving_parts, arriving_parts, now)
    return {s.name: done[s.name] for s in segs}


def _union(parts: list[ir.Table]) -> ir.Table:
    out = parts[0]
    for p in parts[1:]:
        out = out.union(p, distinct=False)
    return out


def _write(
    engine: Engine, leaving: list[ir.Table], arriving: list[ir.Table], now: ir.Value
) -> None:
    """Close the stays of those who left, open stays for those who came in."""
    if not leaving and not arriving:
        return
    rows = [t.mutate(exited_at=now) for t in leaving]
    rows += [t.mutate(exited_at=ibis.null(TS)) for t in arriving]
    new = _union([engine.conform(MEMBERSHIP, t) for t in rows])
    if not engine.can("temp_tables"):  # no DELETE (Spark): the table replaced whole
        m = engine.table(MEMBERSHIP)
        kept = m.anti_join(_union(leaving), STAY) if leaving else m
        whole = engine.conform(MEMBERSHIP, kept).union(new, distinct=False)
        engine.replace(MEMBERSHIP, engine.scratch("seg_new", whole))
        return
    new = engine.scratch("seg_rows", new)
    with engine.transaction():
        if leaving:
            engine.delete_keys(MEMBERSHIP, _union(leaving))
        engine.append(MEMBERSHIP, new)
