"""Segments of accounts (B2B): ``of: accounts`` selects accounts, not customers.

The condition language is the customers' one over another table: field leaves compare the
``accounts`` columns (industry, employees, contacts by role, orders of all contacts, ...);
a ``contacts`` leaf counts the account's contacts that have a role, match profile filters
and did an event — "has a decision maker who requested a demo twice in 30 days" is
``{contacts: {role: decision_maker, did: {event: Demo Requested, count: {value: 2},
within_days: 30}}}``; "at least three contacts in finance or IT" is ``{contacts: {role:
[finance, it]}, count: {value: 3}}``; "no decision maker among the churn risks" is
``{contacts: {role: decision_maker, in_segment: churn_risk}, count: {op: eq, value: 0}}``
(``in_segment`` inside ``contacts`` names a segment of customers, read from its current
stays, so it is evaluated first: :func:`contact_segments`, :func:`segment_batches`). A
contact's event counts are the customers' own (``segments.derived.event_counts``), so the
two kinds of segment read events the same way.
``in_segment`` names another account segment. Event and sequence leaves are refused here:
an account does nothing itself; its contacts do. The other way round, a segment of customers
reads this one with ``account_in_segment: NAME`` — customers who are contacts of a member
account (``segments.derived.account_flags``).

Membership is kept apart from the customers' (``account_membership``, keyed by account id)
as stays with entered and exited times, with the same diff as ``segments.audience``.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import ibis
import ibis.expr.datatypes as dt
import ibis.expr.types as ir

from closedloop.core.catalogue import Erasure, TableSpec, declare
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
    compile_condition,
    leaves,
)
from closedloop.core.definitions import SegmentDef
from closedloop.core.definitions.accounts import ROLES
from closedloop.core.definitions.segments import kind_problem
from closedloop.core.engine import Engine
from closedloop.core.errors import Problem
from closedloop.portrait.accounts import ACCOUNT_CONTACTS, ACCOUNTS
from closedloop.portrait.tables import PROFILES
from closedloop.segments.audience import Fields, SegmentResult, evaluate_segments
from closedloop.segments.derived import event_counts
from closedloop.segments.tables import SEGMENT_MEMBERSHIP

TS = "timestamp('UTC', 6)"

ACCOUNT_MEMBERSHIP = declare(
    TableSpec(
        name="account_membership",
        stage="segments",
        description="Which accounts are (and were) in each account segment (`of: accounts`): "
        "a row per stay, exited_at null while inside.",
        columns={
            "segment": "string",
            "account_id": "string",
            "entered_at": TS,
            "exited_at": TS,
        },
        key=("segment", "account_id", "entered_at"),
        erasure=Erasure.NONE,  # account ids, not persons
    )
)


def _types(columns: dict[str, str]) -> dict[str, dt.DataType]:
    return {c: dt.dtype(t) for c, t in columns.items()}


def _check_field(
    c: FieldCondition, types: dict[str, dt.DataType], where: str, key: str, what: str
) -> list[Problem]:
    if c.trait not in types:
        close = difflib.get_close_matches(c.trait, list(types), n=3)
        hint = f" (did you mean {' or '.join(repr(x) for x in close)}?)" if close else ""
        return [Problem(where, f"unknown {what} field {c.trait!r}{hint}", key=f"{key}.trait")]
    typ = types[c.trait]
    for v in c.value if isinstance(c.value, list) else [c.value]:
        if v is None:
            continue
        ok = (
            (typ.is_numeric() and isinstance(v, int | float) and not isinstance(v, bool))
            or (typ.is_string() and isinstance(v, str))
            or (typ.is_boolean() and isinstance(v, bool))
            or ((typ.is_timestamp() or typ.is_date()) and not isinstance(v, bool | int | float))
        )
        if not ok:
            msg = f"field {c.trait!r} is {typ}, but the value {v!r} is {type(v).__name__}"
            return [Problem(where, msg, key=f"{key}.value")]
    return []


def contact_segments(seg: SegmentDef) -> set[str]:
    """The segments of customers whose members this (account) segment's contacts leaves read."""
    return {
        leaf.contacts.in_segment
        for leaf in leaves(seg.where)
        if isinstance(leaf, ContactsCondition) and leaf.contacts.in_segment is not None
    }


def segment_batches(ordered: Sequence[SegmentDef]) -> list[list[SegmentDef]]:
    """``ordered`` (dependencies first) cut into runs that can each be evaluated at once.

    A run evaluates its account segments before its segments of customers (customers may
    read account stays with ``account_in_segment``). An account segment whose contacts must
    be in a segment of customers of the current run therefore starts a new run: the
    customers' stays are written before it reads them. Usually there is one run.
    """
    batches: list[list[SegmentDef]] = [[]]
    for seg in ordered:
        people = {s.name for s in batches[-1] if s.of != "accounts"}
        if seg.of == "accounts" and contact_segments(seg) & people:
            batches.append([])
        batches[-1].append(seg)
    return [b for b in batches if b]


