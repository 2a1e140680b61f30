"""Fresh while serving: a loaded event changes its customer's traits and segments in seconds.

``closedloop serve`` has one process that owns the warehouse (DuckDB allows one writer): the
spool loader, or the journey worker that loads the spool before each tick. That process
calls a :class:`LiveRefresher` after every load pass. It runs a refresh

* after a pass that accepted events: identity resolution (``identity.resolve``), then the
  incremental portrait refresh (``portrait.refresh``: only customers whose events,
  attribution or windows changed), tags, segments (a new member's stay gets ``entered_at``
  = the refresh's clock, so segment-entry journey triggers fire from it in the same pass),
  and the profile lookup's serving store — tags, segments and store too only for the
  customers whose inputs changed (``serving.changes``; everyone when it cannot tell);
* every ``interval`` seconds even without events (the clock alone moves windows: "no order
  in 30 days" becomes true by itself);
* once at start-up, which also repairs whatever a crash left half-done.

Loads are not blocked for long: events that arrive while a refresh runs wait in the fsynced
spool and the next pass loads them all and refreshes once for all of them.

Crash safety comes from the stages: every table is replaced whole (or appended) and each
stage's bookkeeping is written after its data, so a crash leaves each table old or new, and
the next run recomputes from the stored state (every step is idempotent). The run record in
``live_refreshes`` is written last.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import ibis
import ibis.expr.types as ir
import pyarrow as pa

from closedloop.core.clock import Clock
from closedloop.core.definitions import Project, SegmentDef
from closedloop.core.engine import Engine
from closedloop.identity.resolve import resolve
from closedloop.pipeline import project_fields, segment_order
from closedloop.portrait.lookup import materialise, update_store
from closedloop.portrait.refresh import refresh
from closedloop.portrait.tables import PORTRAIT_RUNS, PROFILES
from closedloop.segments.accounts import evaluate_in_batches
from closedloop.segments.audience import Fields, SegmentResult
from closedloop.segments.incremental import evaluate_changed, segment_windows
from closedloop.serving.changes import Changes, plan_changes, save_state
from closedloop.serving.tables import LIVE_REFRESHES
from closedloop.tags.build import build_tags
from closedloop.tags.catalogue import record_tag_uses
from closedloop.tags.incremental import TagRefresh, crossed, refresh_tags, tag_windows

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 60.0  # seconds between clock-only refreshes
# Below this many customers tags, segments and the lookup store are recomputed whole: each
# query of the incremental path costs more to compile and plan than the rows it saves (at
# 10,000 customers the incremental steps took ~0.3 s more CPU per refresh than the whole
# ones; see bench/freshness.py --incremental-from).
INCREMENTAL_FROM = 50_000


@dataclass(frozen=True)
class LiveRun:
    """What one live refresh did (also a row of ``live_refreshes``)."""

    as_of: datetime
    finished_at: datetime
    reason: str
    loaded: int
    identity_path: str  # 'incremental' or 'full' (identity.resolve decides)
    changes: str  # how the later steps found whom to recompute (serving.changes)
    recomputed: int
    entered: int
    exited: int
    identity_s: float
    portrait_s: float
    tags_s: float
    segments_s: float
    lookup_s: float
    seconds: float


def forward_tags(
    engine: Engine,
    project: Project,
    ordered: list[SegmentDef],
    clock: Clock,
    changes: Changes,
    population: int,
) -> tuple[TagRefresh, ir.Table | None]:
    """Tags brought forward for the customers ``changes`` names and those whose events the
    clock moved across an edge of a tag's or a segment's window (one scan of the events for
    both). The tag step narrows the per-customer tables to its customers and the segments'
    clock-moved ones (returned), and the segment step reads them from there."""
    tw, sw = tag_windows(project.tags), segment_windows(ordered)
    by_clock = None
    if tw is not None or sw is not None:
        moved = crossed(engine, changes.since, clock.now(), [*(tw or []), *(sw or [])])
        by_clock = engine.scratch("live_crossed", moved)
    seg_moved = by_clock if sw is not None else None
    tagged = refresh_tags(
        engine,
        project.tags,
        clock,
        changed=changes.customers,
        since=changes.since,
        root=project.root,
        widen=seg_moved,
        moved=by_clock if tw is not None else None,
        population=population,
    )
    return tagged, seg_moved


def forward_segments(
    engine: Engine,
    ordered: list[SegmentDef],
    fields: Fields,
    clock: Clock,
    changes: Changes,
    tagged: TagRefresh,
    seg_moved: ir.Table | None,
    population: int,
) -> dict[str, SegmentResult]:
    """Segments brought forward after :func:`forward_tags`, reading what it narrowed."""
    return evaluate_changed(
        engine,
        ordered,
        fields,
        clock,
        changed=tagged.changed,
        since=changes.since,
        moved_by_clock=seg_moved,
        reuse=tagged.narrowing,
        population=population,
    )


def refresh_all(
    engine: Engine,
    project: Project,
    as_of: datetime,
    *,
    reason: str = "events",
    loaded: int = 0,
    incremental_from: int = INCREMENTAL_FROM,
) -> LiveRun:
    """identity → portrait (incremental) → tags → segments → serving store, at ``as_of``.

    The steps of ``pipeline.build(load=False, incremental=True)`` without its validation
    (done once when serving starts) and timed one by one. Tag uses are recorded only on
    clock refreshes: once per refresh would add a row per tag and segment every second.

    From ``incremental_from`` customers on, tags, segments and the lookup store are
    brought forward only for the customers whose inputs changed (``serving.changes``);
    below, and whenever it cannot tell which, for everyone.
    """
    clock = Clock(as_of)
    tz = project.config.timezone
    marks = [time.perf_counter()]
    ident = resolve(engine, project.identity, clock)
    marks.append(time.perf_counter())
    portrait = refresh(engine, project.traits, clock, tz, accounts=project.accounts)
    changes = None
    how = f"everyone: below {incremental_from:,} customers"
    incremental = portrait.customers >= incremental_from
    if incremental:
        changes, how = plan_changes(engine, project, portrait, as_of)
    marks.append(time.perf_counter())
    fields = project_fields(project)
    ordered = segment_order(project)[0]
    if changes is None:
        build_tags(engine, project.tags, clock, root=project.root)
        marks.append(time.perf_counter())
        results = evaluate_in_batches(engine, ordered, fields, clock)  # as a build does
    else:
        tagged, seg_moved = forward_tags(
            engine, project, ordered, clock, changes, portrait.customers
        )
        marks.append(time.perf_counter())
        results = forward_segments(
            engine, ordered, fields, clock, changes, tagged, seg_moved, portrait.customers
        )
    entered = sum(r.entered for r in results.values())
    exited = sum(r.exited for r in results.values())
    if reason != "events":
        record_tag_uses(engine, project, [f"segment:{s.name}" for s in ordered], clock)
    marks.append(time.perf_counter())
    if changes is None:
        materialise(engine)
    else:
        served = changes.served.customer_id.to_pyarrow().to_pylist()
        if update_store(engine, [str(c) for c in served], changes.stamp) is None:
            materialise(engine)
    if incremental:
        save_state(engine, project, as_of, changes=changes, profiles=portrait.changed is None)
    marks.append(time.perf_counter())
    identity_s, portrait_s, tags_s, segments_s, lookup_s = (
        round(b - a, 4) for a, b in itertools.pairwise(marks)
    )
    run = LiveRun(
        as_of=as_of,
        finished_at=datetime.now(UTC),
        reason=reason,
        loaded=loaded,
        identity_path=ident.path,
        changes=how,
        recomputed=portrait.recomputed,
        entered=entered,
        exited=exited,
        identity_s=identity_s,
        portrait_s=portrait_s,
        tags_s=tags_s,
        segments_s=segments_s,
        lookup_s=lookup_s,
        seconds=round(marks[-1] - marks[0], 4),
    )
    row = {k: [getattr(run, k)] for k in LIVE_REFRESHES.columns}
    _upgrade(engine)
    engine.append(LIVE_REFRESHES.name, pa.table(row))
    return run


def _upgrade(engine: Engine) -> None:
    """Run records written before they said how changes were found get a null there."""
    if not engine.exists(LIVE_REFRESHES.name):
        return
    t = engine.table(LIVE_REFRESHES.name)
    if "changes" not in t.columns:
        engine.replace(LIVE_REFRESHES.name, t.mutate(changes=ibis.null("string")))


class LiveRefresher:
    """The hook the warehouse-owning process calls after each load pass.

    ``interval``: seconds between clock-only refreshes (None: only after loads and at start).
    ``clock``: pinned in tests; by default the wall clock.
    """

    def __init__(
        self,
        project: Project,
        *,
        interval: float | None = DEFAULT_INTERVAL,
        clock: Clock | None = None,
        report: Callable[[str], None] | None = None,
        incremental_from: int = INCREMENTAL_FROM,
    ) -> None:
        self.project = project
        self.incremental_from = incremental_from
        self.interval = interval
        self.clock = clock or Clock()
        self.report = report
        self.pending = 0  # events loaded since the last successful refresh
        self.last: float | None = None  # monotonic time of the last refresh attempt
        self.failed = False

    def due(self, accepted: int) -> str | None:
        """Why a refresh should run after a pass that accepted ``accepted`` events, if it should."""
        self.pending += accepted
        if self.last is None:
            return "start"
        if self.pending:
            if not self.failed:
                return "events"
            # After a failure, retry no faster than once per interval (or 5 s without one).
            wait = self.interval if self.interval else 5.0
            return "events" if time.monotonic() - self.last >= wait else None
        if self.interval and time.monotonic() - self.last >= self.interval:
            return "clock"
        return None

    @staticmethod
    def ready(engine: Engine) -> bool:
        """Whether there is something to refresh that a refresh may rewrite.

        Nothing before the first events. Profiles that no build wrote (no ``portrait_runs``:
        rows put there by hand or by another tool) are left alone: a refresh would replace
        them with profiles computed from the events; run ``closedloop build`` once to adopt
        the warehouse. A warehouse with neither gets its first (full) build here.
        """
        if not engine.exists("events"):
            return False
        return engine.exists(PORTRAIT_RUNS.name) or not engine.exists(PROFILES.name)

    def __call__(self, engine: Engine, accepted: int) -> LiveRun | None:
        reason = self.due(accepted)
        if reason is None:
            return None
        self.last = time.monotonic()
        if not self.ready(engine):
            return None
        try:
            run = refresh_all(
                engine,
                self.project,
                self.clock.now(),
                reason=reason,
                loaded=self.pending,
                incremental_from=self.incremental_from,
            )
        except Exception:  # keep loading: intake must not stop because a refresh failed
            log.exception("live refresh failed; the next pass retries")
            engine.forget()  # whatever the failed steps left, the catalogue is read afresh
            self.failed = True
            return None
        self.failed = False
        self.pending = 0
        if self.report is not None:
            self.report(
                f"{run.finished_at:%H:%M:%S} refresh ({run.reason}): {run.loaded:,} events, "
                f"{run.recomputed:,} customers, +{run.entered:,}/-{run.exited:,} in segments, "
                f"{run.seconds:.2f} s"
            )
        return run
