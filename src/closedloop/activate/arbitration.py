"""Arbitration: a person who qualifies for several campaigns the same day is given to one.

Campaigns with ``arbitration: priority|value`` compete for each person; the others record
``lost_arbitration:WINNER`` (before the holdout split, like consent). What "qualifies the
same day" means depends on the rival:

* an **audience-only** (one-shot) campaign qualifies for the members of its audience now;
* a **triggered** campaign (event, segment entry, date trait, calendar moment, schedule)
  qualifies only for the members whose trigger fires that day — a person who merely sits in
  its audience will not enter it today, so giving the person to it would leave them with no
  message at all. The trigger fires when the journey entered them that day (its first
  ``journey_state`` row), or when its trigger's own rule says so for that day: an event or a
  segment entry since the day began, or a date, calendar phase or schedule that falls on
  the day (these are known ahead, so a birthday campaign at 10:00 already competes at 8:00).
  Reading the trigger as well as the entries means a journey that the worker reaches later
  in the same tick still counts.

"That day" is the local calendar day of the decision in the rival's time zone (its policy's
``default_timezone``, else the project's). Per-person zones are used by date, calendar and
schedule triggers when they compute their own fire times.

Then ``pick_winner`` decides among the contenders: the highest expected value (a model's
score × ``value_per_conversion``) when asked and every contender has one, else the highest
priority, then the name. ``contest`` returns the reason in words too, for dry runs and
previews.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta

from closedloop.core.definitions import CampaignDef
from closedloop.core.engine import Engine

LOST = "lost_arbitration:"
"""Reason prefix of a person given to another campaign (``lost_arbitration:WINNER``)."""

_MANY = 20_000  # past this many people, read whole tables rather than filter by a list


@dataclass(frozen=True)
class Loss:
    """A person this campaign loses: to whom, and why, in words."""

    winner: str
    why: str


def expected_values(
    engine: Engine, campaigns: Sequence[CampaignDef], people: Sequence[str]
) -> dict[tuple[str, str], float]:
    """(campaign, person) → score of the campaign's ``value_model`` × ``value_per_conversion``.

    Only pairs with a score are present: a missing score is unknown value, not zero.
    """
    models = {c.value_model for c in campaigns if c.value_model is not None}
    if not models or not people or not engine.exists("model_scores"):
        return {}
    s = engine.table("model_scores")
    s = s.filter(s.model.isin(sorted(models)) & s.score.notnull())
    if len(people) <= _MANY:
        s = s.filter(s.customer_id.isin(list(people)))
    score: dict[tuple[str, str], float] = {
        (r["model"], r["customer_id"]): float(r["score"])
        for r in s.select("model", "customer_id", "score").to_pyarrow().to_pylist()
    }
    out: dict[tuple[str, str], float] = {}
    for c in campaigns:
        if c.value_model is None or c.value_per_conversion is None:
            continue
        for p in people:
            got = score.get((c.value_model, p))
            if got is not None:
                out[(c.name, p)] = got * c.value_per_conversion
    return out


def pick_winner(
    rivals: Sequence[CampaignDef], values: dict[str, float] | None, by_value: bool
) -> CampaignDef:
    """The campaign one person is given to among ``rivals`` (all of which they qualify for).

    By value when asked and every rival has an expected value for the person (highest wins,
    ties by priority, then name); otherwise by priority, then name.
    """
    vals = values or {}
    if by_value and all(c.name in vals for c in rivals):
        return min(rivals, key=lambda c: (-vals[c.name], -c.priority, c.name))
    return min(rivals, key=lambda c: (-c.priority, c.name))


def explain(
    loser: CampaignDef,
    winner: CampaignDef,
    contenders: Sequence[CampaignDef],
    values: dict[str, float],
    by_value: bool,
    fired: dict[str, str],
) -> str:
    """Why ``winner`` beat ``loser`` for one person, in the words of ``pick_winner``'s rule."""
    because = f" ({fired[winner.name]})" if winner.name in fired else ""
    lead = f"{winner.name}{because}"
    if by_value and all(c.name in values for c in contenders):
        w, v = values[winner.name], values[loser.name]
        if w != v:
            return f"{lead}: expected value {w:.2f} over {v:.2f}"
        head = f"{lead}: equal expected value {w:.2f}, then"
    elif by_value:
        missing = sorted(c.name for c in contenders if c.name not in values)
        head = f"{lead}: no expected value for {', '.join(missing)}, so by"
    else:
        head = f"{lead}: by"
    if winner.priority != loser.priority:
        return f"{head} priority {winner.priority} over {loser.priority}"
    return f"{head} equal priority {winner.priority}, first by name"


def day_bounds(now: datetime, tz_name: str) -> tuple[datetime, datetime]:
    """The local calendar day of ``now`` in ``tz_name``, as a UTC [start, end) pair."""
    from closedloop.activate.policy import zone

    tz = zone(None, tz_name)
    day = now.astimezone(tz).date()
    start = datetime.combine(day, time(0), tz).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), time(0), tz).astimezone(UTC)
    return start, end


def _entered(
    engine: Engine, campaign: str, people: Sequence[str], start: datetime, end: datetime
) -> set[str]:
    """People the journey entered in [start, end): its first state rows (seq 0)."""
    if not engine.exists("journey_state"):
        return set()
    s = engine.table("journey_state")
    s = s.filter(
        (s.campaign == campaign) & (s.seq == 0) & (s.entered_at >= start) & (s.entered_at < end)
    )
    if len(people) <= _MANY:
        s = s.filter(s.customer_id.isin(list(people)))
    return {str(c) for c in s.select("customer_id").to_pyarrow().column(0).to_pylist()}