def evaluate_in_batches(
    engine: Engine, ordered: Sequence[SegmentDef], fields: Fields, clock: Clock | None = None
) -> dict[str, SegmentResult]:
    """Every segment of ``ordered`` evaluated whole, run by run (``segment_batches``).

    Why one function: a build and the live refresh must both write the stays of customers'
    segments before an account segment reads them through ``contacts: {in_segment: ...}``;
    evaluating all at once reads last run's stays (one refresh late).
    """
    results: dict[str, SegmentResult] = {}
    for batch in segment_batches(ordered):
        results |= evaluate_segments(engine, batch, fields, clock)
    return results


def _contact_segment_problem(
    seg: SegmentDef, name: str, segments: Sequence[str], account_segments: Sequence[str] | None
) -> str | None:
    """What is wrong with ``contacts: {in_segment: name}`` in ``seg``; None if nothing."""
    customers = [
        s
        for s in segments
        if s != seg.name and (account_segments is None or s not in account_segments)
    ]
    if name == seg.name or (account_segments is not None and name in account_segments):
        return (
            f"contacts: in_segment {name!r} is a segment of accounts; a contact is a customer: "
            "name a segment of customers (or use `in_segment` outside `contacts` for accounts)"
        )
    if name in segments:
        return None
    close = difflib.get_close_matches(name, customers, n=3)
    hint = f" (did you mean {' or '.join(repr(x) for x in close)}?)" if close else ""
    known = ", ".join(customers) or "none"
    return f"contacts: in_segment {name!r} is not a segment of customers{hint} (known: {known})"


def check_account_segment(
    seg: SegmentDef, segments: Sequence[str], account_segments: Sequence[str] | None = None
) -> list[Problem]:
    """Problems of an ``of: accounts`` segment, each pointing at the offending clause.

    ``account_segments`` (those of ``segments`` that select accounts), when given, lets
    ``in_segment`` naming a segment of customers be refused: no account is ever in one.
    """
    where = f"segments/{seg.name}.yaml"
    accounts = _types(ACCOUNTS.columns)
    profiles = _types(PROFILES.columns)
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
        elif isinstance(c, FieldCondition):
            problems.extend(_check_field(c, accounts, where, path, "account"))
        elif isinstance(c, ContactsCondition):
            for i, f in enumerate(c.contacts.where):
                key = f"{path}.contacts.where.{i}"
                problems.extend(_check_field(f, profiles, where, key, "profile"))
            name = c.contacts.in_segment
            if name is not None:
                msg = _contact_segment_problem(seg, name, segments, account_segments)
                if msg is not None:
                    problems.append(Problem(where, msg, key=f"{path}.contacts.in_segment"))
        elif isinstance(c, SegmentRef):
            of = None  # what the named segment selects, when known
            if account_segments is not None and c.in_segment in segments:
                of = "accounts" if c.in_segment in account_segments else "customers"
            if (problem := kind_problem(seg, c, of, path)) is not None:
                problems.append(problem)
            elif c.in_segment == seg.name or c.in_segment not in segments:
                known = ", ".join(s for s in segments if s != seg.name)
                msg = f"in_segment {c.in_segment!r} is not another segment (known: {known})"
                problems.append(Problem(where, msg, key=f"{path}.in_segment"))
        else:
            kind = "event" if isinstance(c, EventCondition) else "sequence"
            problems.append(
                Problem(
                    where,
                    f"an account does no {kind}s itself: use `contacts: {{did: ...}}` "
                    "to select accounts by what their contacts did",
                    key=f"{path}.{kind}",
                )
            )

    walk(seg.where, "where")
    return problems


def contact_counts(engine: Engine, leaf: ContactsCondition, as_of: datetime) -> ir.Table:
    """(account_id, n): how many of each account's contacts match ``leaf.contacts``."""
    c = engine.table("account_contacts").select("account_id", "customer_id", "role")
    f = leaf.contacts
    if f.role:
        c = c.filter(c.role.isin(list(f.role)))
    if f.where:
        p = engine.table("profiles")
        cols = sorted({x.trait for x in f.where})
        j = c.join(p.select("customer_id", *cols), "customer_id")
        c = j.filter(compile_condition(AllOf(all=list(f.where)), j)).select(
            "account_id", "customer_id", "role"
        )
    if f.in_segment is not None:
        m = engine.table(SEGMENT_MEMBERSHIP.name)
        m = m.filter((m.segment == f.in_segment) & m.exited_at.isnull())
        c = c.semi_join(m.select("customer_id"), "customer_id")
    if f.did is not None:
        n = event_counts(engine, f.did, as_of)
        j = c.left_join(n, "customer_id").drop("customer_id_right")
        j = j.rename({f.did.derived_column: "n"})
        c = j.filter(compile_condition(f.did, j)).select("account_id", "customer_id", "role")
    return c.group_by("account_id").aggregate(n=c.count())


