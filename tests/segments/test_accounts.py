"""Segments of accounts: account traits, contacts' roles and behaviour, stays by account id."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from closedloop.collect.tables import EVENTS
from closedloop.core.clock import Clock
from closedloop.core.conditions import (
    Condition,
    ContactsCondition,
    count_matches,
    evaluate_python,
    leaves,
)
from closedloop.core.definitions import SegmentDef
from closedloop.core.engine import Engine
from closedloop.identity.resolve import resolve
from closedloop.portrait.accounts import ACCOUNT_CONTACTS, ACCOUNTS
from closedloop.portrait.build import build_profiles
from closedloop.segments.accounts import (
    account_members_expr,
    account_preview_expr,
    check_account_segment,
    current_account_members,
    evaluate_account_segment,
)
from tests.conftest import add_events
from tests.identity.test_resolve import CONFIG
from tests.portrait.test_accounts import MESSAGES, NOW, track

ADAPTER: TypeAdapter[Any] = TypeAdapter(Condition)


def seg(where: dict[str, Any], name: str = "s") -> SegmentDef:
    return SegmentDef.model_validate({"name": name, "of": "accounts", "where": where})


@pytest.fixture
def built(engine: Engine) -> Engine:
    add_events(engine, [*MESSAGES, track("t9", "A", "Demo Requested", 2, "zeta")])
    resolve(engine, CONFIG, Clock(NOW))
    build_profiles(engine, Clock(NOW))
    return engine


def members(engine: Engine, where: dict[str, Any]) -> set[str]:
    expr = account_members_expr(engine, seg(where), NOW)
    return set(expr.account_id.to_pyarrow().to_pylist())


def test_traits_roles_and_behaviour_select_accounts(built: Engine) -> None:
    assert members(built, {"trait": "industry", "op": "eq", "value": "Tea"}) == {"acme"}
    assert members(built, {"trait": "employees", "op": ">=", "value": 250}) == {"acme"}
    # A (the decision maker of both) ordered three times in the last 30 days
    did = {"event": "Order Completed", "count": {"op": "gte", "value": 3}, "within_days": 30}
    assert members(built, {"contacts": {"role": "decision_maker", "did": did}}) == {
        "acme",
        "zeta",
    }
    # ... but only once in the last 7 days (o2 and o3): no account has such a contact
    did7 = {**did, "within_days": 7}
    assert members(built, {"contacts": {"role": "decision_maker", "did": did7}}) == set()
    # B (finance) requested a demo; nobody in finance at zeta
    demo = {"event": "Demo Requested"}
    assert members(built, {"contacts": {"role": ["finance"], "did": demo}}) == {"acme"}
    # a contact's behaviour is all their own events: A's demo (at zeta) counts at acme too
    assert members(built, {"contacts": {"did": demo}, "count": {"value": 2}}) == {"acme"}
    assert members(built, {"contacts": {"did": demo}, "count": {"value": 3}}) == set()
    # count of contacts: two or more in finance or IT
    two = {"contacts": {"role": ["finance", "it"]}, "count": {"op": "gte", "value": 2}}
    assert members(built, two) == {"acme"}
    none_it = {"contacts": {"role": "it"}, "count": {"op": "eq", "value": 0}}
    assert members(built, none_it) == {"zeta"}
    # contacts by profile fields too
    buyers = {"contacts": {"where": [{"trait": "orders", "op": "gte", "value": 1}]}}
    assert members(built, buyers) == {"acme", "zeta"}
    assert members(built, {"not": buyers}) == set()


def test_stays_are_kept_by_account_id(built: Engine) -> None:
    s = seg({"trait": "orders", "op": "gte", "value": 2})
    assert evaluate_account_segment(built, s, Clock(NOW)) == (2, 2, 0)
    assert evaluate_account_segment(built, s, Clock(NOW)) == (2, 0, 0)
    # a third order, for zeta: acme stays at two
    built.append("events", _order("zeta"))
    resolve(built, CONFIG, Clock(NOW))
    build_profiles(built, Clock(NOW))
    later = NOW + timedelta(hours=1)
    stricter = seg({"trait": "orders", "op": "gte", "value": 3})
    assert evaluate_account_segment(built, stricter, Clock(later)) == (1, 0, 1)
    rows = current_account_members(built, "s").to_pyarrow().to_pylist()
    assert [r["account_id"] for r in rows] == ["zeta"]
    rows = built.table("account_membership").to_pyarrow().to_pylist()
    assert [(r["account_id"], r["exited_at"]) for r in rows if r["exited_at"]] == [("acme", later)]


def _order(gid: str) -> pa.Table:
    from tests.conftest import event_rows

    return event_rows([track("t10", "A", "Order Completed", 0.5, gid, order_id="o9", revenue=3.0)])


def test_preview_shows_why(built: Engine) -> None:
    s = seg(
        {
            "all": [
                {"trait": "industry", "op": "not_null"},
                {"contacts": {"role": "decision_maker"}},
            ]
        }
    )
    rows = account_preview_expr(built, s, NOW).to_pyarrow().to_pylist()
    assert [(r["account_id"], r["name"]) for r in rows] == [("acme", "Acme")]
    assert rows[0]["industry"] == "Tea" and rows[0]["contacts (decision_maker)"] == 1


def test_wrong_account_segments_point_at_the_clause() -> None:
    s = seg(
        {
            "all": [
                {"trait": "industy", "op": "eq", "value": "Tea"},
                {"event": "Order Completed"},
                {"contacts": {"where": [{"trait": "ordres", "op": "gt", "value": 1}]}},
                {"trait": "employees", "op": "gt", "value": "many"},
                {"in_segment": "nope"},
            ]
        }
    )
    problems = {p.key: p.message for p in check_account_segment(s, ["s", "other"])}
    assert "did you mean 'industry'" in problems["where.all.0.trait"]
    assert "use `contacts: {did: ...}`" in problems["where.all.1.event"]
    assert "did you mean 'orders'" in problems["where.all.2.contacts.where.0.trait"]
    assert "int64" in problems["where.all.3.value"]
    assert "not another segment" in problems["where.all.4.in_segment"]
    with pytest.raises(ValueError, match="decision_maker"):
        seg({"contacts": {"role": "boss"}})


# ---- property: the compiled condition agrees with a plain-Python evaluation ----------------

ACCOUNT_IDS = [f"a{i}" for i in range(3)]
CUSTOMERS = [f"c{i}" for i in range(4)]
ROLES = ["decision_maker", "finance", "it", "user"]


def bound() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"op": st.sampled_from(["gte", "lte", "eq"]), "value": st.integers(0, 3)}
    )


field_leaves = st.one_of(
    st.builds(
        lambda op, v: {"trait": "industry", "op": op, "value": v},
        st.sampled_from(["eq", "ne"]),
        st.sampled_from(["Tea", "Retail"]),
    ),
    st.builds(
        lambda op, v: {"trait": "employees", "op": op, "value": v},
        st.sampled_from(["gt", "lte", "eq"]),
        st.integers(0, 300),
    ),
    st.sampled_from(["is_null", "not_null"]).map(lambda op: {"trait": "industry", "op": op}),
)
contact_leaves = st.builds(
    lambda roles, did, within, count: {
        "contacts": {
            **({"role": roles} if roles else {}),
            **(
                {"did": {"event": "Demo Requested", "count": did, "within_days": within}}
                if did is not None
                else {}
            ),
        },
        "count": count,
    },
    st.lists(st.sampled_from(ROLES), max_size=2, unique=True),
    st.none() | bound(),
    st.none() | st.sampled_from([7, 30]),
    bound(),
)
conditions = st.recursive(
    st.one_of(field_leaves, contact_leaves),
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: {"all": xs}),
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: {"any": xs}),
        inner.map(lambda x: {"not": x}),
    ),
    max_leaves=5,
)
worlds = st.fixed_dictionaries(
    {
        "accounts": st.fixed_dictionaries(
            {
                a: st.tuples(
                    st.none() | st.sampled_from(["Tea", "Retail"]), st.none() | st.integers(0, 300)
                )
                for a in ACCOUNT_IDS
            }
        ),
        "contacts": st.lists(
            st.tuples(st.sampled_from(ACCOUNT_IDS), st.sampled_from(CUSTOMERS)),
            min_size=2,
            max_size=10,
            unique=True,
        ).flatmap(
            lambda pairs: st.lists(
                st.sampled_from(ROLES), min_size=len(pairs), max_size=len(pairs)
            ).map(lambda roles: list(zip(pairs, roles, strict=True)))
        ),
        # days before now of each customer's demo requests; 7 and 30 sit on the window edge
        "demos": st.lists(
            st.tuples(st.sampled_from(CUSTOMERS), st.sampled_from([0.5, 7, 8, 29.9, 30, 45])),
            min_size=2,
            max_size=12,
        ),
    }
)


@pytest.fixture(scope="module")
def duck() -> Iterator[Engine]:
    with Engine("duckdb://") as e:
        yield e


def _load(engine: Engine, world: dict[str, Any]) -> None:
    acc = [
        {c: None for c in ACCOUNTS.columns} | {"account_id": a, "industry": i, "employees": n}
        for a, (i, n) in world["accounts"].items()
    ]
    engine.replace("accounts", pa.Table.from_pylist(acc))
    contacts = [
        {c: None for c in ACCOUNT_CONTACTS.columns} | {"account_id": a, "customer_id": c, "role": r}
        for (a, c), r in world["contacts"]
    ]
    engine.replace(
        "account_contacts",
        pa.Table.from_pylist(contacts, schema=ACCOUNT_CONTACTS.schema.to_pyarrow()),
    )
    events = []
    for i, (c, days) in enumerate(world["demos"]):
        row = {k: None for k in EVENTS.columns}
        row |= {"message_id": f"m{i}", "type": "track", "event": "Demo Requested"}
        row["timestamp"] = NOW - timedelta(days=days)
        events.append((row, c))
    ev_schema = EVENTS.schema.to_pyarrow()
    engine.replace("events", pa.Table.from_pylist([r for r, _ in events], schema=ev_schema))
    engine.replace(
        "event_customers",
        pa.Table.from_pylist(
            [{"message_id": r["message_id"], "customer_id": c} for r, c in events],
            schema=pa.schema([("message_id", pa.string()), ("customer_id", pa.string())]),
        ),
    )


def reference(cond: Any, world: dict[str, Any], as_of: datetime) -> set[str]:
    """The accounts a plain-Python evaluation selects, from the raw world."""
    out = set()
    for a, (industry, employees) in world["accounts"].items():
        row: dict[str, Any] = {"industry": industry, "employees": employees}
        for leaf in leaves(cond):
            if not isinstance(leaf, ContactsCondition):
                continue
            f = leaf.contacts
            n = 0
            for (acct, c), role in world["contacts"]:
                if acct != a or (f.role and role not in f.role):
                    continue
                if f.did is not None:
                    lo = as_of - timedelta(days=f.did.within_days or 10_000)
                    k = sum(
                        1
                        for who, days in world["demos"]
                        if who == c and lo < as_of - timedelta(days=days) <= as_of
                    )
                    if not count_matches(f.did.count, k):
                        continue
                n += 1
            row[leaf.derived_column] = n
        if evaluate_python(cond, row):
            out.add(a)
    return out


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=conditions, world=worlds)
@example(  # the window's edge: a request exactly 7 days ago is outside the last 7 days
    raw={"contacts": {"did": {"event": "Demo Requested", "within_days": 7}}},
    world={
        "accounts": {"a0": ("Tea", 1), "a1": (None, None), "a2": (None, None)},
        "contacts": [(("a0", "c0"), "it"), (("a1", "c1"), "user")],
        "demos": [("c0", 7), ("c1", 0.5)],
    },
)
def test_compiled_account_condition_matches_python(
    duck: Engine, raw: dict[str, Any], world: dict[str, Any]
) -> None:
    cond = ADAPTER.validate_python(raw)
    _load(duck, world)
    got = set(account_members_expr(duck, seg(raw), NOW).account_id.to_pyarrow().to_pylist())
    assert got == reference(cond, world, NOW)