def fired_today(
    engine: Engine,
    rival: CampaignDef,
    people: Sequence[str],
    now: datetime,
    timezone: str,
    id_types: Sequence[str] = (),
) -> set[str]:
    """Those of ``people`` for whom ``rival``'s trigger fires on ``now``'s local day.

    Events and segment entries count from the start of the day to ``now`` (what has
    happened); dates, calendar phases and schedules over the whole day (they are known
    ahead). ``id_types`` lets an event not yet resolved by identity find its customer by
    userId, as the worker does; journey entries of the day count in any case.
    """
    from closedloop.activate import triggers as tr
    from closedloop.activate.policy import zone
    from closedloop.core.definitions.campaigns import (
        CalendarTrigger,
        DateTrigger,
        EventTrigger,
        ScheduleTrigger,
        SegmentEntryTrigger,
    )

    tz_name = (rival.policy.default_timezone if rival.policy else None) or timezone
    start, end = day_bounds(now, tz_name)
    found = _entered(engine, rival.name, people, start, end)
    wanted = set(people)
    t = rival.trigger
    just_before = start - timedelta(microseconds=1)  # the fire functions read (since, now]
    last = end - timedelta(microseconds=1)
    if isinstance(t, EventTrigger):
        rows = tr.event_rows(
            engine, t.event, t.where, list(id_types), customers=people, since=start
        )
        found |= {str(r["customer_id"]) for r in rows if r["timestamp"] <= min(now, last)}
    elif isinstance(t, SegmentEntryTrigger):
        fired = tr.fire_segment_entry(engine, t, just_before, min(now, last), zone(None, tz_name))
        found |= {c.customer_id for c in fired.candidates}
    elif isinstance(t, DateTrigger):
        fired = tr.fire_date(engine, t, rival.audience, just_before, last, tz_name)
        found |= {c.customer_id for c in fired.candidates}
    elif isinstance(t, CalendarTrigger):
        fired = tr.fire_calendar(engine, t, rival.audience, just_before, last, tz_name)
        found |= {c.customer_id for c in fired.candidates}
    elif isinstance(t, ScheduleTrigger):
        fired = tr.fire_schedule(engine, t, rival.audience, just_before, last, tz_name)
        found |= {c.customer_id for c in fired.candidates}
    return found & wanted


def _trigger_words(c: CampaignDef) -> str:
    t = c.trigger
    kind = getattr(t, "kind", "trigger")
    detail = getattr(t, "event", None) or getattr(t, "segment_entry", None)
    return f"its {kind} trigger{f' ({detail})' if detail else ''} fired today"


def contest(
    engine: Engine,
    campaign: CampaignDef,
    rivals: Sequence[CampaignDef],
    people: Sequence[str],
    *,
    now: datetime | None = None,
    timezone: str = "UTC",
    id_types: Sequence[str] = (),
) -> dict[str, Loss]:
    """Who of ``people`` this campaign loses, to which rival, and why.

    A rival competes for a person in its audience now — and, when it is triggered, only if
    its trigger fires for them on ``now``'s local day (see the module docstring).
    ``campaign``'s ``arbitration`` decides how (``pick_winner``); nobody is lost without
    rivals.
    """
    from closedloop.segments.audience import current_members

    if campaign.arbitration is None or not people:
        return {}
    others = [r for r in rivals if r.name != campaign.name and r.arbitration is not None]
    if not others:
        return {}
    when = now or datetime.now(UTC)
    many = len(people) > _MANY
    inside: dict[str, set[str]] = {}
    fired: dict[str, str] = {}
    for r in others:
        m = current_members(engine, r.audience).select("customer_id").distinct()
        if not many:
            m = m.filter(m.customer_id.isin(list(people)))
        members = {str(x) for x in m.customer_id.to_pyarrow().to_pylist()}
        if r.trigger is not None and members:
            members &= fired_today(engine, r, sorted(members), when, timezone, id_types)
            fired[r.name] = _trigger_words(r)
        inside[r.name] = members
    by_value = campaign.arbitration == "value"
    ev = expected_values(engine, [campaign, *others], people) if by_value else {}
    lost: dict[str, Loss] = {}
    for p in people:
        here = [campaign, *(r for r in others if p in inside[r.name])]
        if len(here) == 1:
            continue
        values = {c.name: ev[(c.name, p)] for c in here if (c.name, p) in ev}
        winner = pick_winner(here, values, by_value)
        if winner.name != campaign.name:
            lost[p] = Loss(winner.name, explain(campaign, winner, here, values, by_value, fired))
    return lost


def arbitrate(
    engine: Engine,
    campaign: CampaignDef,
    rivals: Sequence[CampaignDef],
    people: Sequence[str],
    *,
    now: datetime | None = None,
    timezone: str = "UTC",
    id_types: Sequence[str] = (),
) -> dict[str, str]:
    """Who of ``people`` this campaign loses, and to which rival: {person: winner}."""
    found = contest(engine, campaign, rivals, people, now=now, timezone=timezone, id_types=id_types)
    return {p: loss.winner for p, loss in found.items()}
