"""The condition language: nested all / any / not over profile fields, events and segments.

Shared by tags (rule tags) and segments (audiences), so it lives in core. A condition is a
tree of pydantic models; ``compile_condition`` turns it into an Ibis boolean expression with
the user's values bound as literals — never pasted into SQL text. ``evaluate_python`` gives
the same answer on a plain dict, which the property tests use as the reference.

Leaves:

* ``{trait: F, op: OP, value: V}`` — a profile field, tag or computed trait;
* ``{event: NAME, where: [...], count: {op: gte, value: 2}, within_days: 30}`` — "did NAME
  (with these properties) at least / at most / exactly N times in the last D days or between
  two dates";
* ``{sequence: [{event: A}, {event: B, where: [...]}], within: 2h}`` — "did A then B (then
  ...) within T", optionally only in the last D days or between dates; a last step with
  ``absent: true`` reads "A then *not* B within T";
* ``{in_segment: NAME}`` — membership of another segment;
* ``{contacts: {role: [...], where: [...], did: {event: ...}}, count: {op: gte, value: 1}}`` —
  in segments ``of: accounts`` only: how many of the account's contacts have one of the
  roles, match the profile filters and did the event (``ContactsCondition``).

Event, sequence and segment leaves are *derived columns*: core only names them
(``derived_column``); the segments stage computes them (a count per customer, a membership
flag) and joins them onto the table before compiling, so core never reads events itself.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import date, datetime, time, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:  # Ibis is imported where conditions are compiled, not where they are read:
    import ibis.expr.types as ir  # the collector's workers load definitions but never compile.

Scalar = str | int | float | bool | date | datetime


class Op(StrEnum):
    EQ = "eq"
    NE = "ne"
    GT = "gt"
    GTE = "gte"
    LT = "lt"
    LTE = "lte"
    IN = "in"
    NOT_IN = "not_in"
    IS_NULL = "is_null"
    NOT_NULL = "not_null"
    CONTAINS = "contains"
    BETWEEN = "between"


# Friendly spellings accepted in YAML.
OP_ALIASES = {
    "=": "eq",
    "==": "eq",
    "!=": "ne",
    ">": "gt",
    ">=": "gte",
    "<": "lt",
    "<=": "lte",
}

_NO_VALUE = {Op.IS_NULL, Op.NOT_NULL}
_LIST_VALUE = {Op.IN, Op.NOT_IN}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Compared(_Strict):
    """A leaf with an operator: accepts the friendly spellings (``>=``, ``!=`` ...)."""

    @model_validator(mode="before")
    @classmethod
    def _alias_op(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("op"), str):
            data = {**data, "op": OP_ALIASES.get(data["op"], data["op"])}
        return data


class FieldCondition(_Compared):
    """``{trait: NAME, op: OP, value: V}`` — compare one profile field (a trait or a tag)."""

    trait: str = Field(min_length=1)
    op: Op
    value: Scalar | list[Scalar] | None = None

    @model_validator(mode="after")
    def _check_value(self) -> FieldCondition:
        if self.op in _NO_VALUE:
            if self.value is not None:
                raise ValueError(f"op {self.op.value!r} takes no value")
        elif self.op in _LIST_VALUE:
            if not isinstance(self.value, list) or not self.value:
                raise ValueError(f"op {self.op.value!r} needs a non-empty list as value")
        elif self.op is Op.BETWEEN:
            if not isinstance(self.value, list) or len(self.value) != 2:
                raise ValueError("op 'between' needs a list of two values [low, high]")
        elif self.value is None or isinstance(self.value, list):
            raise ValueError(f"op {self.op.value!r} needs a single value")
        return self


class CountOp(StrEnum):
    GTE = "gte"
    LTE = "lte"
    EQ = "eq"


class CountBound(_Strict):
    """How many matching events: at least (gte), at most (lte) or exactly (eq) ``value``."""

    op: CountOp = CountOp.GTE
    value: int = Field(1, ge=0)


class PropertyFilter(_Compared):
    """``{property: P, op: OP, value: V}`` on an event (promoted column or ``properties.P``)."""

    property: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    op: Op
    value: Scalar | list[Scalar] | None = None

    @model_validator(mode="after")
    def _check_value(self) -> PropertyFilter:
        FieldCondition(trait=self.property, op=self.op, value=self.value)
        return self

    def as_field(self, column: str) -> FieldCondition:
        return FieldCondition(trait=column, op=self.op, value=self.value)


class EventCondition(_Strict):
    """Did the customer do EVENT (matching ``where``) N times within a window?"""

    event: str = Field(min_length=1)
    where: list[PropertyFilter] = Field(default_factory=list)
    count: CountBound = Field(default_factory=lambda: CountBound())
    within_days: int | None = Field(None, ge=1)
    between: tuple[date, date] | None = None

    @model_validator(mode="after")
    def _check_window(self) -> EventCondition:
        if self.within_days is not None and self.between is not None:
            raise ValueError("use either `within_days` or `between`, not both")
        if self.between is not None and self.between[0] > self.between[1]:
            raise ValueError("`between` needs [first day, last day] in order")
        return self

    @property
    def derived_column(self) -> str:
        """The column (a count per customer) the segments stage provides for this leaf."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return "__event_" + hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


