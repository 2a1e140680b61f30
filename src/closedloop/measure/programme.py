"""Programme lift: every campaign together against the persistent global control group.

A per-campaign holdout says what one campaign adds; it cannot see what the programme as a
whole adds (campaigns competing for the same conversions, fatigue from many messages). The
global control group — a stable random share of *all* customers that no campaign ever
messages — can: compare everyone else (messaged or not: intent-to-treat again) with it over a
period, on a goal event, for conversion rate (Newcombe interval) and revenue per customer
(Welch interval).

The control flags come in as a column of a population table (customer_id, control), so the
same function serves the project's assignment (``activate.assignment.in_global_control``) or
any other. Messages sent to control customers in the period are counted: anything but zero
means the control was not honoured and the comparison is contaminated.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import ibis
import ibis.expr.types as ir

from closedloop.activate import tables as _activate_tables  # noqa: F401  (deliveries)
from closedloop.core.engine import Engine
from closedloop.measure.campaign import goal_events, survivor_ids
from closedloop.measure.stats import Lift, MeanDifference, lift, mean_difference, sample_ratio_p

ESTIMAND = (
    "intent-to-treat: everyone outside the global control (messaged or not) vs the global control"
)


@dataclass(frozen=True)
class ProgrammeOutcome:
    goal: str
    start: datetime
    end: datetime
    exposed: int  # outside the control
    control: int
    exposed_conversions: int
    control_conversions: int
    exposed_revenue: float
    control_revenue: float
    exposed_messaged: int  # customers outside the control with at least one message sent
    control_messaged: int  # should be 0: the control is never messaged
    lift: Lift
    revenue: MeanDifference  # revenue per customer
    sample_ratio_p: float | None
    estimand: str = ESTIMAND

    @property
    def incremental_revenue(self) -> float:
        """Revenue per customer difference scaled to the exposed population."""
        return self.revenue.difference * self.exposed


def programme_expr(
    engine: Engine, population: ir.Table, goal: str, start: datetime, end: datetime
) -> ir.Table:
    """(control, customers, conversions, revenue, revenue_sq, messaged) for the two groups."""
    pop = population.select("customer_id", control=population.control.cast("boolean"))
    goals = goal_events(engine, goal)
    goals = goals.filter((goals.goal_at >= start) & (goals.goal_at < end))
    per_goal = goals.group_by("goal_customer").aggregate(
        goals=goals.count(), revenue=goals.revenue.sum().fill_null(0.0)
    )
    d = engine.table("deliveries")
    when = ibis.coalesce(d.send_at, d.decided_at) if "send_at" in d.columns else d.decided_at
    sent = d.filter((d.status == "sent") & (when >= start) & (when < end)).select("customer_id")
    sent = survivor_ids(engine, sent).distinct().select(sent_customer="customer_id")
    j = pop.left_join(per_goal, pop.customer_id == per_goal.goal_customer).left_join(
        sent, pop.customer_id == sent.sent_customer
    )
    j = j.select(
        "control",
        converted=ibis.ifelse(j.goals.fill_null(0) > 0, 1, 0),  # PostgreSQL: no bool → int
        revenue=j.revenue.fill_null(0.0),
        messaged=ibis.ifelse(j.sent_customer.notnull(), 1, 0),
    )
    return j.group_by("control").aggregate(
        customers=j.count(),
        conversions=j.converted.sum(),
        revenue=j.revenue.sum(),
        revenue_sq=(j.revenue * j.revenue).sum(),
        messaged=j.messaged.sum(),
    )


def programme_lift(
    engine: Engine,
    population: ir.Table,
    goal: str,
    start: datetime,
    end: datetime,
    *,
    control_share: float | None = None,
) -> ProgrammeOutcome:
    """Conversion and revenue lift of the programme over the global control, in the period.

    ``population`` has ``customer_id`` and a boolean ``control``; ``control_share`` (the
    designed share) enables the sample-ratio check.
    """
    rows = {
        bool(r["control"]): r
        for r in programme_expr(engine, population, goal, start, end).to_pyarrow().to_pylist()
    }
    if True not in rows or False not in rows:
        raise ValueError("the population needs people both in and outside the global control")
    e, c = rows[False], rows[True]

    def n(r: dict[str, Any], k: str) -> int:
        return int(r[k] or 0)

    def f(r: dict[str, Any], k: str) -> float:
        return float(r[k] or 0.0)

    return ProgrammeOutcome(
        goal=goal,
        start=start,
        end=end,
        exposed=n(e, "customers"),
        control=n(c, "customers"),
        exposed_conversions=n(e, "conversions"),
        control_conversions=n(c, "conversions"),
        exposed_revenue=f(e, "revenue"),
        control_revenue=f(c, "revenue"),
        exposed_messaged=n(e, "messaged"),
        control_messaged=n(c, "messaged"),
        lift=lift(n(e, "conversions"), n(e, "customers"), n(c, "conversions"), n(c, "customers")),
        revenue=mean_difference(
            n(e, "customers"),
            f(e, "revenue"),
            f(e, "revenue_sq"),
            n(c, "customers"),
            f(c, "revenue"),
            f(c, "revenue_sq"),
        ),
        sample_ratio_p=(
            None
            if control_share is None
            else sample_ratio_p(n(e, "customers"), n(c, "customers"), control_share)
        ),
    )
