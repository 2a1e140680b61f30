"""Journeys: entry rules, the no-response rule and the step machine, over ``journey_state``.

A journey instance is one person in one campaign for one occasion. The worker
(``activate.worker``) admits candidates from the triggers through ``admit``, then walks every
live instance with ``Walker`` as far as it can go at ``now``:

* ``send`` hands the person to ``run_campaign`` restricted to them, with the delivery occasion
  ``OCCASION+STEP``: consent, holdout, caps, quiet hours, content, outbox and the idempotent
  delivery log are the one-shot campaign's, so a re-run after a crash finds the decision in the
  log and sends nothing again;
* before any later message of the instance, the contact policy's no-response rule is checked
  (``no_response_verdict``): no open/click carrying the last message's id, and no goal event,
  within ``within_hours`` → the instance stops (``stopped``/``no_response``) until the next
  occasion; a message still inside its window makes the instance wait for an answer;
* ``wait`` waits a duration (or, in a calendar journey, until a phase begins); ``wait_for``
  waits for an event with a timeout; ``branch`` goes by a trait, an event since entry or a
  stable hashed variant; ``exit`` (or the end of the list) finishes the instance.

Times are deterministic on replay: a step after a send starts at the decision time in the log,
a step after a wait at the wait's due time, so repeating a tick repeats its transitions.
"""

from __future__ import annotations

import difflib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import pyarrow as pa

from closedloop.activate import journey_tables as _journey_tables
from closedloop.activate.calendar import phase_times
from closedloop.activate.campaign import Checkpoint, run_campaign, step_message
from closedloop.activate.policy import zone
from closedloop.activate.templates import check_templates
from closedloop.activate.triggers import Candidate, event_rows
from closedloop.core.clock import Clock
from closedloop.core.conditions import evaluate_python
from closedloop.core.definitions import CampaignDef, Project
from closedloop.core.definitions.campaigns import (
    BranchStep,
    CalendarTrigger,
    DateTrigger,
    Entry,
    EntryRule,
    ExitStep,
    SegmentEntryTrigger,
    SendStep,
    WaitForStep,
    WaitStep,
)
from closedloop.core.definitions.policy import NoResponse
from closedloop.core.engine import Engine
from closedloop.core.errors import Problem
from closedloop.core.ids import unit_interval
from closedloop.core.yamlfile import load_yaml, locate
from closedloop.portrait.tables import PROFILES

LIVE = ("active", "waiting")
MAX_ROUNDS = 64  # steps one instance may take in one tick (a guard against branch loops)
DATE_TYPES = ("date", "timestamp")


@dataclass
class Instance:
    """The current state of one journey instance (mutable while a tick walks it)."""

    campaign: str
    occasion: str
    customer_id: str
    seq: int
    step: str
    status: str
    entered_at: datetime
    step_started_at: datetime
    reason: str | None = None
    wake_at: datetime | None = None
    trigger_id: str | None = None
    last_message_id: str | None = None
    last_sent_at: datetime | None = None
    changed: bool = False  # (not stored) moved in this tick: a new row is due
    fresh: bool = False  # (not stored) entered in this tick: its first row has seq 0

    def go(self, step: str | None, at: datetime) -> None:
        """Move to ``step`` (None: the journey is done) starting at ``at``."""
        if step is None:
            self.finish("done", None)
        else:
            self.step, self.status, self.reason = step, "active", None
            self.step_started_at, self.wake_at = at, None
        self.changed = True

    def sleep(self, until: datetime | None, reason: str) -> None:
        if (self.status, self.wake_at, self.reason) != ("waiting", until, reason):
            self.status, self.wake_at, self.reason = "waiting", until, reason
            self.changed = True

    def finish(self, status: str, reason: str | None) -> None:
        self.status, self.reason, self.wake_at = status, reason, None
        self.changed = True