_DURATION = re.compile(r"(\d+)\s*(d|h|m|s)")
_UNIT = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


def parse_duration(value: Any) -> Any:
    """``"30m"``, ``"2h"``, ``"7d"``, ``"1d 12h"`` → timedelta; a bare number is refused.

    A bare ``within: 7`` could mean seconds or days, so it must carry a unit. ISO 8601
    (``PT2H``) and timedelta values pass through to pydantic unchanged.
    """
    if isinstance(value, int | float):  # bool is an int too
        raise ValueError("a duration needs a unit, such as 30m, 2h or 7d")
    if not isinstance(value, str) or value.startswith(("P", "-P")):
        return value
    text = value.strip().lower()
    parts = _DURATION.findall(text)
    if not parts or _DURATION.sub("", text).strip():
        raise ValueError(f"{value!r} is not a duration such as 90s, 30m, 2h, 7d or 1d 12h")
    total = timedelta()
    for amount, unit in parts:
        total += timedelta(**{_UNIT[unit]: int(amount)})
    return total


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


class SequenceStep(_Strict):
    """One step of a sequence: an event (with property filters); ``absent`` = must not happen."""

    event: str = Field(min_length=1)
    where: list[PropertyFilter] = Field(default_factory=list)
    absent: bool = False


class SequenceCondition(_Strict):
    """Did the customer do step 1, then step 2 (then ...), the whole chain within ``within``?

    "Then" is strict: each step's event is later than the previous step's (an event at the
    same instant does not follow). Steps may name the same event. The positive steps must all
    fall in the look-back window (``within_days`` / ``between``, as for event leaves). A last
    step marked ``absent`` reads "... then not B within T": after the last positive step, no B
    for ``within``, and that much time has passed by now (an open window is not yet a match).
    """

    sequence: list[SequenceStep] = Field(min_length=2)
    within: Duration
    within_days: int | None = Field(None, ge=1)
    between: tuple[date, date] | None = None

    @field_validator("sequence")
    @classmethod
    def _absent_last(cls, steps: list[SequenceStep]) -> list[SequenceStep]:
        for i, step in enumerate(steps[:-1]):
            if step.absent:
                raise ValueError(
                    f"sequence step {i + 1} ({step.event!r}) is absent: only the last step may be"
                )
        return steps

    @field_validator("within")
    @classmethod
    def _positive(cls, within: timedelta) -> timedelta:
        if within <= timedelta(0):
            raise ValueError("`within` must be a positive duration")
        return within

    @model_validator(mode="after")
    def _check(self) -> SequenceCondition:
        if self.within_days is not None and self.between is not None:
            raise ValueError("use either `within_days` or `between`, not both")
        if self.between is not None and self.between[0] > self.between[1]:
            raise ValueError("`between` needs [first day, last day] in order")
        return self

    @property
    def positive(self) -> list[SequenceStep]:
        return [s for s in self.sequence if not s.absent]

    @property
    def absent_step(self) -> SequenceStep | None:
        return self.sequence[-1] if self.sequence[-1].absent else None

    @property
    def derived_column(self) -> str:
        """The column (true where the customer did the sequence) the segments stage provides."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return "__seq_" + hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def window_bounds(
    within_days: int | None, between: tuple[date, date] | None, as_of: datetime
) -> tuple[datetime | None, datetime | None]:
    """(exclusive start, exclusive end) of a look-back window; None = open on that side.

    ``within_days`` is (as_of - D, as_of]; ``between`` is whole days in as_of's time zone.
    """
    if within_days is not None:
        return as_of - timedelta(days=within_days), None
    if between is not None:
        first, last = between
        start = datetime.combine(first, time.min, tzinfo=as_of.tzinfo) - timedelta(microseconds=1)
        end = datetime.combine(last + timedelta(days=1), time.min, tzinfo=as_of.tzinfo)
        return start, end
    return None, None


def _step_matches(step: SequenceStep, event: Mapping[str, Any]) -> bool:
    if event.get("event") != step.event:
        return False
    return all(evaluate_python(f.as_field(f.property), event) for f in step.where)


def sequence_matches(
    seq: SequenceCondition, events: Iterable[Mapping[str, Any]], as_of: datetime
) -> bool:
    """The plain-Python reference for one customer's events (dicts with ``event``,
    ``timestamp`` and the filtered properties): tries every chain, so keep inputs small."""
    evs = [e for e in events if e["timestamp"] <= as_of]
    lo, hi = window_bounds(seq.within_days, seq.between, as_of)
    in_window = [
        e
        for e in evs
        if (lo is None or e["timestamp"] > lo) and (hi is None or e["timestamp"] < hi)
    ]
    times = [
        sorted({e["timestamp"] for e in in_window if _step_matches(s, e)}) for s in seq.positive
    ]
    absent = seq.absent_step
    gone = [] if absent is None else [e["timestamp"] for e in evs if _step_matches(absent, e)]
    for chain in itertools.product(*times):
        if any(b <= a for a, b in itertools.pairwise(chain)):
            continue
        if chain[-1] - chain[0] > seq.within:
            continue
        if absent is None:
            return True
        end = chain[-1] + seq.within
        if end <= as_of and not any(chain[-1] < t <= end for t in gone):
            return True
    return False


class SegmentRef(_Strict):
    """``{in_segment: NAME}`` — currently a member of segment NAME."""

    in_segment: str = Field(min_length=1)

    @property
    def derived_column(self) -> str:
        return "__segment_" + self.in_segment


ContactRole = Literal["decision_maker", "finance", "it", "user"]


class ContactFilter(_Strict):
    """Which contacts of an account count: by role, profile fields (all must hold), what
    they did (an event leaf evaluated on the contact's own events), and ``in_segment``:
    being a current member of that segment of customers (evaluated before this one)."""

    role: list[ContactRole] | None = Field(None, min_length=1)
    where: list[FieldCondition] = Field(default_factory=list)
    did: EventCondition | None = None
    in_segment: str | None = Field(None, min_length=1)

    @field_validator("role", mode="before")
    @classmethod
    def _one_role(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class ContactsCondition(_Strict):
    """An account has ``count`` (default: at least one) contacts matching ``contacts``."""

    contacts: ContactFilter
    count: CountBound = Field(default_factory=lambda: CountBound())

    @property
    def derived_column(self) -> str:
        """The column (matching contacts per account) the segments stage provides."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return "__contacts_" + hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


class AllOf(_Strict):
    all: list[Condition] = Field(min_length=1)


class AnyOf(_Strict):
    any: list[Condition] = Field(min_length=1)


class NotOf(_Strict):
    not_: Condition = Field(alias="not")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# Union tags are deliberately not key names, so an error location such as
# ('where', 'all', 'all_of', 1, 'field', 'op') can be mapped back to keys in the file.
_TAGS = {
    "all": "all_of",
    "any": "any_of",
    "not": "not_of",
    "trait": "field",
    "event": "did_event",
    "sequence": "did_sequence",
    "in_segment": "segment_ref",
    "contacts": "did_contacts",
}
_TAG_OF_TYPE: dict[type, str] = {
    AllOf: "all_of",
    AnyOf: "any_of",
    NotOf: "not_of",
    FieldCondition: "field",
    EventCondition: "did_event",
    SequenceCondition: "did_sequence",
    SegmentRef: "segment_ref",
    ContactsCondition: "did_contacts",
}


def _kind(data: Any) -> str | None:
    if isinstance(data, dict):
        for key, tag in _TAGS.items():
            if key in data:
                return tag
        return None
    return _TAG_OF_TYPE.get(type(data))


Condition = Annotated[
    Annotated[AllOf, Tag("all_of")]
    | Annotated[AnyOf, Tag("any_of")]
    | Annotated[NotOf, Tag("not_of")]
    | Annotated[FieldCondition, Tag("field")]
    | Annotated[EventCondition, Tag("did_event")]
    | Annotated[SequenceCondition, Tag("did_sequence")]
    | Annotated[SegmentRef, Tag("segment_ref")]
    | Annotated[ContactsCondition, Tag("did_contacts")],
    Discriminator(
        _kind,
        custom_error_type="condition",
        custom_error_message=(
            "a condition needs one of the keys all, any, not, trait, event, sequence or "
            "in_segment (or contacts, in segments of accounts)"
        ),
    ),
]

AllOf.model_rebuild()
AnyOf.model_rebuild()
NotOf.model_rebuild()


Leaf = FieldCondition | EventCondition | SequenceCondition | SegmentRef | ContactsCondition


def leaves(cond: Condition) -> Iterator[Leaf]:
    """Every leaf of a condition tree, depth first."""
    if isinstance(cond, AllOf):
        for c in cond.all:
            yield from leaves(c)
    elif isinstance(cond, AnyOf):
        for c in cond.any:
            yield from leaves(c)
    elif isinstance(cond, NotOf):
        yield from leaves(cond.not_)
    else:
        yield cond


def fields_used(cond: Condition) -> set[str]:
    """Every profile field a condition reads (for validation against the profile schema)."""
    return {c.trait for c in leaves(cond) if isinstance(c, FieldCondition)}


def count_matches(bound: CountBound, n: int) -> bool:
    if bound.op is CountOp.GTE:
        return n >= bound.value
    if bound.op is CountOp.LTE:
        return n <= bound.value
    return n == bound.value


def compile_condition(cond: Condition, table: ir.Table) -> ir.BooleanValue:
    """An Ibis boolean over ``table``'s rows; null comparisons count as false (SQL-style)."""
    if isinstance(cond, AllOf):
        parts = [compile_condition(c, table) for c in cond.all]
        out = parts[0]
        for p in parts[1:]:
            out = out & p
        return out
    if isinstance(cond, AnyOf):
        parts = [compile_condition(c, table) for c in cond.any]
        out = parts[0]
        for p in parts[1:]:
            out = out | p
        return out
    if isinstance(cond, NotOf):
        return ~compile_condition(cond.not_, table)
    if isinstance(cond, EventCondition | ContactsCondition):
        n = table[cond.derived_column].fill_null(0)
        bound = cond.count
        if bound.op is CountOp.GTE:
            return n >= bound.value
        if bound.op is CountOp.LTE:
            return n <= bound.value
        return n == bound.value
    if isinstance(cond, SegmentRef | SequenceCondition):
        return table[cond.derived_column].fill_null(False)
    return _compile_field(cond, table)


def _compile_field(cond: FieldCondition, table: ir.Table) -> ir.BooleanValue:
    import ibis

    col = table[cond.trait]
    v = cond.value
    op = cond.op
    if op is Op.IS_NULL:
        return col.isnull()
    if op is Op.NOT_NULL:
        return col.notnull()
    expr: ir.BooleanValue
    if op is Op.EQ:
        expr = col == ibis.literal(v)
    elif op is Op.NE:
        expr = col != ibis.literal(v)
    elif op is Op.GT:
        expr = col > ibis.literal(v)
    elif op is Op.GTE:
        expr = col >= ibis.literal(v)
    elif op is Op.LT:
        expr = col < ibis.literal(v)
    elif op is Op.LTE:
        expr = col <= ibis.literal(v)
    elif op is Op.IN:
        assert isinstance(v, list)  # noqa: S101 - guaranteed by the model validator
        expr = col.isin([ibis.literal(x) for x in v])
    elif op is Op.NOT_IN:
        assert isinstance(v, list)  # noqa: S101
        expr = ~col.isin([ibis.literal(x) for x in v])
    elif op is Op.BETWEEN:
        assert isinstance(v, list)  # noqa: S101
        expr = (col >= ibis.literal(v[0])) & (col <= ibis.literal(v[1]))
    else:  # CONTAINS
        expr = col.cast("string").contains(ibis.literal(str(v)))
    # Comparisons with null are unknown; unknown is not a match, and NOT(unknown) is not either.
    return expr.fill_null(False)


def evaluate_python(cond: Condition, row: Mapping[str, Any]) -> bool:
    """The same semantics as ``compile_condition`` on one dict; the reference for tests."""
    if isinstance(cond, AllOf):
        return all(evaluate_python(c, row) for c in cond.all)
    if isinstance(cond, AnyOf):
        return any(evaluate_python(c, row) for c in cond.any)
    if isinstance(cond, NotOf):
        return not evaluate_python(cond.not_, row)
    if isinstance(cond, EventCondition | ContactsCondition):
        return count_matches(cond.count, int(row.get(cond.derived_column) or 0))
    if isinstance(cond, SegmentRef | SequenceCondition):
        return bool(row.get(cond.derived_column))
    x = row.get(cond.trait)
    v = cond.value
    op = cond.op
    if op is Op.IS_NULL:
        return x is None
    if op is Op.NOT_NULL:
        return x is not None
    if x is None:
        return False
    if op is Op.EQ:
        return bool(x == v)
    if op is Op.NE:
        return bool(x != v)
    if op is Op.GT:
        return bool(x > v)
    if op is Op.GTE:
        return bool(x >= v)
    if op is Op.LT:
        return bool(x < v)
    if op is Op.LTE:
        return bool(x <= v)
    if op is Op.IN:
        assert isinstance(v, list)  # noqa: S101
        return x in v
    if op is Op.NOT_IN:
        assert isinstance(v, list)  # noqa: S101
        return x not in v
    if op is Op.BETWEEN:
        assert isinstance(v, list)  # noqa: S101
        return bool(v[0] <= x <= v[1])
    return str(v) in str(x)


ConditionKind = Literal["all", "any", "not", "trait"]
