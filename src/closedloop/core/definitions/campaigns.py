"""Campaign definitions (``campaigns/*.yaml``): one-shot campaigns and journeys.

A campaign without ``trigger`` runs once per occasion when asked (``campaign run``). With a
``trigger`` it is a *journey*: the worker (``activate.worker``) enters people when the trigger
fires, subject to the ``entry`` rule, and walks each through ``steps``::

    trigger: {event: Product Added}
    entry: {rule: once_per_occasion}
    steps:
      - id: wait_order
        wait_for: {event: Order Completed, timeout: 2h}
        on_event: done
        on_timeout: remind
      - id: remind
        send: {template: "You left something in your cart"}
      - id: done
        exit: true

A trigger or a step is recognised by its key (``event``, ``segment_entry``, ``date_trait``,
``calendar``, ``schedule``; ``send``, ``wait``, ``wait_for``, ``branch``, ``exit``), as the
condition language recognises its leaves. Checks that need the project (trait names and
types, segments, templates) are in ``activate.journeys.check_journeys``.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from datetime import date as Date
from datetime import time, timedelta
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    Discriminator,
    Field,
    ModelWrapValidatorHandler,
    Tag,
    field_validator,
    model_validator,
)

from closedloop.core.conditions import FieldCondition, PropertyFilter
from closedloop.core.definitions.base import NAME_PATTERN, Definition
from closedloop.core.definitions.policy import Channel, ContactPolicy
from closedloop.core.definitions.variants import Variant, check_weights

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any) -> timedelta:
    """``"90s"``, ``"30m"``, ``"2h"``, ``"3d"``, ``"1w"`` or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    else:
        raise ValueError(f"expected a duration such as 30m, 2h, 3d or 1w, got {value!r}")
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, got {value!r}")
    return timedelta(seconds=seconds)