# ---- entry rules --------------------------------------------------------------------------
def admit(
    entry: Entry,
    candidates: Sequence[Candidate],
    past: dict[str, list[tuple[str, datetime]]],
    live: set[str],
) -> list[Candidate]:
    """The candidates the entry rule lets in, in time order.

    ``past`` holds every earlier instance of the campaign per person (occasion, entered_at);
    ``live`` the people still inside an instance. Nobody enters twice for one occasion (the
    instance key), nor while already inside; then ``once`` admits a person once ever,
    ``once_per_occasion`` once per occasion, and ``cooldown`` only when the last entry is at
    least ``cooldown`` old. Admitted candidates count for the later ones of the same batch.
    """
    history = {k: list(v) for k, v in past.items()}
    inside = set(live)
    out: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.at, c.customer_id, c.occasion)):
        mine = history.get(c.customer_id, [])
        if c.customer_id in inside or any(o == c.occasion for o, _ in mine):
            continue
        if entry.rule is EntryRule.ONCE and mine:
            continue
        if entry.rule is EntryRule.COOLDOWN:
            assert entry.cooldown is not None  # noqa: S101 - validated by Entry
            if any(c.at - at < entry.cooldown for _, at in mine):
                continue
        out.append(c)
        history.setdefault(c.customer_id, []).append((c.occasion, c.at))
        inside.add(c.customer_id)
    return out


# ---- the no-response rule -----------------------------------------------------------------
class Verdict(StrEnum):
    SEND = "send"
    WAIT = "wait"  # the last message may still be answered: decide at its deadline
    STOP = "stop"  # unanswered past its window: stop until the next occasion


def no_response_verdict(
    rule: NoResponse | None, last_sent_at: datetime | None, responded: bool, now: datetime
) -> tuple[Verdict, datetime | None]:
    """May the next message of an instance go out? (verdict, deadline when waiting)."""
    if rule is None or last_sent_at is None or responded:
        return Verdict.SEND, None
    deadline = last_sent_at + timedelta(hours=rule.within_hours)
    if now >= deadline:
        return Verdict.STOP, None
    return Verdict.WAIT, deadline


# ---- state --------------------------------------------------------------------------------
def current_states(engine: Engine, campaigns: Sequence[str]) -> dict[str, list[Instance]]:
    """The live instances (active or waiting) of ``campaigns`` in their latest state.

    Finished instances stay in the log but are not read back each tick; entry rules ask for
    the history of the few people who are candidates (``past_entries``).
    """
    out: dict[str, list[Instance]] = defaultdict(list)
    if not campaigns:
        return out
    s = engine.table("journey_state")
    s = s.filter(s.campaign.isin(list(campaigns)))
    keys = ["campaign", "occasion", "customer_id"]
    latest = s.group_by(keys).aggregate(seq=s.seq.max())
    cur = s.join(latest, [*keys, "seq"])
    cur = cur.filter(cur.status.isin(list(LIVE)))
    for row in cur.select(*STORED).to_pyarrow().to_pylist():
        out[row["campaign"]].append(Instance(**row))
    return out


def past_entries(
    engine: Engine, campaign: str, customers: Sequence[str]
) -> dict[str, list[tuple[str, datetime]]]:
    """Every instance ``customers`` ever had in ``campaign``: (occasion, entered_at) each.

    An instance's first row has seq 0 and carries its entry time, so one row per instance.
    """
    s = engine.table("journey_state")
    first = s.filter((s.campaign == campaign) & (s.seq == 0) & s.customer_id.isin(customers))
    out: dict[str, list[tuple[str, datetime]]] = defaultdict(list)
    for r in first.select("customer_id", "occasion", "entered_at").to_pyarrow().to_pylist():
        out[r["customer_id"]].append((r["occasion"], r["entered_at"]))
    return out


STORED = [f for f in Instance.__dataclass_fields__ if f not in ("changed", "fresh")]


def state_rows(instances: Sequence[Instance], now: datetime) -> pa.Table:
    """Rows to append for changed instances: the next seq (an entry's first row has seq 0)."""
    rows = []
    for i in instances:
        row = {f: getattr(i, f) for f in STORED}
        row["seq"] = i.seq if i.fresh else i.seq + 1
        rows.append(row | {"updated_at": now})
    return pa.Table.from_pylist(rows, schema=_schema())


def _schema() -> pa.Schema:
    ts = pa.timestamp("us", tz="UTC")
    types = {"string": pa.string(), "int64": pa.int64()}
    cols = _journey_tables.JOURNEY_STATE.columns
    return pa.schema([(c, types.get(t, ts)) for c, t in cols.items()])


# ---- walking ------------------------------------------------------------------------------
@dataclass
class WalkResult:
    sent: int = 0
    held_out: int = 0
    suppressed: int = 0

    def __iadd__(self, other: WalkResult) -> WalkResult:
        self.sent += other.sent
        self.held_out += other.held_out
        self.suppressed += other.suppressed
        return self


