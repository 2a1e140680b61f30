"""Campaign outcomes: who converted within the goal window after the decision, by group.

Conversions are goal events of the customer (through ``event_customers``), counted once per
customer, between the decision time and the end of the attribution window. Customers merged
since the campaign are followed through their aliases, so a merge never loses a conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

import ibis
import pyarrow as pa

from closedloop.core.clock import Clock
from closedloop.core.definitions import CampaignDef
from closedloop.core.engine import Engine
from closedloop.measure import tables as _tables  # noqa: F401  (declares campaign_results)
from closedloop.measure.stats import Lift, lift, sample_ratio_p


@dataclass(frozen=True)
class CampaignOutcome:
    campaign: str
    occasion: str
    treated: int
    held_out: int
    treated_conversions: int
    held_out_conversions: int
    treated_revenue: float
    held_out_revenue: float
    lift: Lift
    sample_ratio_p: float


def measure_campaign(
    engine: Engine, campaign: CampaignDef, occasion: str, clock: Clock | None = None
) -> CampaignOutcome:
    now = (clock or Clock()).now()
    d = engine.table("deliveries")
    d = d.filter(
        (d.campaign == campaign.name)
        & (d.occasion == occasion)
        & d.status.isin(["sent", "held_out"])
    )
    a = engine.table("customer_aliases")
    a = a.select(alias_id="alias_id", survivor="customer_id")
    ev = engine.table("events")
    ec = engine.table("event_customers")
    goals = ev.filter(ev.event == campaign.goal.event).join(ec, "message_id")
    goals = goals.select("message_id", "revenue", goal_customer="customer_id", goal_at="timestamp")
    window = ibis.interval(days=campaign.goal.window_days)
    # One join chain: Ibis cannot join onto a projection of a join with computed columns.
    customer = ibis.coalesce(a.survivor, d.customer_id)
    j = d.left_join(a, d.customer_id == a.alias_id).left_join(
        goals,
        [
            customer == goals.goal_customer,
            goals.goal_at >= d.decided_at,
            goals.goal_at < d.decided_at + window,
        ],
    )
    j = j.select(customer_id=customer, group=d.group, goal=goals.message_id, revenue=goals.revenue)
    per_customer = j.group_by("customer_id", "group").aggregate(
        converted=j.goal.count() > 0, revenue=j.revenue.sum().fill_null(0.0)
    )
    per_group = per_customer.group_by("group").aggregate(
        customers=per_customer.count(),
        conversions=per_customer.converted.sum().cast("int64"),
        revenue=per_customer.revenue.sum(),
    )
    rows = {r["group"]: r for r in per_group.to_pyarrow().to_pylist()}
    empty = {"customers": 0, "conversions": 0, "revenue": 0.0}
    t, c = rows.get("treatment", empty), rows.get("holdout", empty)
    results = [
        {
            "campaign": campaign.name,
            "occasion": occasion,
            "group": g,
            "customers": r["customers"],
            "conversions": r["conversions"],
            "revenue": float(r["revenue"] or 0.0),
            "computed_at": now,
        }
        for g, r in (("treatment", t), ("holdout", c))
    ]
    old = engine.table("campaign_results")
    keep = old.filter(~((old.campaign == campaign.name) & (old.occasion == occasion)))
    with engine.temporary(pa.Table.from_pylist(results)) as new:
        engine.replace("campaign_results", keep.union(new.cast(old.schema()), distinct=False))
    return CampaignOutcome(
        campaign=campaign.name,
        occasion=occasion,
        treated=int(t["customers"]),
        held_out=int(c["customers"]),
        treated_conversions=int(t["conversions"]),
        held_out_conversions=int(c["conversions"]),
        treated_revenue=float(t["revenue"] or 0.0),
        held_out_revenue=float(c["revenue"] or 0.0),
        lift=lift(
            int(t["conversions"]), int(t["customers"]), int(c["conversions"]), int(c["customers"])
        ),
        sample_ratio_p=sample_ratio_p(int(t["customers"]), int(c["customers"]), campaign.holdout),
    )
