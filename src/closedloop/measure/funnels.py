"""Funnels: how many customers go through ordered steps of events within a window.

A customer *enters* a funnel with their first step-1 event in the period (``start`` to
``end``, and not before their own ``start_at`` when the groups give one, e.g. a campaign
decision). Step k is reached with the first step-k event at or after the time step k-1 was
reached and before entry + ``within`` (a step repeating the previous event must come strictly
later, so one event never counts twice). Each later step is a subset of the one before, so
counts never increase along a funnel.

Written once as Ibis expressions — one query for the whole funnel, every group at once — so
it runs wherever the warehouse does (DuckDB, PostgreSQL; tests compare the two). Groups are
any table of (customer_id, group[, start_at]): the treatment and holdout of a campaign
occasion (``campaign_groups``), current segment members (``segment_groups``), or your own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import ibis
import ibis.expr.types as ir

from closedloop.activate import tables as _activate_tables  # noqa: F401  (deliveries)
from closedloop.core.engine import Engine
from closedloop.measure.campaign import survivor_ids
from closedloop.measure.stats import wilson
from closedloop.segments import tables as _segment_tables  # noqa: F401  (segment_membership)

ALL = "all"


@dataclass(frozen=True)
class FunnelGroup:
    """One group's funnel: customers reaching each step (and the group's size, when known)."""

    group: str
    reached: list[int]
    size: int | None = None

    def step_rate(self, k: int) -> float:
        """Share of those at step k-1 who reached step k (step 0: of the group, if sized)."""
        prev = (self.size or 0) if k == 0 else self.reached[k - 1]
        return self.reached[k] / prev if prev else 0.0

    def overall(self, k: int) -> float:
        """Share of those who entered (step 0) who reached step k."""
        return self.reached[k] / self.reached[0] if self.reached[0] else 0.0

    def of_group(self, k: int) -> tuple[float, float, float]:
        """Share of the whole group reaching step k, with its 95% Wilson interval."""
        n = self.size if self.size is not None else self.reached[0]
        rate = self.reached[k] / n if n else 0.0
        return (rate, *wilson(self.reached[k], n))


@dataclass(frozen=True)
class Funnel:
    steps: list[str]
    within_days: int
    groups: list[FunnelGroup] = field(default_factory=list)

    def group(self, name: str) -> FunnelGroup:
        for g in self.groups:
            if g.group == name:
                return g
        raise KeyError(name)


def customer_events(
    engine: Engine, events: Sequence[str], start: datetime, end: datetime
) -> ir.Table:
    """(customer_id, event, ts) of the named events between ``start`` and ``end``."""
    ev = engine.table("events")
    ec = engine.table("event_customers")
    ev = ev.filter(ev.event.isin(list(events)) & (ev.timestamp >= start) & (ev.timestamp < end))
    j = ev.join(ec, "message_id")
    return j.select("customer_id", "event", ts="timestamp")


def funnel_expr(
    engine: Engine,
    steps: Sequence[str],
    within_days: int,
    start: datetime,
    end: datetime,
    groups: ir.Table | None = None,
) -> ir.Table:
    """The funnel as one Ibis expression: (group, step, customers), step counted from 0."""
    if not steps:
        raise ValueError("a funnel needs at least one step")
    if within_days <= 0:
        raise ValueError("the funnel window must be at least one day")
    ev = customer_events(engine, steps, start, end)
    if groups is None:
        ev = ev.mutate(group=ibis.literal(ALL))
    else:
        g = groups.select(
            "customer_id", "group", *(["start_at"] if "start_at" in groups.columns else [])
        )
        ev = ev.join(g, "customer_id")
        if "start_at" in g.columns:
            ev = ev.filter(ev.ts >= ev.start_at).drop("start_at")
    window = ibis.interval(days=within_days)
    first = ev.filter(ev.event == steps[0])
    reached = first.group_by("group", "customer_id").aggregate(t0=first.ts.min())
    reached = reached.mutate(at=reached.t0)
    counts = [_count(reached, 0)]
    for k in range(1, len(steps)):
        e = ev.filter(ev.event == steps[k]).select(c2="customer_id", g2="group", ts2="ts")
        after = e.ts2 > reached.at if steps[k] == steps[k - 1] else e.ts2 >= reached.at
        j = reached.join(
            e,
            [
                reached.customer_id == e.c2,
                reached.group == e.g2,
                after,
                e.ts2 < reached.t0 + window,
            ],
        )
        reached = j.group_by("group", "customer_id", "t0").aggregate(at=j.ts2.min())
        counts.append(_count(reached, k))
    return ibis.union(*counts, distinct=False) if len(counts) > 1 else counts[0]


def _count(reached: ir.Table, k: int) -> ir.Table:
    return (
        reached.group_by("group")
        .aggregate(customers=reached.count())
        .mutate(step=ibis.literal(k, type="int64"))
    )


def funnel(
    engine: Engine,
    steps: Sequence[str],
    within_days: int,
    start: datetime,
    end: datetime,
    groups: ir.Table | None = None,
) -> Funnel:
    """Run the funnel; groups with nobody at step 0 still appear when ``groups`` sizes them."""
    rows = funnel_expr(engine, steps, within_days, start, end, groups).to_pyarrow().to_pylist()
    sizes: dict[str, int] = {}
    if groups is not None:
        s = groups.group_by("group").aggregate(n=groups.customer_id.nunique())
        sizes = {str(r["group"]): int(r["n"]) for r in s.to_pyarrow().to_pylist()}
    names = sorted(set(sizes) | {str(r["group"]) for r in rows})
    reached = {n: [0] * len(steps) for n in names}
    for r in rows:
        reached[str(r["group"])][int(r["step"])] = int(r["customers"])
    return Funnel(
        list(steps),
        within_days,
        [FunnelGroup(n, reached[n], sizes.get(n)) for n in names],
    )


def campaign_groups(engine: Engine, campaign: str, occasion: str) -> ir.Table:
    """Treatment and holdout of one campaign occasion (intent-to-treat), from their decision."""
    d = engine.table("deliveries")
    d = d.filter(
        (d.campaign == campaign) & (d.occasion == occasion) & d.group.isin(["treatment", "holdout"])
    )
    d = survivor_ids(engine, d.select("customer_id", "group", start_at="decided_at"))
    return d.group_by("customer_id", "group").aggregate(start_at=d.start_at.min())


def segment_groups(engine: Engine, segments: Sequence[str]) -> ir.Table:
    """Current members of each segment, the segment as the group (a person may be in several)."""
    m = engine.table("segment_membership")
    m = m.filter(m.segment.isin(list(segments)) & m.exited_at.isnull())
    return m.select("customer_id", group="segment").distinct()
