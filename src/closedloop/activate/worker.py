"""The journey worker: one ``tick`` fires triggers, admits entries and advances every journey.

A tick, for each campaign with a ``trigger`` (higher ``priority`` first, so when caps allow
only one message the more important journey's goes out):

1. reads its trigger over (watermark − margin, now]: new events since the watermark, segment
   entries, date / calendar / scheduled fire times;
2. keeps the candidates in the campaign's audience and admits them by the entry rule;
3. walks every live instance (``activate.journeys.Walker``), sending through the delivery log
   — those under way first, then the new entries (an instance that ends frees its person to
   enter the next occasion in the same tick);
4. appends the changed states in one insert, then the new watermarks.

Resuming after a crash needs nothing special. Until step 4 nothing about the tick is stored
but the deliveries of its sends; a re-run reads the same candidates (the window is re-read
from the old watermark), rebuilds the same instances and reaches the same send steps, where
``run_campaign`` finds every decision already logged (and repairs an outbox written but not
logged) — so nobody gets a message twice. After step 4 the instances are known and entry is
refused for their occasions; the watermark only saves re-reading.

``run_worker`` repeats ticks every ``interval`` seconds; with a spool folder it first moves
collected events into the warehouse (the collector's loader), so one process owns the
warehouse file and an event reaches its journey in the same pass.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa

from closedloop.activate.campaign import Checkpoint
from closedloop.activate.journeys import (
    LIVE,
    Instance,
    Walker,
    WalkResult,
    admit,
    current_states,
    new_instance,
    past_entries,
    state_rows,
)
from closedloop.activate.policy import zone
from closedloop.activate.triggers import (
    Candidate,
    Fired,
    fire_calendar,
    fire_date,
    fire_event,
    fire_schedule,
    fire_segment_entry,
)
from closedloop.core.clock import Clock
from closedloop.core.definitions import CampaignDef, Project
from closedloop.core.definitions.campaigns import (
    CalendarTrigger,
    DateTrigger,
    EventTrigger,
    ScheduleTrigger,
    SegmentEntryTrigger,
)
from closedloop.core.engine import Engine
from closedloop.segments.audience import current_members
from closedloop.tags.catalogue import record_tag_uses

log = logging.getLogger(__name__)

CATCH_UP = timedelta(days=1)  # how far back a journey's first tick looks
LATE = timedelta(minutes=10)  # event windows overlap by this much: loads may lag receipt
MARK_EVERY = timedelta(minutes=5)  # an idle trigger's watermark is written at most this often


@dataclass
class TickResult:
    entered: int = 0
    sent: int = 0
    held_out: int = 0
    suppressed: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # done / stopped / exited this tick
    waiting: int = 0


def journeys(project: Project) -> list[CampaignDef]:
    """The project's triggered campaigns, highest priority first."""
    found = [c for c in project.campaigns.values() if c.trigger is not None]
    return sorted(found, key=lambda c: (-c.priority, c.name))


def user_id_types(project: Project) -> list[str]:
    """Identifier types found in a message's userId: how a fresh event finds its customer."""
    return [t.name for t in project.identity.types if "user_id" in t.paths]


def watermarks(engine: Engine) -> dict[str, datetime]:
    w = engine.table("journey_watermarks")
    latest = w.group_by("campaign").aggregate(watermark=w.watermark.max())
    return {r["campaign"]: r["watermark"] for r in latest.to_pyarrow().to_pylist()}


def fire(engine: Engine, project: Project, c: CampaignDef, since: datetime, now: datetime) -> Fired:
    tz_name = (c.policy.default_timezone if c.policy else None) or project.config.timezone
    t = c.trigger
    if isinstance(t, EventTrigger):
        tz = zone(None, tz_name)
        return fire_event(engine, t, since, now, user_id_types(project), tz, late=LATE)
    if isinstance(t, SegmentEntryTrigger):
        return fire_segment_entry(engine, t, since - LATE, now, zone(None, tz_name))
    if isinstance(t, DateTrigger):
        return fire_date(engine, t, c.audience, since, now, tz_name)
    if isinstance(t, CalendarTrigger):
        return fire_calendar(engine, t, c.audience, since, now, tz_name)
    if isinstance(t, ScheduleTrigger):
        return fire_schedule(engine, t, c.audience, since, now, tz_name)
    raise TypeError(f"campaign {c.name} has no trigger")


