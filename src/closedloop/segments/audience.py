"""Segments: conditions over the portrait, tags, traits, events and other segments.

A segment is evaluated against ``profiles`` joined with one column per tag and computed
trait, plus one derived column per event or segment leaf (``segments.derived``). Membership is
stored as stays (entered_at, exited_at), so later stages can trigger on entry and history is
never overwritten: re-evaluating closes the stays of those who left and opens stays for those
who came in; everyone else is untouched.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping, Sequence
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
    ContactsCondition,
    EventCondition,
    FieldCondition,
    NotOf,
    SegmentRef,
    SequenceCondition,
    compile_condition,
    fields_used,
    leaves,
)
from closedloop.core.definitions import SegmentDef
from closedloop.core.definitions.segments import (
    account_target,
    kind_problem,
    ref_target,
    refs_with_paths,
)
from closedloop.core.engine import Engine
from closedloop.core.errors import DefinitionError, Problem
from closedloop.portrait.tables import PROFILES
from closedloop.segments import tables as _tables  # noqa: F401  (declares segment_membership)
from closedloop.segments.derived import leaf_events, with_derived
from closedloop.tags.values import only

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
    # Which of those select accounts (`of: accounts`); None: not told, so a reference to the
    # other kind cannot be caught at validation (it would select no one).
    account_segments: tuple[str, ...] | None = None

    def types(self) -> dict[str, dt.DataType]:
        types = {c: dt.dtype(typ) for c, typ in PROFILES.columns.items()}
        types.update({n: dt.string for n in self.tags})
        types.update({n: dt.dtype(typ) for n, typ in self.traits})
        return types


def audience_table(
    engine: Engine,
    fields: Fields,
    needed: Collection[str] | None = None,
    customers: ir.Table | None = None,
) -> ir.Table:
    """``profiles`` with one column per tag and per computed trait (null where absent).

    ``needed`` limits those columns to the names given (the fields a condition reads):
    ``tag_values`` holds a row per customer and tag, and pivoting all fifty tags of a
    catalogue over every customer for each segment was most of a segment's time, for
    segments that read one tag or none. ``customers``: only these customers' rows.
    """
    t = only(engine.table("profiles"), customers)
    tag_names = [n for n in fields.tags if needed is None or n in needed]
    traits = [(n, typ) for n, typ in fields.traits if needed is None or n in needed]
    if tag_names:
        tv = only(engine.table("tag_values"), customers)
        if needed is not None:
            tv = tv.filter(tv.tag.isin(tag_names))
        pivot = tv.group_by("customer_id").aggregate(
            **{name: tv.value.max(where=tv.tag == name) for name in tag_names}
        )
        t = t.left_join(pivot, "customer_id").drop("customer_id_right")
    if traits:
        ct = only(engine.table("computed_traits"), customers)
        if needed is not None:
            ct = ct.filter(ct.trait.isin([n for n, _ in traits]))
        wide = ct.group_by("customer_id").aggregate(
            **{
                name: (ct.number_value if typ == "float64" else ct.text_value).max(
                    where=ct.trait == name
                )
                for name, typ in traits
            }
        )
        t = t.left_join(wide, "customer_id").drop("customer_id_right")
    return t


def check_segment(seg: SegmentDef, fields: Fields) -> list[Problem]:
    """Unknown fields and values of the wrong type, each pointing at the offending clause."""
    if seg.of == "accounts":  # B2B: conditions over accounts (segments.accounts)
        from closedloop.segments.accounts import check_account_segment

        return check_account_segment(seg, fields.segments, fields.account_segments)
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
            problems.extend(_check_ref(c, seg, fields, where, path))
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
        elif isinstance(c, ContactsCondition):
            msg = "`contacts` selects accounts: give the segment `of: accounts`"
            problems.append(Problem(where, msg, key=f"{path}.contacts"))
        else:
            problems.extend(_check_field(c, types, where, path))

    walk(seg.where, "where")
    return problems


def _check_ref(
    c: SegmentRef, seg: SegmentDef, fields: Fields, where: str, path: str
) -> list[Problem]:
    """A membership leaf of a customer segment names another segment, of the right kind.

    ``in_segment`` needs a segment of customers; ``account_in_segment`` ("the customer's
    account is in X") a segment of accounts. Naming the other kind would select no one, so
    it is an error that says what to write instead.
    """
    target = account_target(c)
    key = f"{path}.account_in_segment" if target is not None else f"{path}.in_segment"
    name = ref_target(c)
    if name == seg.name or name not in fields.segments:
        known = ", ".join(s for s in fields.segments if s != seg.name)
        verb = "account_in_segment" if target is not None else "in_segment"
        return [Problem(where, f"{verb} {name!r} is not another segment (known: {known})", key=key)]
    accounts = fields.account_segments
    if accounts is None:
        return []
    problem = kind_problem(seg, c, "accounts" if name in accounts else "customers", path)
    return [] if problem is None else [problem]


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
    return {ref_target(c) for c in leaves(seg.where) if isinstance(c, SegmentRef)}


def members_expr(
    engine: Engine,
    seg: SegmentDef,
    fields: Fields,
    as_of: datetime,
    members: Mapping[str, ir.Table] | None = None,
    customers: ir.Table | None = None,
    events: ir.Table | None = None,
) -> ir.Table:
    """The customers in ``seg`` as of ``as_of``: one ``customer_id`` column.

    ``members`` may give other segments' members as evaluated in this run (``in_segment``
    reads them instead of ``segment_membership``). ``customers``: only these are evaluated.
    ``events``: the events its event leaves read, shared with other segments (``leaf_events``).
    """
    audience = audience_table(engine, fields, fields_used(seg.where), customers)
    t = with_derived(engine, audience, seg.where, as_of, members, customers, events)
    return t.filter(compile_condition(seg.where, t)).select("customer_id")


def evaluate_segment(
    engine: Engine, seg: SegmentDef, fields: Fields, clock: Clock | None = None
) -> SegmentResult:
    """Re-evaluate one segment and record entries and exits in ``segment_membership``."""
    return evaluate_segments(engine, [seg], fields, clock)[seg.name]


def evaluate_segments(
    engine: Engine, segs: Sequence[SegmentDef], fields: Fields, clock: Clock | None = None
) -> dict[str, SegmentResult]:
    """Re-evaluate segments (ordered so each follows those it names) in one membership write.

    Each segment's members are materialised once; a later segment's ``in_segment`` reads them
    (the same rows its open stays will hold). Then one diff against the open stays of all of
    them closes the stays of those who left and opens stays for those who came in, and
    ``segment_membership`` is rewritten once — not once per segment, which copied the whole
    table twenty times in a twenty-segment build.
    """
    as_of = (clock or Clock()).now()
    now = ibis.literal(as_of).cast(TS)
    if not segs:
        return {}
    problems = kind_problems(segs)
    if problems:  # before anything is written: such a leaf would select no one
        raise DefinitionError(problems)
    if any(s.of == "accounts" for s in segs):  # B2B: stays by account id (segments.accounts)
        from closedloop.segments.accounts import evaluate_account_segment

        done = {
            s.name: SegmentResult(s.name, *evaluate_account_segment(engine, s, clock))
            for s in segs
            if s.of == "accounts"
        }
        done |= evaluate_segments(engine, [s for s in segs if s.of != "accounts"], fields, clock)
        return {s.name: done[s.name] for s in segs}
    names = [s.name for s in segs]
    current: dict[str, ir.Table] = {}
    events = leaf_events(engine, [s.where for s in segs], as_of)
    for i, seg in enumerate(segs):
        expr = members_expr(engine, seg, fields, as_of, current, events=events)
        current[seg.name] = engine.scratch(f"seg_current_{i}", expr)
    parts = [
        t.select(segment=ibis.literal(n), customer_id=t.customer_id) for n, t in current.items()
    ]
    union = parts[0]
    for p in parts[1:]:
        union = union.union(p, distinct=False)
    now_in = engine.scratch("seg_now_in", union)
    keys = ["segment", "customer_id"]
    m = engine.table("segment_membership")
    others = m.filter(~m.segment.isin(names))
    mine = m.filter(m.segment.isin(names))
    open_ = mine.filter(mine.exited_at.isnull())
    closed = mine.filter(mine.exited_at.notnull())
    stay = open_.semi_join(now_in, keys)
    leaving = open_.anti_join(now_in, keys).mutate(exited_at=now)
    arriving = now_in.anti_join(open_, keys).select(
        "segment", "customer_id", entered_at=now, exited_at=ibis.null(TS)
    )
    size, entered, exited = _per_segment(now_in), _per_segment(arriving), _per_segment(leaving)
    results = {
        n: SegmentResult(n, size.get(n, 0), entered.get(n, 0), exited.get(n, 0)) for n in names
    }
    if any(r.entered or r.exited for r in results.values()):
        new = others.union(closed, distinct=False).union(stay, distinct=False)
        new = new.union(leaving, distinct=False).union(arriving, distinct=False)
        engine.replace("segment_membership", engine.scratch("seg_new", new))
    return results


def kind_problems(segs: Sequence[SegmentDef]) -> list[Problem]:
    """Membership leaves naming a segment of the other kind, among the segments given.

    ``check_segment`` catches these when its ``Fields`` say which segments select accounts;
    a build evaluates all of a project's segments together, so it can tell by itself.
    """
    kinds = {s.name: s.of for s in segs}
    out = []
    for s in segs:
        for ref, path in refs_with_paths(s.where):
            problem = kind_problem(s, ref, kinds.get(ref_target(ref)), path)
            if problem is not None:
                out.append(problem)
    return out


def _per_segment(t: ir.Table) -> dict[str, int]:
    rows = t.group_by("segment").aggregate(n=t.count()).to_pyarrow().to_pylist()
    return {str(r["segment"]): int(r["n"]) for r in rows}


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
        elif isinstance(leaf, SegmentRef):
            target = account_target(leaf)
            label = f"in {leaf.in_segment}" if target is None else f"account in {target}"
        else:  # contacts: only in account segments (segments.accounts.qualifying)
            continue
        while label in out and out[label] != leaf.derived_column:
            label += "'"
        out[label] = leaf.derived_column
    return out


def preview_expr(engine: Engine, seg: SegmentDef, fields: Fields, as_of: datetime) -> ir.Table:
    """Members as of ``as_of`` with the fields that qualified them — without writing anything."""
    if seg.of == "accounts":  # member accounts (account_id, name, ...): segments.accounts
        from closedloop.segments.accounts import account_preview_expr

        return account_preview_expr(engine, seg, as_of)
    t = with_derived(
        engine, audience_table(engine, fields, fields_used(seg.where)), seg.where, as_of
    )
    members = t.filter(compile_condition(seg.where, t))
    shown = {label: members[col] for label, col in qualifying_columns(seg, fields).items()}
    return members.select("customer_id", **shown).order_by("customer_id")
