"""The contact policy, enforced at send time: consent, opt-outs, caps, quiet hours, holidays.

Two kinds of rule, applied at two moments of a campaign run (``activate.campaign``):

* **Fixed eligibility** — no address, an opt-out of the channel, no marketing consent — is a
  property of the person, not of this moment. It is decided *before* the holdout split, so
  the treatment and holdout groups are drawn from the same reachable, consenting population
  and the measured lift compares like with like.
* **Timing rules** — frequency caps, quiet hours, do-not-disturb periods — depend on when
  the message would go out and on what else the person received. They are applied *after*
  the split, to the treatment group only (a held-out person is never messaged anyway); for
  held-out people the verdict they would have had is recorded, so measurement can compare
  like with like again.

All calendar arithmetic happens in the person's time zone (the profile's ``timezone``, else
the policy's default, which is the project's): "one message a day" means one per local
calendar day, and quiet hours are the person's night, not the server's. Everything stored is
UTC.

The work is vectorised: a time rule's outcome depends only on (time zone, now), so it is
computed once per distinct zone, and caps are counted with NumPy over the delivery log —
a 1,000,000-person audience costs seconds, not minutes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import numpy.typing as npt
import pandas as pd

# Arbitration between campaigns lives in ``activate.arbitration``; its names stay importable
# from here for the callers that know them as the policy's.
from closedloop.activate.arbitration import LOST as LOST
from closedloop.activate.arbitration import arbitrate as arbitrate
from closedloop.activate.arbitration import expected_values as expected_values
from closedloop.activate.arbitration import pick_winner as pick_winner
from closedloop.core.definitions import (
    Channel,
    ContactPolicy,
    PolicyAction,
    QuietHours,
)
from closedloop.core.engine import Engine

I64 = npt.NDArray[np.int64]
BOOL = npt.NDArray[np.bool_]

EPOCH = date(1970, 1, 1)


class Reason(StrEnum):
    """Why a person was not messaged (the ``reason`` of a suppressed delivery)."""

    NO_ADDRESS = "no_address"
    OPTED_OUT = "opted_out"
    NO_CONSENT = "no_consent"
    DO_NOT_DISTURB = "do_not_disturb"
    QUIET_HOURS = "quiet_hours"
    FREQUENCY_CAP = "frequency_cap"


OPT_OUT_FIELD: dict[Channel, str | None] = {
    Channel.EMAIL: "email_opt_out",
    Channel.SMS: "sms_opt_out",
    Channel.OUTBOX: None,
}


def fixed_reason(
    policy: ContactPolicy,
    *,
    address: object,
    consent: bool | None,
    opted_out: bool | None,
) -> Reason | None:
    """The fixed-eligibility verdict for one person, or None when the person may be messaged.

    An explicit refusal is reported first (an opt-out wins over everything, then missing
    consent — null means never stated, which is not consent), then a missing address.
    """
    if opted_out:
        return Reason.OPTED_OUT
    if policy.require_consent and consent is not True:
        return Reason.NO_CONSENT
    if not address:
        return Reason.NO_ADDRESS
    return None


@lru_cache(maxsize=4096)
def zone(name: str | None, default: str) -> ZoneInfo:
    """The ZoneInfo for a profile's time zone; unknown or missing names fall back to ``default``."""
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return ZoneInfo(default)


def in_quiet_hours(q: QuietHours, local: time) -> bool:
    """Whether a local wall-clock time falls in ``[start, end)`` (wrapping midnight if needed)."""
    t = local.replace(tzinfo=None)
    if q.start < q.end:
        return q.start <= t < q.end
    return t >= q.start or t < q.end


def _at_local(day: date, t: time, tz: ZoneInfo) -> datetime:
    """The UTC instant of local wall time ``t`` on ``day``.

    In a DST gap the wall time does not exist; zoneinfo (fold=0) then reads it with the offset
    before the change, which lands just after the gap — still at or after the intended time.
    """
    return datetime.combine(day, t, tzinfo=tz).astimezone(UTC)


@dataclass(frozen=True)
class Slot:
    """When a message to a person in one time zone may go out, or why it may not."""

    send_at: datetime | None  # UTC; None when a rule drops the message
    reason: Reason | None  # the dropping rule (send_at None), or the postponing one
    local_day: int  # the local calendar day of send_at (days since 1970-01-01)


def send_slot(policy: ContactPolicy, tz: ZoneInfo, now: datetime) -> Slot:
    """Apply do-not-disturb periods and quiet hours to a message that would go out at ``now``.

    A postponing rule moves the message to the end of its period; the moved time is checked
    again (the morning after a holiday may still be quiet, a quiet night may end in a holiday)
    until no rule applies. ``reason`` names the first rule that moved or dropped it.
    """
    at = now.astimezone(UTC)
    first: Reason | None = None
    # Each step moves strictly forward past one period; periods are finite, so this ends.
    for _ in range(4 + 2 * len(policy.do_not_disturb)):
        local = at.astimezone(tz)
        moved = False
        for dnd in policy.do_not_disturb:
            if dnd.start <= local.date() <= dnd.end:
                if dnd.action == PolicyAction.DROP:
                    return Slot(None, Reason.DO_NOT_DISTURB, _day(local.date()))
                first = first or Reason.DO_NOT_DISTURB
                at = _at_local(dnd.end + timedelta(days=1), time(0), tz)
                moved = True
                break
        if moved:
            continue
        q = policy.quiet_hours
        if q is not None and in_quiet_hours(q, local.time()):
            if q.action == PolicyAction.DROP:
                return Slot(None, Reason.QUIET_HOURS, _day(local.date()))
            first = first or Reason.QUIET_HOURS
            end_day = local.date()
            if q.start > q.end and local.time().replace(tzinfo=None) >= q.start:
                end_day += timedelta(days=1)  # evening part of a night: it ends tomorrow
            candidate = _at_local(end_day, q.end, tz)
            at = candidate if candidate > at else at + timedelta(minutes=1)
            continue
        return Slot(at, first, _day(local.date()))
    raise RuntimeError("contact policy: could not find a send time (overlapping periods?)")