def with_contact_columns(
    engine: Engine, table: ir.Table, cond: Condition, as_of: datetime
) -> ir.Table:
    """``table`` (accounts) plus one column per ``contacts`` and ``in_segment`` leaf."""
    seen: set[str] = set()
    for leaf in leaves(cond):
        if not isinstance(leaf, ContactsCondition | SegmentRef) or leaf.derived_column in seen:
            continue
        name = leaf.derived_column
        seen.add(name)
        if isinstance(leaf, ContactsCondition):
            part = contact_counts(engine, leaf, as_of).rename({name: "n"})
        else:
            m = engine.table(ACCOUNT_MEMBERSHIP.name)
            m = m.filter((m.segment == leaf.in_segment) & m.exited_at.isnull())
            part = m.select("account_id", **{name: ibis.literal(True)}).distinct()
        table = table.left_join(part, "account_id").drop("account_id_right")
    return table


def account_members_expr(engine: Engine, seg: SegmentDef, as_of: datetime) -> ir.Table:
    """The accounts in ``seg`` as of ``as_of``: one ``account_id`` column."""
    t = with_contact_columns(engine, engine.table("accounts"), seg.where, as_of)
    return t.filter(compile_condition(seg.where, t)).select("account_id")


def qualifying(seg: SegmentDef) -> dict[str, str]:
    """Readable label → column, for the fields that explain why an account qualified."""
    out: dict[str, str] = {}
    for leaf in leaves(seg.where):
        if isinstance(leaf, FieldCondition):
            out.setdefault(leaf.trait, leaf.trait)
        elif isinstance(leaf, ContactsCondition):
            f = leaf.contacts
            label = "contacts" + (f" ({', '.join(f.role)})" if f.role else "")
            if f.in_segment is not None:
                label += f" in {f.in_segment}"
            if f.did is not None:
                window = f" in {f.did.within_days}d" if f.did.within_days else ""
                label += f" who did {f.did.event}{window}"
            while label in out and out[label] != leaf.derived_column:
                label += "'"
            out[label] = leaf.derived_column
        elif isinstance(leaf, SegmentRef):
            out[f"in {leaf.in_segment}"] = leaf.derived_column
    return out


def account_preview_expr(engine: Engine, seg: SegmentDef, as_of: datetime) -> ir.Table:
    """Member accounts with their name and the fields that qualified them (writes nothing)."""
    t = with_contact_columns(engine, engine.table("accounts"), seg.where, as_of)
    members = t.filter(compile_condition(seg.where, t))
    shown = {label: members[col] for label, col in qualifying(seg).items() if label != "name"}
    return members.select("account_id", "name", **shown).order_by("account_id")


def evaluate_account_segment(
    engine: Engine, seg: SegmentDef, clock: Clock | None = None
) -> tuple[int, int, int]:
    """Re-evaluate an account segment; record entries and exits. Returns (size, in, out)."""
    as_of = (clock or Clock()).now()
    now = ibis.literal(as_of).cast(TS)
    current = engine.scratch("acct_seg_current", account_members_expr(engine, seg, as_of))
    m = engine.table(ACCOUNT_MEMBERSHIP.name)
    others = m.filter(m.segment != seg.name)
    mine = m.filter(m.segment == seg.name)
    open_ = mine.filter(mine.exited_at.isnull())
    closed = mine.filter(mine.exited_at.notnull())
    stay = open_.semi_join(current, "account_id")
    leaving = open_.anti_join(current, "account_id").mutate(exited_at=now)
    arriving = current.anti_join(open_, "account_id").select(
        segment=ibis.literal(seg.name), account_id="account_id", entered_at=now
    )
    arriving = arriving.mutate(exited_at=ibis.null(TS))
    entered = int(arriving.count().execute())
    exited = int(leaving.count().execute())
    size = int(current.count().execute())
    if entered or exited:
        new = others.union(closed, distinct=False).union(stay, distinct=False)
        new = new.union(leaving, distinct=False).union(arriving, distinct=False)
        engine.replace(ACCOUNT_MEMBERSHIP.name, engine.scratch("acct_seg_new", new))
    return size, entered, exited


def current_account_members(engine: Engine, segment: str) -> ir.Table:
    m = engine.table(ACCOUNT_MEMBERSHIP.name)
    return m.filter((m.segment == segment) & m.exited_at.isnull()).select(
        "account_id", "entered_at"
    )


# ---- the account side of the 360° profile (``closedloop profile``) ------------------------

_SCHEME = r"^[a-z][a-z0-9+.-]*://"


