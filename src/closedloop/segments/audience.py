"""Segments: conditions over the portrait, tags, traits, events and other segments.

A segment is evaluated against ``profiles`` joined with one column per tag and computed
trait, plus one derived column per event or segment leaf (``segments.derived``). Membership is
stored as stays (entered_at, exited_at), so later stages can trigger on entry and history is
never overwritten: re-evaluating closes the stays of those who left and opens stays for those
who came in; everyone else is untouched.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from datetime import datetime

import ibis
import ibis.expr.datatypes as dt
import ibis.expr.types as ir

from closedloop.core.clock import Clock
from closedloop.core.conditions import (
    AllOf,
    AnyOf,
    Condition,
    EventCondition,
    FieldCondition,
    NotOf,
    SegmentRef,
    SequenceCondition,
    compile_condition,
    leaves,
)
from closedloop.core.definitions import SegmentDef
from closedloop.core.engine import Engine
from closedloop.core.errors import Problem
from closedloop.portrait.tables import PROFILES
from closedloop.segments import tables as _tables  # noqa: F401  (declares segment_membership)
from closedloop.segments.derived import with_derived

TS = "timestamp('UTC', 6)"


@dataclass(frozen=True)
class SegmentResult:
    name: str
    size: int
    entered: int
    exited: int


@dataclass(frozen=True)
class Fields:
    """The fields a condition may use beyond the built-in profile: tags and computed traits."""

    tags: tuple[str, ...] = ()
    traits: tuple[tuple[str, str], ...] = ()  # (name, "float64" | "string")
    segments: tuple[str, ...] = ()  # segments that `in_segment` may name

    def types(self) -> dict[str, dt.DataType]:
        types = {c: dt.dtype(typ) for c, typ in PROFILES.columns.items()}
        types.update({n: dt.string for n in self.tags})
        types.update({n: dt.dtype(typ) for n, typ in self.traits})
        return types


def audience_table(engine: Engine, fields: Fields) -> ir.Table:
    """``profiles`` with one column per tag and per computed trait (null where absent)."""
    t = engine.table("profiles")
    if fields.tags:
        tv = engine.table("tag_values")
        tags = tv.group_by("customer_id").aggregate(
            **{name: tv.value.max(where=tv.tag == name) for name in fields.tags}
        )
        t = t.left_join(tags, "customer_id").drop("customer_id_right")
    if fields.traits:
        ct = engine.table("computed_traits")
        traits = ct.group_by("customer_id").aggregate(
            **{
                name: (ct.number_value if typ == "float64" else ct.text_value).max(
                    where=ct.trait == name
                )
                for name, typ in fields.traits
            }
        )
        t = t.left_join(traits, "customer_id").drop("customer_id_right")
    return t


def check_segment(seg: SegmentDef, fields: Fields) -> list[Problem]:
    """Unknown fields and values of the wrong type, each pointing at the offending clause."""
    types = fields.types()
    where = f"segments/{seg.name}.yaml"
    problems: list[Problem] = []

    def walk(c: Condition, path: str) -> None:
        if isinstance(c, AllOf):
            for i, x in enumerate(c.all):
                walk(x, f"{path}.all.{i}")
        elif isinstance(c, AnyOf):
            for i, x in enumerate(c.any):
                walk(x, f"{path}.any.{i}")
        elif isinstance(c, NotOf):
            walk(c.not_, f"{path}.not")
        elif isinstance(c, SegmentRef):
            if c.in_segment == seg.name or c.in_segment not in fields.segments:
                known = ", ".join(s for s in fields.segments if s != seg.name)
                problems.append(
                    Problem(
                        where,
                        f"in_segment {c.in_segment!r} is not another segment (known: {known})",
                        key=f"{path}.in_segment",
                    )
                )
        elif isinstance(c, EventCondition):
            for i, f in enumerate(c.where):
                if f.op.value in ("gt", "gte", "lt", "lte", "between") and isinstance(
                    f.value, bool
                ):
                    problems.append(
                        Problem(where, "ordering needs a number or text", key=f"{path}.where.{i}")
                    )
        elif isinstance(c, SequenceCondition):
            for k, step in enumerate(c.sequence):
                for i, f in enumerate(step.where):
                    if f.op.value in ("gt", "gte", "lt", "lte", "between") and isinstance(
                        f.value, bool
                    ):
                        key = f"{path}.sequence.{k}.where.{i}"
                        problems.append(Problem(where, "ordering needs a number or text", key=key))
        else:
            problems.extend(_check_field(c, types, where, path))

    walk(seg.where, "where")
    return problems


def _check_field(
    c: FieldCondition, types: dict[str, dt.DataType], where: str, path: str
) -> list[Problem]:
    if c.trait not in types:
        close = difflib.get_close_matches(c.trait, list(types), n=3)
        hint = f" (did you mean {' or '.join(repr(x) for x in close)}?)" if close else ""
        return [Problem(where, f"unknown field {c.trait!r}{hint}", key=f"{path}.trait")]
    typ = types[c.trait]
    values = c.value if isinstance(c.value, list) else [c.value]
    for v in values:
        if v is None:
            continue
        ok = (
            (typ.is_numeric() and isinstance(v, int | float) and not isinstance(v, bool))
            or (typ.is_string() and isinstance(v, str))
            or (typ.is_boolean() and isinstance(v, bool))
            or ((typ.is_timestamp() or typ.is_date()) and not isinstance(v, bool | int | float))
        )
        if not ok:
            return [
                Problem(
                    where,
                    f"field {c.trait!r} is {typ}, but the value {v!r} is {type(v).__name__}",
                    key=f"{path}.value",
                )
            ]
    return []


def segment_dependencies(seg: SegmentDef) -> set[str]:
    """The segments whose membership this segment reads (evaluate those first)."""
    return {c.in_segment for c in leaves(seg.where) if isinstance(c, SegmentRef)}


def members_expr(engine: Engine, seg: SegmentDef, fields: Fields, as_of: datetime) -> ir.Table:
    t = with_derived(engine, audience_table(engine, fields), seg.where, as_of)
    return t.filter(compile_condition(seg.where, t)).select("customer_id")


def evaluate_segment(
    engine: Engine, seg: SegmentDef, fields: Fields, clock: Clock | None = None
) -> SegmentResult:
    """Re-evaluate one segment and record entries and exits in ``segment_membership``."""
    as_of = (clock or Clock()).now()
    now = ibis.literal(as_of).cast(TS)
    current = engine.scratch("seg_current", members_expr(engine, seg, fields, as_of))
    m = engine.table("segment_membership")
    others = m.filter(m.segment != seg.name)
    mine = m.filter(m.segment == seg.name)
    open_ = mine.filter(mine.exited_at.isnull())
    closed = mine.filter(mine.exited_at.notnull())
    stay = open_.filter(open_.customer_id.isin(current.customer_id))
    leaving = open_.filter(~open_.customer_id.isin(current.customer_id)).mutate(exited_at=now)
    arriving = current.filter(~current.customer_id.isin(open_.customer_id)).select(
        segment=ibis.literal(seg.name),
        customer_id="customer_id",
        entered_at=now,
        exited_at=ibis.null(TS),
    )
    entered = int(arriving.count().execute())
    exited = int(leaving.count().execute())
    size = int(current.count().execute())
    if entered or exited:
        new = others.union(closed, distinct=False).union(stay, distinct=False)
        new = new.union(leaving, distinct=False).union(arriving, distinct=False)
        engine.replace("segment_membership", engine.scratch("seg_new", new))
    return SegmentResult(seg.name, size, entered, exited)


def current_members(engine: Engine, segment: str) -> ir.Table:
    m = engine.table("segment_membership")
    return m.filter((m.segment == segment) & m.exited_at.isnull()).select(
        "customer_id", "entered_at"
    )


def qualifying_columns(seg: SegmentDef, fields: Fields) -> dict[str, str]:
    """Readable label → column, for the fields that explain why a member qualified."""
    out: dict[str, str] = {}
    known = fields.types()
    for leaf in leaves(seg.where):
        if isinstance(leaf, FieldCondition):
            if leaf.trait in known:
                out.setdefault(leaf.trait, leaf.trait)
            continue
        if isinstance(leaf, EventCondition):
            window = f" in {leaf.within_days}d" if leaf.within_days else ""
            label = f"{leaf.event} count{window}"
        elif isinstance(leaf, SequenceCondition):
            steps = [("not " if s.absent else "") + s.event for s in leaf.sequence]
            label = " then ".join(steps) + f" within {leaf.within}"
        else:
            label = f"in {leaf.in_segment}"
        while label in out and out[label] != leaf.derived_column:
            label += "'"
        out[label] = leaf.derived_column
    return out


def preview_expr(engine: Engine, seg: SegmentDef, fields: Fields, as_of: datetime) -> ir.Table:
    """Members as of ``as_of`` with the fields that qualified them — without writing anything."""
    t = with_derived(engine, audience_table(engine, fields), seg.where, as_of)
    members = t.filter(compile_condition(seg.where, t))
    shown = {label: members[col] for label, col in qualifying_columns(seg, fields).items()}
    return members.select("customer_id", **shown).order_by("customer_id")