def _day(d: date) -> int:
    return (d - EPOCH).days


def local_days(ts: pd.Series, tz_names: pd.Series, default: str) -> I64:
    """The local calendar day (days since 1970-01-01) of each UTC timestamp in its own zone."""
    out = np.zeros(len(ts), dtype=np.int64)
    if len(ts) == 0:
        return out
    utc = pd.to_datetime(ts, utc=True)
    codes, names = pd.factorize(tz_names.fillna(""), sort=False)
    for i, name in enumerate(names):
        where = codes == i
        tz = zone(str(name) or None, default)
        local = pd.DatetimeIndex(utc[where]).tz_convert(tz).tz_localize(None)
        out[where] = local.values.astype("datetime64[D]").astype(np.int64)
    return out


def cap_blocked(
    policy: ContactPolicy,
    channel: Channel,
    *,
    day: I64,
    history_person: I64,
    history_day: I64,
    history_channel: Sequence[str],
) -> BOOL:
    """Which people a new message on ``day`` (their local day) would push over a cap.

    ``history_*`` are the messages already sent or scheduled (any campaign), by person index,
    local day and channel. A cap of ``max`` per ``days`` must hold in *every* window of
    ``days`` consecutive local days, including windows reaching into the future (a message
    postponed to tomorrow already counts for tomorrow), so a new message on day D is allowed
    only if each of the ``days`` windows containing D has fewer than ``max`` messages.
    """
    n = len(day)
    blocked = np.zeros(n, dtype=bool)
    if not policy.caps or len(history_person) == 0:
        return blocked
    chan = np.asarray(history_channel, dtype=object)
    offset = history_day - day[history_person]
    for cap in policy.caps:
        if cap.channel is not None and cap.channel is not channel:
            continue
        keep = np.abs(offset) < cap.days
        if cap.channel is not None:
            keep &= chan == cap.channel.value
        p, off = history_person[keep], offset[keep]
        worst = np.zeros(n, dtype=np.int64)
        for k in range(cap.days):
            # Window [D - days + 1 + k, D + k], as offsets from D.
            inside = (off >= k - cap.days + 1) & (off <= k)
            worst = np.maximum(worst, np.bincount(p[inside], minlength=n))
        blocked |= worst >= cap.max
    return blocked


PERSONALISATION = "personalisation"
"""The consent purpose (``context.consent.categoryPreferences``) for personalised content."""


REFUSING = ("false", "no", "0", "n", "off", "opted_out", "refused")
"""Text values of a declared ``personalisation`` trait that mean a refusal."""


def personalisation_refused(engine: Engine, customers: Sequence[str] | None = None) -> set[str]:
    """The customers who refused personalisation, by either of two statements:

    * the consent purpose: their latest stated ``personalisation`` in
      ``context.consent.categoryPreferences`` is false (never stated is not a refusal —
      content drawn from one's own purchases is the norm until refused — and a later true
      withdraws it). Only events whose context can hold the purpose are parsed (a substring
      guard that never skips one that does);
    * a declared trait named ``personalisation`` (e.g. a ``kind: profile`` trait merging a CRM
      field) whose value is false, 0 or a refusing word (``REFUSING``).

    Either is enough: the most restrictive statement wins.
    """
    refused = _refused_by_consent(engine, customers)
    if engine.exists("computed_traits"):
        t = engine.table("computed_traits")
        t = t.filter(t.trait == PERSONALISATION)
        if customers is not None:
            t = t.filter(t.customer_id.isin(list(customers)))
        says_no = t.text_value.strip().lower().isin(list(REFUSING)) | (t.number_value == 0)
        rows = t.filter(says_no).customer_id.to_pyarrow().to_pylist()
        refused |= {str(c) for c in rows}
    return refused


def _refused_by_consent(engine: Engine, customers: Sequence[str] | None) -> set[str]:
    ev = engine.table("events")
    ev = ev.filter(ev.context.contains(f'"{PERSONALISATION}"') | ev.context.contains("\\u"))
    ec = engine.table("event_customers")
    if customers is not None:
        ec = ec.filter(ec.customer_id.isin(list(customers)))
    j = ev.join(ec, "message_id")
    said = j.context.cast("json")["consent"]["categoryPreferences"][PERSONALISATION]
    facts = j.select("customer_id", "timestamp", said=said.unwrap_as("boolean"))
    facts = facts.filter(facts.said.notnull())
    latest = facts.group_by("customer_id").aggregate(said=facts.said.argmax(facts.timestamp))
    refused = latest.filter(~latest.said).customer_id
    return {str(c) for c in refused.to_pyarrow().to_pylist()}