def domain_of(text: str) -> str | None:
    """The host a website or domain names, lower case, without ``www.``; None if none.

    ``https://www.Acme.com/about`` and ``acme.com`` both give ``acme.com``: what people type
    when they look an account up by its domain.
    """
    import re

    host = re.sub(_SCHEME, "", text.strip().lower())
    host = re.split(r"[/?#:]", host, maxsplit=1)[0].removeprefix("www.")
    return host if "." in host and " " not in host else None


def _domain_expr(website: ir.StringValue) -> ir.StringValue:
    """``domain_of`` over a column (the same steps, in Ibis)."""
    host = website.strip().lower().re_replace(_SCHEME, "")
    return host.re_replace(r"[/?#:].*$", "").re_replace(r"^www\.", "")


def find_accounts(engine: Engine, value: str) -> list[tuple[str, str]]:
    """The accounts ``value`` names, as (account_id, how): by id, else by website domain.

    An id is the group calls' ``groupId``, exact. A domain matches the ``website`` trait
    whatever its scheme, ``www.`` or path. Reads nothing (and creates nothing) in a
    warehouse without accounts.
    """
    if not engine.exists(ACCOUNTS.name):
        return []
    a = engine.table(ACCOUNTS.name)
    v = value.strip()
    if not v:
        return []
    by_id = a.filter(a.account_id == v).select("account_id").to_pyarrow().to_pylist()
    if by_id:
        return [(v, "account_id")]
    domain = domain_of(v)
    if domain is None:
        return []
    hits = a.filter(a.website.notnull() & (_domain_expr(a.website) == domain))
    rows = hits.select("account_id").order_by("account_id").to_pyarrow().to_pylist()
    return [(str(r["account_id"]), "website") for r in rows]


def _open_stays(engine: Engine, account_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Per account, its current account segments (segment, entered_at), by name."""
    out: dict[str, list[dict[str, Any]]] = {a: [] for a in account_ids}
    if not account_ids or not engine.exists(ACCOUNT_MEMBERSHIP.name):
        return out
    m = engine.table(ACCOUNT_MEMBERSHIP.name)
    m = m.filter(m.account_id.isin(account_ids) & m.exited_at.isnull())
    rows = m.select("account_id", "segment", "entered_at").order_by(["account_id", "segment"])
    for r in rows.to_pyarrow().to_pylist():
        out[r["account_id"]].append({"segment": r["segment"], "entered_at": r["entered_at"]})
    return out


CONTACT_FIELDS = ("name", "email", "orders", "revenue", "last_seen")


def account_profile(engine: Engine, account_id: str) -> dict[str, Any] | None:
    """One account: its traits and behaviour, its contacts by role, its account segments.

    Contacts are grouped under the four roles (each present, possibly empty, so a reader
    sees "no one in finance"), each with a few fields of the contact's own profile.
    """
    if not engine.exists(ACCOUNTS.name):
        return None
    a = engine.table(ACCOUNTS.name)
    rows = a.filter(a.account_id == account_id).to_pyarrow().to_pylist()
    if not rows:
        return None
    by_role: dict[str, list[dict[str, Any]]] = {r: [] for r in ROLES}
    if engine.exists(ACCOUNT_CONTACTS.name):
        c = engine.table(ACCOUNT_CONTACTS.name)
        c = c.filter(c.account_id == account_id).drop("account_id")
        if engine.exists("profiles"):
            p = engine.table("profiles").select("customer_id", *CONTACT_FIELDS)
            p = p.rename({f"contact_{f}": f for f in CONTACT_FIELDS})
            c = c.left_join(p, "customer_id").drop("customer_id_right")
        for r in c.order_by(["role", "customer_id"]).to_pyarrow().to_pylist():
            by_role.setdefault(r.pop("role"), []).append(r)
    segments = _open_stays(engine, [account_id])[account_id]
    return {"account": rows[0], "contacts": by_role, "segments": segments}


def contact_accounts(engine: Engine, customer_id: str) -> list[dict[str, Any]]:
    """The accounts a customer is a contact of: id, name, the role and the account's segments."""
    if not engine.exists(ACCOUNT_CONTACTS.name):
        return []
    c = engine.table(ACCOUNT_CONTACTS.name)
    c = c.filter(c.customer_id == customer_id).select(
        "account_id", "role", "role_text", "first_seen", "last_seen"
    )
    if engine.exists(ACCOUNTS.name):
        a = engine.table(ACCOUNTS.name).select("account_id", "name")
        c = c.left_join(a, "account_id").drop("account_id_right")
    rows: list[dict[str, Any]] = c.order_by("account_id").to_pyarrow().to_pylist()
    stays = _open_stays(engine, [r["account_id"] for r in rows])
    for r in rows:
        r.setdefault("name", None)
        r["segments"] = [s["segment"] for s in stays[r["account_id"]]]
    return rows