class Walker:
    """Walks the live instances of one journey as far as they can go at ``now``."""

    def __init__(
        self,
        engine: Engine,
        project: Project,
        campaign: CampaignDef,
        now: datetime,
        *,
        outbox_dir: Path,
        id_types: Sequence[str],
        checkpoint: Checkpoint | None = None,
    ) -> None:
        self.engine, self.project, self.c, self.now = engine, project, campaign, now
        self.outbox_dir, self.id_types = outbox_dir, list(id_types)
        self.hook: Checkpoint = checkpoint or (lambda _: None)
        self.steps = {s.id: s for s in campaign.journey}
        order = [s.id for s in campaign.journey]
        self.after = {a: b for a, b in zip(order, [*order[1:], None], strict=True)}
        self.policy = campaign.policy
        self.default_tz = (self.policy.default_timezone if self.policy else None) or (
            project.config.timezone
        )
        self.result = WalkResult()

    def next_of(self, step: str, target: str | None) -> str | None:
        return target if target is not None else self.after[step]

    def run(self, instances: Sequence[Instance]) -> WalkResult:
        live = [i for i in instances if i.status in LIVE]
        for _ in range(MAX_ROUNDS):
            if not live or not self._round(live):
                break
            live = [i for i in live if i.status in LIVE]
        return self.result

    def _round(self, live: list[Instance]) -> bool:
        """Every live instance takes at most one step; whether any of them moved."""
        progressed = False
        by_step: dict[str, list[Instance]] = defaultdict(list)
        for i in live:
            by_step[i.step].append(i)
        for step_id, group in by_step.items():
            step = self.steps.get(step_id)
            marks = [(i.step, i.status, i.step_started_at) for i in group]
            if step is None:  # the journey was edited and this step is gone
                for i in group:
                    i.finish("exited", "step_removed")
            elif isinstance(step, ExitStep):
                for i in group:
                    i.finish("done", None)
            elif isinstance(step, WaitStep):
                self._wait(step, group)
            elif isinstance(step, WaitForStep):
                self._wait_for(step, group)
            elif isinstance(step, BranchStep):
                self._branch(step, group)
            elif isinstance(step, SendStep):
                self._send(step, group)
            if marks != [(i.step, i.status, i.step_started_at) for i in group]:
                progressed = True
        return progressed

    def _wait(self, step: WaitStep, group: list[Instance]) -> None:
        zones = self._zones(group) if step.wait.until_phase else {}
        for i in group:
            if step.wait.duration is not None:
                due = i.step_started_at + step.wait.duration
            else:
                assert isinstance(self.c.trigger, CalendarTrigger)  # noqa: S101 - validated
                tz = zone(zones.get(i.customer_id), self.default_tz)
                phases = phase_times(self.c.trigger, int(i.occasion), tz)
                due = phases[str(step.wait.until_phase)]
            if self.now >= due:
                i.go(self.next_of(step.id, step.next), max(due, i.step_started_at))
            else:
                i.sleep(due, "wait")

    def _wait_for(self, step: WaitForStep, group: list[Instance]) -> None:
        spec = step.wait_for
        assert spec.timeout is not None  # noqa: S101 - validated
        seen = self._events(spec.event, spec.where, group, [i.step_started_at for i in group])
        for i in group:
            hit = [t for t in seen.get(i.customer_id, []) if i.step_started_at <= t <= self.now]
            due = i.step_started_at + spec.timeout
            if hit and min(hit) <= due:
                i.go(self.next_of(step.id, step.on_event), min(hit))
            elif self.now >= due:
                i.go(self.next_of(step.id, step.on_timeout), due)
            else:
                i.sleep(due, f"wait_for:{spec.event}")

    def _branch(self, step: BranchStep, group: list[Instance]) -> None:
        b = step.branch
        if b.variants is not None:
            total = sum(v.weight for v in b.variants)
            for i in group:
                u = unit_interval("journey_variant", self.c.name, step.id, i.customer_id) * total
                arm = b.variants[-1]
                for v in b.variants:
                    if u < v.weight:
                        arm = v
                        break
                    u -= v.weight
                i.go(arm.next, i.step_started_at)
            return
        if b.when is not None:
            values = self._traits(b.when.trait, group)
            verdict = {
                i.customer_id: evaluate_python(b.when, {b.when.trait: values.get(i.customer_id)})
                for i in group
            }
        else:
            assert b.event is not None  # noqa: S101 - validated
            seen = self._events(b.event.event, b.event.where, group, [i.entered_at for i in group])
            verdict = {
                i.customer_id: any(
                    i.entered_at <= t <= self.now for t in seen.get(i.customer_id, [])
                )
                for i in group
            }
        for i in group:
            i.go(b.then if verdict[i.customer_id] else b.else_, i.step_started_at)

    def _send(self, step: SendStep, group: list[Instance]) -> None:
        rule = self.policy.no_response if self.policy else None
        ready: list[Instance] = []
        answered = self._answered(rule, group) if rule else set()
        for i in group:
            key = (i.customer_id, i.last_message_id)
            verdict, deadline = no_response_verdict(rule, i.last_sent_at, key in answered, self.now)
            if verdict is Verdict.SEND:
                ready.append(i)
            elif verdict is Verdict.STOP:
                i.finish("stopped", "no_response")
            else:
                i.sleep(deadline, "awaiting_response")
        by_occasion: dict[str, list[Instance]] = defaultdict(list)
        for i in ready:
            by_occasion[i.occasion].append(i)
        message = step_message(self.c, step)
        for occasion, members in sorted(by_occasion.items()):
            delivery_occasion = f"{occasion}+{step.id}"
            ids = [i.customer_id for i in members]
            run = run_campaign(
                self.engine,
                message,
                outbox_dir=self.outbox_dir,
                occasion=delivery_occasion,
                clock=Clock(self.now),
                timezone=self.default_tz,
                checkpoint=self.hook,
                customers=ids,
                global_control=self.project.config.global_control,
                rivals=list(self.project.campaigns.values()),
            )
            self.result += WalkResult(run.sent, run.held_out, run.suppressed)
            self.hook("journey_sent")
            d = self.engine.table("deliveries")
            d = d.filter(
                (d.campaign == self.c.name)
                & (d.occasion == delivery_occasion)
                & d.customer_id.isin(ids)
            )
            rows = d.select("customer_id", "status", "message_id", "decided_at", "send_at")
            decided = {r["customer_id"]: r for r in rows.to_pyarrow().to_pylist()}
            for i in members:
                r = decided.get(i.customer_id)
                if r is None:  # left the audience (or lost its profile) before the message
                    i.finish("exited", "not_in_audience")
                    continue
                if r["status"] == "sent":
                    i.last_message_id = r["message_id"]
                    i.last_sent_at = r["send_at"] or r["decided_at"]
                i.go(self.next_of(step.id, step.next), max(r["decided_at"], i.step_started_at))

    # ---- reads --------------------------------------------------------------------------
    def _events(
        self, name: str, where: Any, group: list[Instance], starts: list[datetime]
    ) -> dict[str, list[datetime]]:
        rows = event_rows(
            self.engine,
            name,
            where,
            self.id_types,
            customers=[i.customer_id for i in group],
            since=min(starts),
        )
        out: dict[str, list[datetime]] = defaultdict(list)
        for r in rows:
            out[r["customer_id"]].append(r["timestamp"])
        return out

    def _answered(self, rule: NoResponse, group: list[Instance]) -> set[tuple[str, str | None]]:
        """(customer, message id) pairs whose last message got a response or a conversion."""
        asked = [i for i in group if i.last_sent_at is not None]
        if not asked:
            return set()
        since = min(i.last_sent_at for i in asked if i.last_sent_at is not None)
        names = sorted({*rule.responses, self.c.goal.event})
        got: dict[str, list[tuple[str, datetime, str | None]]] = defaultdict(list)
        for name in names:
            for r in event_rows(
                self.engine,
                name,
                [],
                self.id_types,
                customers=[i.customer_id for i in asked],
                since=since,
            ):
                props = json.loads(r.get("properties") or "{}")
                mid = props.get("message_id") if isinstance(props, dict) else None
                got[r["customer_id"]].append((name, r["timestamp"], mid))
        out: set[tuple[str, str | None]] = set()
        for i in asked:
            assert i.last_sent_at is not None  # noqa: S101
            for name, at, mid in got.get(i.customer_id, []):
                if at < i.last_sent_at or at > self.now:
                    continue
                if name == self.c.goal.event or mid == i.last_message_id:
                    out.add((i.customer_id, i.last_message_id))
        return out

    def _zones(self, group: list[Instance]) -> dict[str, str | None]:
        p = self.engine.table("profiles")
        ids = [i.customer_id for i in group]
        rows = p.filter(p.customer_id.isin(ids)).select("customer_id", "timezone")
        return {r["customer_id"]: r["timezone"] for r in rows.to_pyarrow().to_pylist()}

    def _traits(self, name: str, group: list[Instance]) -> dict[str, Any]:
        ids = [i.customer_id for i in group]
        if name in PROFILES.columns:
            p = self.engine.table("profiles")
            rows = p.filter(p.customer_id.isin(ids)).select("customer_id", value=p[name])
        else:
            t = self.engine.table("computed_traits")
            t = t.filter((t.trait == name) & t.customer_id.isin(ids))
            # A computed trait is a number or a text: whichever of the two columns is set.
            rows = t.select("customer_id", value=t.text_value.cast("string"), n=t.number_value)
            return {
                r["customer_id"]: r["n"] if r["value"] is None else r["value"]
                for r in rows.to_pyarrow().to_pylist()
            }
        return {r["customer_id"]: r["value"] for r in rows.to_pyarrow().to_pylist()}