def tick(
    engine: Engine,
    project: Project,
    now: datetime,
    *,
    outbox_dir: Path | None = None,
    checkpoint: Checkpoint | None = None,
) -> TickResult:
    """One pass of every journey at ``now`` (see the module docstring); safe to repeat."""
    hook: Checkpoint = checkpoint or (lambda _: None)
    outbox = outbox_dir or project.path(project.config.outbox)
    todo = journeys(project)
    result = TickResult()
    if not todo:
        return result
    states = current_states(engine, [c.name for c in todo])
    marks = watermarks(engine)
    new_marks: dict[str, datetime] = {}
    changed: list[Instance] = []
    finished: dict[str, int] = defaultdict(int)
    decided: list[str] = []  # journeys that decided about someone: they used their tags
    for c in todo:
        mine = states.get(c.name, [])
        fired = fire(engine, project, c, marks.get(c.name, now - CATCH_UP), now)
        old = marks.get(c.name)
        if old is None or fired.candidates or fired.watermark - old >= MARK_EVERY:
            new_marks[c.name] = fired.watermark  # else re-reading a little more costs less
        walker = Walker(
            engine,
            project,
            c,
            now,
            outbox_dir=outbox,
            id_types=user_id_types(project),
            checkpoint=hook,
        )
        # Instances already under way go first: one that ends now frees its person to enter
        # the next occasion in this same tick.
        walker.run(mine)
        entries = _admitted(engine, c, fired.candidates, mine)
        hook("fired")
        fresh = [new_instance(c, e) for e in entries]
        result.entered += len(fresh)
        walker.run(fresh)
        walked: WalkResult = walker.result  # both walks together
        instances = [*mine, *fresh]
        result.sent += walked.sent
        result.held_out += walked.held_out
        result.suppressed += walked.suppressed
        if walked.sent or walked.held_out or walked.suppressed:
            decided.append(c.name)
        for i in instances:
            if i.changed:
                changed.append(i)
                if i.status not in LIVE:
                    finished[i.status] += 1
            if i.status == "waiting":
                result.waiting += 1
    if changed:
        engine.append("journey_state", state_rows(changed, now))
    hook("states_written")
    if new_marks:
        rows = [{"campaign": k, "watermark": v, "updated_at": now} for k, v in new_marks.items()]
        engine.append("journey_watermarks", pa.Table.from_pylist(rows, schema=_MARKS))
    hook("watermarked")
    if decided:  # the tag catalogue shows when a tag was last used by a campaign
        record_tag_uses(engine, project, [f"campaign:{n}" for n in decided], Clock(now))
    result.finished = dict(finished)
    return result


def _admitted(
    engine: Engine, c: CampaignDef, candidates: list[Candidate], mine: list[Instance]
) -> list[Candidate]:
    """Candidates in the campaign's audience that its entry rule lets in."""
    if not candidates:
        return []
    members = current_members(engine, c.audience).select("customer_id").distinct()
    wanted = sorted({x.customer_id for x in candidates})
    inside = set(
        members.filter(members.customer_id.isin(wanted)).customer_id.to_pyarrow().to_pylist()
    )
    candidates = [x for x in candidates if x.customer_id in inside]
    if not candidates:
        return []
    past = past_entries(engine, c.name, sorted(inside))
    live = {i.customer_id for i in mine if i.status in LIVE}
    return admit(c.entry, candidates, past, live)


_MARKS = pa.schema(
    [
        ("campaign", pa.string()),
        ("watermark", pa.timestamp("us", tz="UTC")),
        ("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)


def run_worker(
    project: Project,
    *,
    interval: float = 1.0,
    once: bool = False,
    spool: Path | None = None,
    stop: threading.Event | None = None,
    on_tick: Checkpoint | None = None,
    clock: Clock | None = None,
    dedup_window: timedelta | None = None,
    after_load: Callable[[Engine, int], object] | None = None,
) -> TickResult:
    """Tick every ``interval`` seconds until ``stop`` is set (or once); returns the last tick.

    With ``spool`` (a collector's spool folder) each pass first loads what was collected
    (``dedup_window`` as the collector's loader takes it: None recognises duplicates forever).
    ``after_load(engine, accepted)`` runs between the load and the tick (``closedloop serve``
    refreshes portraits, tags and segments there, so a segment entry fires in the same pass).
    """
    from closedloop.collect.drain import SpoolLoader  # collect's loader, only when draining

    halt = stop or threading.Event()
    last = TickResult()
    with Engine(project.engine_url) as engine:
        loader = (
            SpoolLoader(engine, project.config.sources, spool, dedup_window=dedup_window)
            if spool
            else None
        )
        while True:
            accepted = loader.run_once().accepted if loader is not None else 0
            if after_load is not None:
                after_load(engine, accepted)
            last = tick(engine, project, (clock or Clock()).now())
            busy = last.entered or last.sent or last.held_out or last.suppressed or last.finished
            if on_tick is not None and busy:  # report ticks that did something
                on_tick(
                    f"{datetime.now(UTC):%H:%M:%S} entered {last.entered}, sent {last.sent}, "
                    f"held out {last.held_out}, stopped {last.suppressed}, "
                    f"waiting {last.waiting}, finished {last.finished or {}}"
                )
            if once or halt.wait(interval):
                return last
