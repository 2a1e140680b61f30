"""Lifecycle stages and RFM groups, with their thresholds stated in one place.

Lifecycle (by days since the last order, in whole calendar days):

* ``prospect`` — no order yet;
* ``new`` — first order within the last ``NEW_DAYS`` days;
* ``active`` — last order within ``ACTIVE_DAYS``;
* ``silent`` — last order ``ACTIVE_DAYS``+1 .. ``SILENT_DAYS`` days ago;
* ``churn_risk`` — ``SILENT_DAYS``+1 .. ``CHURN_DAYS``;
* ``churned`` — longer ago than ``CHURN_DAYS``.

The ladder (fan → member → customer → super user): ``super_user`` has at least
``SUPER_USER_ORDERS`` orders; ``customer`` at least one; ``member`` holds a member id; ``fan``
is anyone else we have seen.

RFM: each score is 1–5 from the percent rank among customers with orders (ties share a
score, so every engine gives the same answer), recency ranked so that recent = 5.
"""

from __future__ import annotations

import ibis
import ibis.expr.types as ir

NEW_DAYS = 30
ACTIVE_DAYS = 60
SILENT_DAYS = 120
CHURN_DAYS = 240
SUPER_USER_ORDERS = 5

LIFECYCLE_STAGES = ("prospect", "new", "active", "silent", "churn_risk", "churned")
LADDER_STAGES = ("fan", "member", "customer", "super_user")
RFM_GROUPS = (
    "champions",
    "loyal",
    "potential_loyalist",
    "new_customer",
    "at_risk",
    "hibernating",
    "needs_attention",
)


def lifecycle_stage(
    orders: ir.IntegerValue, recency_days: ir.IntegerValue, days_since_first: ir.IntegerValue
) -> ir.StringValue:
    return ibis.cases(
        (orders.fill_null(0) == 0, "prospect"),
        (days_since_first <= NEW_DAYS, "new"),
        (recency_days <= ACTIVE_DAYS, "active"),
        (recency_days <= SILENT_DAYS, "silent"),
        (recency_days <= CHURN_DAYS, "churn_risk"),
        else_="churned",
    )


def ladder_stage(orders: ir.IntegerValue, member_id: ir.StringValue) -> ir.StringValue:
    return ibis.cases(
        (orders.fill_null(0) >= SUPER_USER_ORDERS, "super_user"),
        (orders.fill_null(0) >= 1, "customer"),
        (member_id.notnull(), "member"),
        else_="fan",
    )


def score(
    value: ir.NumericValue, has_orders: ir.BooleanValue, *, descending: bool = False
) -> ir.IntegerValue:
    """1–5 from the percent rank of ``value`` among customers with orders; null without orders."""
    key = -value if descending else value
    rank = ibis.percent_rank().over(group_by=has_orders, order_by=key)
    s = (rank * 5).floor().cast("int32") + 1
    return ibis.ifelse(has_orders, ibis.least(s, 5), ibis.null("int32"))


def rfm_group(r: ir.IntegerValue, f: ir.IntegerValue) -> ir.StringValue:
    return ibis.cases(
        (r.isnull(), ibis.null("string")),
        ((r >= 4) & (f >= 4), "champions"),
        ((r >= 2) & (f >= 4), "loyal"),
        ((r >= 4) & (f >= 2), "potential_loyalist"),
        (r >= 4, "new_customer"),
        ((r <= 2) & (f >= 3), "at_risk"),
        (r <= 2, "hibernating"),
        else_="needs_attention",
    )