def new_instance(campaign: CampaignDef, c: Candidate) -> Instance:
    return Instance(
        campaign=campaign.name,
        occasion=c.occasion,
        customer_id=c.customer_id,
        seq=0,
        step=campaign.journey[0].id,
        status="active",
        entered_at=c.at,
        step_started_at=c.at,
        trigger_id=c.trigger_id,
        changed=True,
        fresh=True,
    )


# ---- validation ---------------------------------------------------------------------------
def _campaign_files(project: Project) -> dict[str, tuple[str, dict[Any, int]]]:
    out: dict[str, tuple[str, dict[Any, int]]] = {}
    folder = project.root / "campaigns"
    if not folder.is_dir():
        return out
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        rel = str(path.relative_to(project.root))
        try:
            data, lines = load_yaml(path, display=rel)
        except Exception:  # noqa: S112 - a broken file was already reported by load_project
            continue
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            out[data["name"]] = (rel, lines)
    return out


def check_journeys(project: Project) -> list[Problem]:
    """Journey checks that need the project: traits and their types, segments, templates."""
    files = _campaign_files(project)
    problems: list[Problem] = []
    profile = PROFILES.columns
    known = sorted({*profile, *project.traits})
    for name, c in sorted(project.campaigns.items()):
        if c.trigger is None:
            continue
        rel, lines = files.get(name, (f"campaigns/{name}.yaml", {}))

        def problem(key: str, message: str, rel: str = rel, lines: Any = lines) -> None:
            parts = tuple(int(x) if x.isdigit() else x for x in key.split("."))
            line, _ = locate(lines, parts)
            problems.append(Problem(rel, message, line=line, key=key))

        def unknown(trait: str) -> str:
            close = difflib.get_close_matches(trait, known, n=2)
            hint = f" (did you mean {' or '.join(repr(x) for x in close)}?)" if close else ""
            return f"unknown trait {trait!r}{hint}"

        t = c.trigger
        if isinstance(t, DateTrigger):
            typ = profile.get(t.date_trait)
            if typ is None and t.date_trait not in project.traits:
                problem("trigger.date_trait", unknown(t.date_trait))
            elif typ is None or not typ.startswith(DATE_TYPES):
                problem(
                    "trigger.date_trait",
                    f"trait {t.date_trait!r} is not a date (an offset needs a date or "
                    f"timestamp trait such as birthday or first_order_at)",
                )
        if isinstance(t, SegmentEntryTrigger) and t.segment_entry not in project.segments:
            problem(
                "trigger.segment_entry",
                f"unknown segment {t.segment_entry!r} (known: {sorted(project.segments)})",
            )
        for n, s in enumerate(c.steps):
            if isinstance(s, BranchStep) and s.branch.when is not None:
                trait = s.branch.when.trait
                if trait not in profile and trait not in project.traits:
                    problem(f"steps.{n}.branch.when.trait", unknown(trait))
            if isinstance(s, SendStep) and (s.send.template or s.send.subject is not None):
                copy = c.model_copy(
                    update={
                        "template": s.send.template or c.template,
                        "subject": c.subject if s.send.subject is None else s.send.subject,
                    }
                )
                for p in check_templates(copy):
                    problem(f"steps.{n}.send.{p.key or 'template'}", p.message)
    return problems
