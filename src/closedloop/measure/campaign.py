"""Campaign outcomes: who converted within the goal window after the decision, by group.

The estimand is **intent-to-treat** (ITT): everyone *assigned* to the treatment group —
messaged, or stopped after the split by a timing rule of the contact policy (a frequency cap,
quiet hours or a holiday that drops) — against everyone assigned to the holdout group. The
split is random (a hash), so the two groups are exchangeable and the difference is an unbiased
estimate of the effect of running the campaign on this audience, with its policy as it is.

The older comparison, *as sent* (messaged people against held-out people not stopped by a
rule), is reported beside it but is not the headline: frequency caps count messages really
sent, so on a later occasion the treatment group's recent recipients are capped while their
held-out twins, never messaged, are not — ``policy_verdict`` mirrors a rule's verdict onto the
holdout only where the rule would stop them *given what they really received*. The as-sent
groups then differ in who they contain, and their difference is biased (``tests/measure``
simulates it). When nobody is stopped after the split the two estimands coincide.

A third figure repairs "as sent": the caps are replayed on the holdout as if it had been
treated on every occasion (``measure.counterfactual``), and those they would stop are left
out too — the effect on the people the policy lets through, next to intent-to-treat's effect
of running the campaign. As groups persist across occasions, a later occasion's
intent-to-treat lift includes what the campaign's earlier messages still do.

Conversions are goal events of the customer (through ``event_customers``), counted once per
customer, between the decision time and the end of the attribution window. Customers merged
since the campaign are followed through their aliases, so a merge never loses a conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

import ibis
import ibis.expr.types as ir
import pyarrow as pa

from closedloop.core.clock import Clock
from closedloop.core.definitions import CampaignDef, ContactPolicy
from closedloop.core.engine import Engine
from closedloop.identity import tables as _identity_tables  # noqa: F401  (customer_aliases)
from closedloop.measure import tables as _tables  # noqa: F401  (declares campaign_results)
from closedloop.measure.counterfactual import holdout_capped
from closedloop.measure.stats import Lift, lift, sample_ratio_p

ESTIMAND = (
    "intent-to-treat: all assigned to treatment (messaged or stopped by the policy) vs all held out"
)


@dataclass(frozen=True)
class CampaignOutcome:
    """One campaign occasion's outcome; the headline numbers are intent-to-treat."""

    campaign: str
    occasion: str
    treated: int  # assigned to treatment
    held_out: int  # assigned to the holdout
    treated_conversions: int
    held_out_conversions: int
    treated_revenue: float
    held_out_revenue: float
    lift: Lift  # intent-to-treat
    sample_ratio_p: float
    estimand: str = ESTIMAND
    reached: int | None = None  # of the treatment group, messaged (status sent)
    treated_stopped: int = 0  # of the treatment group, stopped by a timing rule
    held_out_stopped: int = 0  # of the holdout, a timing rule would have stopped them
    as_sent: Lift | None = None  # messaged vs not-stopped held out: biased when caps bite
    # Of the holdout not stopped, those the caps would stop had they been treated all along
    # (``measure.counterfactual``); leaving them out too gives the symmetric "as sent".
    held_out_capped: int = 0
    as_sent_symmetric: Lift | None = None  # the effect on the people the policy lets through

    @property
    def reach_share(self) -> float:
        """Share of the treatment group actually messaged."""
        r = self.treated if self.reached is None else self.reached
        return r / self.treated if self.treated else 0.0


def survivor_ids(engine: Engine, t: ir.Table, column: str = "customer_id") -> ir.Table:
    """``t`` with ``column`` replaced by the surviving customer of any later merge."""
    a = engine.table("customer_aliases").select(alias_id="alias_id", survivor="customer_id")
    j = t.left_join(a, t[column] == a.alias_id)
    return j.mutate(**{column: ibis.coalesce(j.survivor, j[column])}).drop("alias_id", "survivor")


def goal_events(engine: Engine, event: str) -> ir.Table:
    """Goal events with their customer: message_id, revenue, goal_customer, goal_at."""
    ev = engine.table("events")
    ec = engine.table("event_customers")
    goals = ev.filter(ev.event == event).join(ec, "message_id")
    return goals.select("message_id", "revenue", goal_customer="customer_id", goal_at="timestamp")


