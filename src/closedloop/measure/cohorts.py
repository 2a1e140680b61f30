"""Cohorts: customers grouped by the month of their first order (or sign-up), followed monthly.

A customer's cohort is the calendar month of their first ever ``cohort_event`` (by default
``Order Completed``; ``Signed Up`` gives sign-up cohorts). For each cohort and each month
since (0 = the cohort month itself) we count the customers with an ``activity_event`` in that
month (retention) and the revenue of those events. Cohorts may be split by the source or
channel of the event that started them ("customers won on WeChat keep buying longer").

Months are calendar months of the brand's reporting time zone (``closedloop.yaml``'s
``timezone``; the CLI passes it): an order at 20:00 UTC on 31 January is a February order in
Shanghai. The warehouse stores instants in UTC, and Ibis has no portable time-zone
conversion, so each timestamp gets its zone's UTC offset from the few intervals over which
that offset is constant (``portrait.localtime``; daylight saving exact) as one CASE
expression. Written once as Ibis expressions, so DuckDB and PostgreSQL give the same table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import ibis
import ibis.expr.types as ir

from closedloop.core.engine import Engine
from closedloop.portrait.localtime import offset_intervals, zone

SPLITS = ("source", "channel")


def _local(ts: ir.TimestampValue, tz: str, start: datetime, end: datetime) -> ir.TimestampValue:
    """``ts`` as wall-clock time in ``tz`` (exact for instants in [start - 1 month, end])."""
    intervals = offset_intervals(tz, start - timedelta(days=62), end)
    if len(intervals) == 1:
        return ts + ibis.interval(seconds=intervals[0][2])
    branches = [
        ((ts >= lo) & (ts < hi), ts + ibis.interval(seconds=off)) for lo, hi, off in intervals
    ]
    return ibis.cases(*branches, else_=ts)


def _month_index(ts: ir.TimestampValue) -> ir.IntegerValue:
    return ts.year().cast("int64") * 12 + ts.month().cast("int64") - 1


def cohort_expr(
    engine: Engine,
    start: datetime,
    end: datetime,
    *,
    cohort_event: str = "Order Completed",
    activity_event: str = "Order Completed",
    by: str | None = None,
    tz: str = "UTC",
) -> ir.Table:
    """(cohort_month, split, size, months_since, active, revenue) for cohorts begun in the period.

    ``cohort_month`` is months since year 0 (year * 12 + month - 1) in the zone ``tz``;
    ``split`` is the source or channel of the first event (or "all"); rows exist only for
    months with activity.
    """
    if by is not None and by not in SPLITS:
        raise ValueError(f"cohorts can be split by {' or '.join(SPLITS)}, not {by!r}")
    if zone(tz) is None:
        raise ValueError(f"unknown time zone {tz!r} (use an IANA name such as Asia/Shanghai)")
    ev = engine.table("events")
    ec = engine.table("event_customers")
    firsts = ev.filter(ev.event == cohort_event).join(ec, "message_id")
    firsts = firsts.select(
        "customer_id", ts="timestamp", split=firsts[by] if by else ibis.literal("all")
    )
    first_at = firsts.group_by("customer_id").aggregate(first_at=firsts.ts.min())
    # The split of the first event; ties on the same instant resolve to the smallest value.
    j = first_at.join(
        firsts, [first_at.customer_id == firsts.customer_id, first_at.first_at == firsts.ts]
    )
    members = j.group_by(first_at.customer_id, first_at.first_at).aggregate(
        split=j.split.fill_null("unknown").min()
    )
    members = members.filter((members.first_at >= start) & (members.first_at < end))
    members = members.mutate(cohort_month=_month_index(_local(members.first_at, tz, start, end)))
    sizes = members.group_by("cohort_month", "split").aggregate(size=members.count())

    act = ev.filter((ev.event == activity_event) & (ev.timestamp < end)).join(ec, "message_id")
    act = act.select(
        "customer_id", "revenue", month=_month_index(_local(act.timestamp, tz, start, end))
    )
    a = members.join(act, "customer_id")
    a = a.filter(a.month >= a.cohort_month)
    a = a.mutate(months_since=a.month - a.cohort_month)
    cells = a.group_by("cohort_month", "split", "months_since").aggregate(
        active=a.customer_id.nunique(), revenue=a.revenue.sum().fill_null(0.0)
    )
    out = cells.join(sizes, ["cohort_month", "split"])
    return out.select("cohort_month", "split", "size", "months_since", "active", "revenue")


@dataclass(frozen=True)
class Cohort:
    """One cohort: its size and, per month since, the customers active and their revenue."""

    month: date
    split: str
    size: int
    active: list[int] = field(default_factory=list)
    revenue: list[float] = field(default_factory=list)

    def retention(self, m: int) -> float:
        return self.active[m] / self.size if self.size else 0.0

    def revenue_per_customer(self, m: int) -> float:
        """Cumulative revenue per cohort customer up to and including month ``m``."""
        return sum(self.revenue[: m + 1]) / self.size if self.size else 0.0


def cohorts(
    engine: Engine,
    start: datetime,
    end: datetime,
    *,
    cohort_event: str = "Order Completed",
    activity_event: str = "Order Completed",
    by: str | None = None,
    tz: str = "UTC",
) -> list[Cohort]:
    """Every cohort begun in the period, with months since up to the end of the period.

    Months are calendar months in the zone ``tz`` (the brand's reporting zone).
    """
    expr = cohort_expr(
        engine, start, end, cohort_event=cohort_event, activity_event=activity_event, by=by, tz=tz
    )
    rows = expr.to_pyarrow().to_pylist()
    # The period's last month (end is exclusive), in the reporting zone.
    last_instant = end - timedelta(microseconds=1)
    if last_instant.tzinfo is None:  # naive datetimes are UTC, as in the warehouse
        last_instant = last_instant.replace(tzinfo=UTC)
    final = last_instant.astimezone(zone(tz))
    last = final.year * 12 + final.month - 1
    found: dict[tuple[int, str], Cohort] = {}
    for r in sorted(rows, key=lambda r: (r["cohort_month"], str(r["split"]))):
        key = (int(r["cohort_month"]), str(r["split"]))
        if key not in found:
            span = max(1, last - key[0] + 1)
            m = key[0]
            found[key] = Cohort(
                date(m // 12, m % 12 + 1, 1), key[1], int(r["size"]), [0] * span, [0.0] * span
            )
        c = found[key]
        k = int(r["months_since"])
        if k < len(c.active):
            c.active[k] = int(r["active"])
            c.revenue[k] = float(r["revenue"] or 0.0)
    return list(found.values())