def _clock(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        raise ValueError('write times of day in quotes, e.g. "10:00" (bare 10:00 is a number)')
    return v


# The step ids of the campaign being validated, so that each step target is checked where it
# is written (file:line [steps.2.on_timeout]) rather than once for the whole list.
_STEP_IDS: ContextVar[list[str] | None] = ContextVar("step_ids", default=None)


def _target(v: str | None) -> str | None:
    ids = _STEP_IDS.get()
    if v is not None and ids is not None and v not in ids:
        raise ValueError(f"unknown step {v!r} (steps: {', '.join(ids)})")
    return v


# ---- goals and offers ---------------------------------------------------------------------
class Goal(Definition):
    event: str = "Order Completed"
    window_days: int = Field(14, ge=1, le=365)


class Offer(Definition):
    code: str
    description: str
    conditions: str = Field(description="the offer's terms, stated in every message")
    expires_days: int = Field(14, ge=1)


# ---- triggers -----------------------------------------------------------------------------
class EventTrigger(Definition):
    """An event arrives (``Product Added``, ``Order Completed`` with ``order_number: 1`` ...)."""

    kind: ClassVar[str] = "event"

    event: str = Field(min_length=1)
    where: list[PropertyFilter] = Field(default_factory=list)


class SegmentEntryTrigger(Definition):
    """A person enters a segment (a new stay in ``segment_membership``)."""

    kind: ClassVar[str] = "segment_entry"

    segment_entry: str = Field(pattern=NAME_PATTERN)


class DateTrigger(Definition):
    """A date trait (birthday, membership date) plus ``offset_days``, at ``at`` local time.

    ``yearly`` fires on every anniversary (29 February falls on 28 February in other years);
    otherwise once, on the date itself.
    """

    kind: ClassVar[str] = "date_trait"

    date_trait: str = Field(min_length=1)
    offset_days: int = Field(0, ge=-366, le=366)
    yearly: bool = True
    at: time = time(10, 0)

    _t = field_validator("at", mode="before")(_clock)


class Moment(StrEnum):
    """Calendar moments: shopping festivals, lunar festivals, the brand's own anniversary."""

    M618 = "618"
    DOUBLE_11 = "double_11"
    DOUBLE_12 = "double_12"
    SPRING_FESTIVAL = "spring_festival"
    LANTERN = "lantern"
    DRAGON_BOAT = "dragon_boat"
    QIXI = "qixi"
    MID_AUTUMN = "mid_autumn"
    BRAND_ANNIVERSARY = "brand_anniversary"


class Phase(Definition):
    """A phase of a moment (pre-heat, deposit, final payment): days relative to the day."""

    name: str = Field(pattern=NAME_PATTERN)
    offset_days: int = Field(0, ge=-60, le=60)


class CalendarTrigger(Definition):
    """A calendar moment; entry at the first phase, later phases are ``wait: {until_phase}``."""

    kind: ClassVar[str] = "calendar"

    calendar: Moment
    date: Date | None = Field(None, description="brand_anniversary only: the founding date")
    phases: list[Phase] = Field(default_factory=lambda: [Phase(name="day")], min_length=1)
    at: time = time(10, 0)

    _t = field_validator("at", mode="before")(_clock)

    @field_validator("calendar", mode="before")
    @classmethod
    def _number(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _check(self) -> CalendarTrigger:
        if (self.calendar is Moment.BRAND_ANNIVERSARY) != (self.date is not None):
            raise ValueError("`date` is needed by brand_anniversary, and only by it")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique: {names}")
        offsets = [p.offset_days for p in self.phases]
        if offsets != sorted(offsets):
            raise ValueError("phases must be listed in time order (offset_days ascending)")
        return self


class Every(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


class Schedule(Definition):
    every: Every
    at: time = time(10, 0)
    weekday: int | None = Field(None, ge=0, le=6, description="0 = Monday (every: week)")
    day: int | None = Field(None, ge=1, le=28, description="day of month (every: month)")

    _t = field_validator("at", mode="before")(_clock)

    @model_validator(mode="after")
    def _check(self) -> Schedule:
        if (self.every is Every.WEEK) != (self.weekday is not None):
            raise ValueError("`weekday` is needed by every: week, and only by it")
        if (self.every is Every.MONTH) != (self.day is not None):
            raise ValueError("`day` is needed by every: month, and only by it")
        return self


class ScheduleTrigger(Definition):
    """A recurring schedule in each person's local time (every day / week / month at ``at``)."""

    kind: ClassVar[str] = "schedule"

    schedule: Schedule


def _tag(member: Any) -> Tag:
    """A union member's tag: its kind key in brackets, so that error locations
    (``steps.0.<wait_for>.on_timeout``) never mistake it for a key."""
    return Tag(f"<{member.kind}>")


def _by_key(what: str, *members: Any) -> Discriminator:
    """The one discriminator of a union recognised by key, as the condition language
    recognises its leaves (triggers and steps): the member whose ``kind`` key the mapping
    holds — exactly one of them, else an error naming the keys."""
    keys = tuple(m.kind for m in members)

    def kind(data: Any) -> str | None:
        if isinstance(data, dict):
            found = [k for k in keys if k in data]
            return f"<{found[0]}>" if len(found) == 1 else None
        kind = getattr(type(data), "kind", None)
        return None if kind is None else f"<{kind}>"

    return Discriminator(
        kind,
        custom_error_type=f"{what}_kind",
        custom_error_message=f"a {what} needs exactly one of: " + ", ".join(keys),
    )


Trigger = Annotated[
    Annotated[EventTrigger, _tag(EventTrigger)]
    | Annotated[SegmentEntryTrigger, _tag(SegmentEntryTrigger)]
    | Annotated[DateTrigger, _tag(DateTrigger)]
    | Annotated[CalendarTrigger, _tag(CalendarTrigger)]
    | Annotated[ScheduleTrigger, _tag(ScheduleTrigger)],
    _by_key(
        "trigger", EventTrigger, SegmentEntryTrigger, DateTrigger, CalendarTrigger, ScheduleTrigger
    ),
]


# ---- entry rules --------------------------------------------------------------------------
class EntryRule(StrEnum):
    ONCE = "once"  # once in a lifetime
    ONCE_PER_OCCASION = "once_per_occasion"  # once per birthday, per Double 11, per day ...
    COOLDOWN = "cooldown"  # again once `cooldown` has passed since the last entry


class Entry(Definition):
    rule: EntryRule = EntryRule.ONCE_PER_OCCASION
    cooldown: timedelta | None = None

    _d = field_validator("cooldown", mode="before")(
        lambda v: None if v is None else parse_duration(v)
    )

    @model_validator(mode="after")
    def _check(self) -> Entry:
        if (self.rule is EntryRule.COOLDOWN) != (self.cooldown is not None):
            raise ValueError("`cooldown` is needed by rule: cooldown, and only by it")
        return self


# ---- steps --------------------------------------------------------------------------------
class SendSpec(Definition):
    """A message; keys left out are the campaign's (channel, subject, template, offer)."""

    channel: Channel | None = None
    subject: str | None = None
    template: str | None = Field(None, min_length=1)


class WaitSpec(Definition):
    duration: timedelta | None = None
    until_phase: str | None = None

    _d = field_validator("duration", mode="before")(
        lambda v: None if v is None else parse_duration(v)
    )

    @model_validator(mode="after")
    def _check(self) -> WaitSpec:
        if (self.duration is None) == (self.until_phase is None):
            raise ValueError("a wait needs exactly one of `duration` or `until_phase`")
        return self


class WaitForSpec(Definition):
    event: str = Field(min_length=1)
    where: list[PropertyFilter] = Field(default_factory=list)
    timeout: timedelta | None = Field(None, validate_default=True)

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> timedelta:
        if v is None:
            raise ValueError(
                "wait_for needs a `timeout` (e.g. 2h): a journey must not wait forever"
            )
        return parse_duration(v)


class EventTest(Definition):
    """Did the person do ``event`` (with these properties) since entering the journey?"""

    event: str = Field(min_length=1)
    where: list[PropertyFilter] = Field(default_factory=list)


class VariantArm(Definition):
    name: str = Field(pattern=NAME_PATTERN)
    weight: float = Field(1.0, gt=0)
    next: str

    _n = field_validator("next")(_target)


class BranchSpec(Definition):
    """One of: ``when`` (a trait condition), ``event`` (done since entry), ``variants``.

    ``then``/``else`` name the steps for a trait or event test; each variant names its own.
    A variant is drawn by a stable hash of (campaign, step, person), so it survives restarts.
    """

    when: FieldCondition | None = None
    event: EventTest | None = None
    variants: list[VariantArm] | None = None
    then: str | None = None
    else_: str | None = Field(None, alias="else")

    _n = field_validator("then", "else_")(_target)

    @model_validator(mode="after")
    def _check(self) -> BranchSpec:
        given = [k for k in ("when", "event", "variants") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "a branch needs exactly one of `when` (a trait), `event` or `variants`"
            )
        if self.variants is not None:
            if self.then is not None or self.else_ is not None:
                raise ValueError("a variant branch names its targets per variant, not then/else")
            names = [v.name for v in self.variants]
            if len(names) < 2 or len(set(names)) != len(names):
                raise ValueError("a variant branch needs two or more uniquely named variants")
        elif self.then is None or self.else_ is None:
            raise ValueError("a trait or event branch needs both `then` and `else`")
        return self

    def targets(self) -> list[tuple[str, str]]:
        """(key, step id) of every step this branch may go to."""
        if self.variants is not None:
            return [(f"variants.{i}.next", v.next) for i, v in enumerate(self.variants)]
        return [("then", str(self.then)), ("else", str(self.else_))]


class SendStep(Definition):
    kind: ClassVar[str] = "send"
    id: str = Field(pattern=NAME_PATTERN)
    send: SendSpec
    next: str | None = None

    _n = field_validator("next")(_target)


class WaitStep(Definition):
    kind: ClassVar[str] = "wait"
    id: str = Field(pattern=NAME_PATTERN)
    wait: WaitSpec
    next: str | None = None

    _n = field_validator("next")(_target)

    @field_validator("wait", mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        return v if isinstance(v, dict) else {"duration": v}


class WaitForStep(Definition):
    kind: ClassVar[str] = "wait_for"
    id: str = Field(pattern=NAME_PATTERN)
    wait_for: WaitForSpec
    on_event: str | None = None
    on_timeout: str | None = None

    _n = field_validator("on_event", "on_timeout")(_target)


class BranchStep(Definition):
    kind: ClassVar[str] = "branch"
    id: str = Field(pattern=NAME_PATTERN)
    branch: BranchSpec


class ExitStep(Definition):
    kind: ClassVar[str] = "exit"
    id: str = Field(pattern=NAME_PATTERN)
    exit: Literal[True] = True


Step = Annotated[
    Annotated[SendStep, _tag(SendStep)]
    | Annotated[WaitStep, _tag(WaitStep)]
    | Annotated[WaitForStep, _tag(WaitForStep)]
    | Annotated[BranchStep, _tag(BranchStep)]
    | Annotated[ExitStep, _tag(ExitStep)],
    _by_key("step", SendStep, WaitForStep, WaitStep, BranchStep, ExitStep),
]


def step_targets(step: Any) -> list[tuple[str, str | None]]:
    """(key, target) of each way out of ``step``; None = the next step in the list."""
    if isinstance(step, SendStep | WaitStep):
        return [("next", step.next)]
    if isinstance(step, WaitForStep):
        return [("on_event", step.on_event), ("on_timeout", step.on_timeout)]
    if isinstance(step, BranchStep):
        return [(f"branch.{k}", t) for k, t in step.branch.targets()]
    return []


# ---- the campaign -------------------------------------------------------------------------
class Arbitration(StrEnum):
    """How a person who qualifies for several campaigns the same day is given to one."""

    PRIORITY = "priority"  # the highest priority wins (then the name)
    VALUE = "value"  # the highest expected value wins; priority when scores are missing


class CampaignDef(Definition):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    audience: str = Field(description="segment name")
    channel: Channel = Channel.EMAIL
    holdout: float = Field(0.2, gt=0.0, le=0.5, description="share held out as control")
    subject: str = ""
    template: str = Field("", description="Jinja2 (sandboxed) message body (or `variants`)")
    offer: Offer | None = None
    goal: Goal = Field(default_factory=lambda: Goal())
    priority: int = 0
    policy: ContactPolicy | None = Field(
        None, description="keys given here override the project's contact_policy"
    )
    trigger: Trigger | None = Field(None, description="absent: a one-shot campaign")
    entry: Entry = Field(default_factory=lambda: Entry())
    steps: list[Step] = Field(
        default_factory=list, description="absent with a trigger: one send of the template"
    )
    variants: list[Variant] = Field(
        default_factory=list,
        description="A/B/n versions of the message (each its own subject and template)",
    )
    fallback_subject: str = Field(
        "", description="subject of the non-personalised version (default: none)"
    )
    fallback_template: str | None = Field(
        None,
        min_length=1,
        description="the non-personalised version, for people who refused personalisation",
    )
    recommend: int = Field(3, ge=1, le=20, description="products in `recommended` (templates)")
    arbitration: Arbitration | None = Field(
        None,
        description="compete with the project's other arbitrating campaigns for each person: "
        "by priority, or by expected value (value_model score x value_per_conversion)",
    )
    value_model: str | None = Field(None, min_length=1, description="a model in model_scores")
    value_per_conversion: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check_value(self) -> CampaignDef:
        if (self.value_model is None) != (self.value_per_conversion is None):
            raise ValueError("`value_model` and `value_per_conversion` go together")
        if self.arbitration is Arbitration.VALUE and self.value_model is None:
            raise ValueError(
                "arbitration: value needs `value_model` (a model in model_scores: the "
                "chance to convert) and `value_per_conversion`"
            )
        return self

    @model_validator(mode="after")
    def _check_variants(self) -> CampaignDef:
        if self.variants:
            check_weights(self.variants)
            if self.template or self.subject:
                raise ValueError(
                    "with `variants`, each variant has its own subject and template: "
                    "remove the campaign's `subject`/`template`"
                )
        elif not self.template:
            raise ValueError("a campaign needs a `template` (or `variants`)")
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _step_ids(cls, data: Any, handler: ModelWrapValidatorHandler[CampaignDef]) -> CampaignDef:
        steps = data.get("steps") if isinstance(data, dict) else None
        ids = None
        if isinstance(steps, list):
            ids = [s["id"] for s in steps if isinstance(s, dict) and isinstance(s.get("id"), str)]
        token = _STEP_IDS.set(ids)
        try:
            return handler(data)
        finally:
            _STEP_IDS.reset(token)

    @field_validator("steps")
    @classmethod
    def _targets(cls, steps: list[Any]) -> list[Any]:
        ids = [s.id for s in steps]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"step ids must be unique; repeated: {dupes}")
        for i, s in enumerate(steps):
            for key, target in step_targets(s):
                if target is not None and target not in ids:
                    raise ValueError(
                        f"step {i} ({s.id}) [{key}]: unknown step {target!r} (steps: {ids})"
                    )
        return steps

    @model_validator(mode="after")
    def _journey(self) -> CampaignDef:
        if self.steps and self.trigger is None:
            raise ValueError("steps need a `trigger` (a campaign without one runs once)")
        if isinstance(self.trigger, CalendarTrigger):
            phases = {p.name for p in self.trigger.phases}
            for s in self.steps:
                up = s.wait.until_phase if isinstance(s, WaitStep) else None
                if up is not None and up not in phases:
                    raise ValueError(
                        f"step {s.id}: unknown phase {up!r} (phases: {sorted(phases)})"
                    )
        else:
            for s in self.steps:
                if isinstance(s, WaitStep) and s.wait.until_phase is not None:
                    raise ValueError(f"step {s.id}: until_phase needs a calendar trigger")
        return self

    @property
    def journey(self) -> list[Any]:
        """The steps to walk: those given, or a single send of the campaign's own message."""
        return list(self.steps) or [SendStep(id="send", send=SendSpec())]