def measure_campaign(
    engine: Engine,
    campaign: CampaignDef,
    occasion: str,
    clock: Clock | None = None,
    *,
    policy: ContactPolicy | None = None,
    timezone: str | None = None,
) -> CampaignOutcome:
    """Measure one occasion: intent-to-treat, as sent, and as sent with the caps replayed.

    ``policy`` and ``timezone`` are the project's (as for ``run_campaign``); they serve the
    replay of the caps on the holdout (``measure.counterfactual``).
    """
    now = (clock or Clock()).now()
    d = engine.table("deliveries")
    d = d.filter(
        (d.campaign == campaign.name)
        & (d.occasion == occasion)
        & d.group.isin(["treatment", "holdout"])
    )
    a = engine.table("customer_aliases")
    a = a.select(alias_id="alias_id", survivor="customer_id")
    goals = goal_events(engine, campaign.goal.event)
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
    j = j.select(
        customer_id=customer,
        group=d.group,
        stopped=ibis.ifelse(d.status == "suppressed", 1, 0),  # PostgreSQL casts no bool to int
        goal=goals.message_id,
        revenue=goals.revenue,
    )
    per_customer = j.group_by("customer_id", "group").aggregate(
        converted=j.goal.count() > 0,
        revenue=j.revenue.sum().fill_null(0.0),
        stopped=j.stopped.max() > 0,
    )
    per_cell = per_customer.group_by("group", "stopped").aggregate(
        customers=per_customer.count(),
        conversions=ibis.ifelse(per_customer.converted, 1, 0).sum(),
        revenue=per_customer.revenue.sum(),
    )
    cells = {(r["group"], bool(r["stopped"])): r for r in per_cell.to_pyarrow().to_pylist()}

    def cell(group: str, stopped: bool) -> tuple[int, int, float]:
        r = cells.get((group, stopped))
        if r is None:
            return (0, 0, 0.0)
        return (int(r["customers"]), int(r["conversions"] or 0), float(r["revenue"] or 0.0))

    t_ok, t_stop = cell("treatment", False), cell("treatment", True)
    c_ok, c_stop = cell("holdout", False), cell("holdout", True)
    t = tuple(x + y for x, y in zip(t_ok, t_stop, strict=True))
    c = tuple(x + y for x, y in zip(c_ok, c_stop, strict=True))
    results = [
        {
            "campaign": campaign.name,
            "occasion": occasion,
            "group": g,
            "customers": int(r[0]),
            "conversions": int(r[1]),
            "revenue": float(r[2]),
            "computed_at": now,
        }
        for g, r in (("treatment", t), ("holdout", c))
    ]
    old = engine.table("campaign_results")
    keep = old.filter(~((old.campaign == campaign.name) & (old.occasion == occasion)))
    with engine.temporary(pa.Table.from_pylist(results)) as new:
        engine.replace("campaign_results", keep.union(new.cast(old.schema()), distinct=False))
    tn, tx, cn, cx = int(t[0]), int(t[1]), int(c[0]), int(c[1])
    as_sent = symmetric = None
    if t_ok[0] > 0 and c_ok[0] > 0:
        as_sent = lift(t_ok[1], t_ok[0], c_ok[1], c_ok[0])
    capped = holdout_capped(engine, campaign, occasion, policy=policy, timezone=timezone)
    cap_n = cap_x = 0
    if capped:
        with engine.temporary(pa.table({"customer_id": sorted(capped)})) as ids:
            mapped = survivor_ids(engine, ids)
            pc = per_customer
            sub = pc.filter(
                (pc.group == "holdout") & ~pc.stopped & pc.customer_id.isin(mapped.customer_id)
            )
            got = sub.aggregate(n=sub.count(), x=ibis.ifelse(sub.converted, 1, 0).sum())
            r = got.to_pyarrow().to_pylist()[0]
            cap_n, cap_x = int(r["n"] or 0), int(r["x"] or 0)
    if t_ok[0] > 0 and c_ok[0] - cap_n > 0:
        symmetric = lift(t_ok[1], t_ok[0], c_ok[1] - cap_x, c_ok[0] - cap_n)
    return CampaignOutcome(
        campaign=campaign.name,
        occasion=occasion,
        treated=tn,
        held_out=cn,
        treated_conversions=tx,
        held_out_conversions=cx,
        treated_revenue=float(t[2]),
        held_out_revenue=float(c[2]),
        lift=lift(tx, tn, cx, cn),
        sample_ratio_p=sample_ratio_p(tn, cn, campaign.holdout),
        reached=t_ok[0],
        treated_stopped=t_stop[0],
        held_out_stopped=c_stop[0],
        as_sent=as_sent,
        held_out_capped=cap_n,
        as_sent_symmetric=symmetric,
    )
