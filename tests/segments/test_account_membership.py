"""Customer segments that read account segments: ``account_in_segment: X``.

"My account is in account segment X" — a customer is in when any account they are a contact
of has an open stay in X. Naming a segment of the other kind (a customer segment with
``in_segment: <account segment>``, an account segment with ``in_segment: <customer segment>``
or ``account_in_segment``) is a validation error saying what to write instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from closedloop.core.clock import Clock
from closedloop.core.conditions import SegmentRef, evaluate_python, leaves
from closedloop.core.definitions import SegmentDef
from closedloop.core.definitions.loading import load_project
from closedloop.core.definitions.segments import account_target
from closedloop.core.engine import Engine
from closedloop.core.errors import DefinitionError
from closedloop.demo.project import init_project
from closedloop.identity.resolve import resolve
from closedloop.pipeline import _with_line, check_project, segment_order
from closedloop.portrait.accounts import ACCOUNT_CONTACTS
from closedloop.portrait.build import build_profiles
from closedloop.portrait.tables import PROFILES
from closedloop.segments.accounts import ACCOUNT_MEMBERSHIP
from closedloop.segments.audience import (
    Fields,
    check_segment,
    current_members,
    evaluate_segments,
    members_expr,
    preview_expr,
    segment_dependencies,
)
from tests.conftest import add_events
from tests.identity.test_resolve import CONFIG
from tests.portrait.test_accounts import MESSAGES, NOW, group
from tests.test_backends import postgres_url as postgres_url  # the fixture

ACCOUNT_SEGS = ("big", "hot")
FIELDS = Fields(segments=("vip", *ACCOUNT_SEGS, "s"), account_segments=ACCOUNT_SEGS)


def seg(where: Any, name: str = "s", of: str = "customers") -> SegmentDef:
    return SegmentDef.model_validate({"name": name, "of": of, "where": where})


# ---- reading and validating ------------------------------------------------------------


def test_account_in_segment_is_read_anywhere_in_the_tree() -> None:
    s = seg({"all": [{"not": {"account_in_segment": "big"}}, {"any": [{"in_segment": "vip"}]}]})
    refs = [x for x in leaves(s.where) if isinstance(x, SegmentRef)]
    assert [account_target(r) for r in refs] == ["big", None]
    assert segment_dependencies(s) == {"big", "vip"}
    with pytest.raises(ValidationError, match="string"):
        seg({"account_in_segment": 5})
    with pytest.raises(ValidationError):
        seg({"account_in_segment": "big", "op": "eq"})


def test_each_kind_must_name_its_own_kind() -> None:
    cust = seg(
        {
            "all": [
                {"in_segment": "big"},  # an account segment read as customers'
                {"account_in_segment": "vip"},  # a customer segment read as accounts'
                {"account_in_segment": "nope"},
                {"account_in_segment": "hot"},  # right
                {"in_segment": "vip"},  # right
            ]
        }
    )
    problems = {p.key: p.message for p in check_segment(cust, FIELDS)}
    assert set(problems) == {
        "where.all.0.in_segment",
        "where.all.1.account_in_segment",
        "where.all.2.account_in_segment",
    }
    assert "write `account_in_segment: big`" in problems["where.all.0.in_segment"]
    assert "write `in_segment: vip`" in problems["where.all.1.account_in_segment"]
    assert "'nope' is not another segment" in problems["where.all.2.account_in_segment"]

    acct = seg(
        {
            "any": [
                {"in_segment": "vip"},  # a customer segment in an account segment
                {"account_in_segment": "big"},  # the customers' leaf in an account segment
                {"in_segment": "hot"},  # right
            ]
        },
        name="big",
        of="accounts",
    )
    problems = {p.key: p.message for p in check_segment(acct, FIELDS)}
    assert set(problems) == {"where.any.0.in_segment", "where.any.1.account_in_segment"}
    assert "`contacts: {where:" in problems["where.any.0.in_segment"]
    assert "write `in_segment: big`" in problems["where.any.1.account_in_segment"]
    # not told the kinds: only names are checked (as before)
    loose = Fields(segments=FIELDS.segments)
    assert [p.key for p in check_segment(cust, loose)] == ["where.all.2.account_in_segment"]


def test_problems_point_at_the_line(tmp_path: Path) -> None:
    root = tmp_path / "p"
    init_project(root, key_suffix="test1234")
    (root / "segments" / "big.yaml").write_text(
        "name: big\nof: accounts\nwhere:\n  trait: employees\n  op: gte\n  value: 100\n"
    )
    (root / "segments" / "s.yaml").write_text(
        "name: s\nwhere:\n  all:\n    - trait: orders\n      op: gte\n      value: 1\n"
        "    - in_segment: big\n"
    )
    project = load_project(root)
    fields = Fields(
        segments=tuple(project.segments),
        account_segments=tuple(n for n, s in project.segments.items() if s.of == "accounts"),
    )
    [problem] = [_with_line(project, p) for p in check_segment(project.segments["s"], fields)]
    assert (problem.file, problem.line, problem.key) == (
        "segments/s.yaml",
        7,
        "where.all.1.in_segment",
    )
    assert "account_in_segment: big" in str(problem)
    # `closedloop validate` (check_project) knows the kinds from the project itself
    found = [p for p in check_project(project) if p.key == "where.all.1.in_segment"]
    assert [(p.file, p.line) for p in found] == [("segments/s.yaml", 7)]
    # the account segment is evaluated first
    order = [s.name for s in segment_order(project)[0]]
    assert order.index("big") < order.index("s")


def test_a_build_refuses_the_other_kind_before_writing(engine: Engine) -> None:
    big = seg({"trait": "employees", "op": "gte", "value": 1}, name="big", of="accounts")
    wrong = seg({"any": [{"trait": "orders", "op": "gte", "value": 1}, {"in_segment": "big"}]})
    with pytest.raises(DefinitionError) as e:
        evaluate_segments(engine, [big, wrong], Fields(segments=("big", "s")), Clock(NOW))
    [problem] = e.value.problems
    assert problem.key == "where.any.1.in_segment" and "account_in_segment: big" in str(problem)
    assert not engine.exists(ACCOUNT_MEMBERSHIP.name) or engine.count(ACCOUNT_MEMBERSHIP.name) == 0
    back = seg({"account_in_segment": "s"}, name="big", of="accounts")
    with pytest.raises(DefinitionError, match="write `in_segment: s`"):
        evaluate_segments(engine, [back, wrong], Fields(segments=("big", "s")), Clock(NOW))


# ---- a build: group calls, an account segment, then the customers who read it -----------


@pytest.fixture
def built(engine: Engine) -> Engine:
    add_events(engine, MESSAGES)
    resolve(engine, CONFIG, Clock(NOW))
    build_profiles(engine, Clock(NOW))
    return engine


def contacts_of(engine: Engine, account: str) -> set[str]:
    rows = engine.table("account_contacts").to_pyarrow().to_pylist()
    return {r["customer_id"] for r in rows if r["account_id"] == account}


def test_customers_enter_and_leave_with_their_account(built: Engine) -> None:
    tea = seg({"trait": "industry", "op": "eq", "value": "Tea"}, name="tea", of="accounts")
    buyers = seg(
        {
            "all": [
                {"account_in_segment": "tea"},
                {"trait": "orders", "op": "gte", "value": 1},
            ]
        },
        name="tea_buyers",
    )
    fields = Fields(segments=("tea", "tea_buyers"), account_segments=("tea",))
    assert check_segment(buyers, fields) == [] and check_segment(tea, fields) == []
    acme = contacts_of(built, "acme")
    assert len(acme) == 3 and len(contacts_of(built, "zeta")) == 1
    done = evaluate_segments(built, [tea, buyers], fields, Clock(NOW))
    # A (orders at both) and B? B's only order is after the clock: A alone of acme's three
    ordered = {
        r["customer_id"]
        for r in built.table("profiles").to_pyarrow().to_pylist()
        if (r["orders"] or 0) >= 1
    }
    expected = acme & ordered
    assert expected and expected != acme
    got = set(current_members(built, "tea_buyers").customer_id.to_pyarrow().to_pylist())
    assert got == expected
    assert (done["tea"].size, done["tea_buyers"].size) == (1, len(expected))
    rows = preview_expr(built, buyers, fields, NOW).to_pyarrow().to_pylist()
    assert {r["customer_id"] for r in rows} == expected
    assert all(r["account in tea"] is True for r in rows)

    # acme turns to retail: it leaves "tea", and its contacts leave "tea_buyers"
    later = NOW + timedelta(hours=1)
    built.append("events", _rows([group("g9", "C", "acme", -0.01, {"industry": "Retail"})]))
    resolve(built, CONFIG, Clock(later))
    build_profiles(built, Clock(later))
    done = evaluate_segments(built, [tea, buyers], fields, Clock(later))
    assert (done["tea"].exited, done["tea_buyers"].exited) == (1, len(expected))
    assert current_members(built, "tea_buyers").count().execute() == 0


def _rows(messages: list[dict[str, Any]]) -> pa.Table:
    from tests.conftest import event_rows

    return event_rows(messages)


# ---- property: the compiled condition agrees with a plain-Python evaluation --------------

CUSTOMERS = [f"c{i}" for i in range(5)]
ACCOUNTS = [f"a{i}" for i in range(3)]

leaf = st.one_of(
    st.builds(
        lambda op, v: {"trait": "orders", "op": op, "value": v},
        st.sampled_from(["gte", "lt", "eq"]),
        st.integers(0, 3),
    ),
    st.sampled_from(ACCOUNT_SEGS).map(lambda s: {"account_in_segment": s}),
    st.just({"in_segment": "vip"}),
)
conditions = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: {"all": xs}),
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: {"any": xs}),
        inner.map(lambda x: {"not": x}),
    ),
    max_leaves=5,
)
worlds = st.fixed_dictionaries(
    {
        "orders": st.fixed_dictionaries({c: st.none() | st.integers(0, 3) for c in CUSTOMERS}),
        "contacts": st.lists(
            st.tuples(st.sampled_from(ACCOUNTS), st.sampled_from(CUSTOMERS)), unique=True
        ),
        # per account segment and account: None (never in), "open" or "closed" (was in, left)
        "stays": st.fixed_dictionaries(
            {
                s: st.fixed_dictionaries(
                    {a: st.sampled_from([None, "open", "closed"]) for a in ACCOUNTS}
                )
                for s in ACCOUNT_SEGS
            }
        ),
        "vip": st.sets(st.sampled_from(CUSTOMERS)),
    }
)


def load_world(engine: Engine, world: dict[str, Any]) -> None:
    profiles = [
        {c: None for c in PROFILES.columns} | {"customer_id": c, "orders": n}
        for c, n in world["orders"].items()
    ]
    engine.replace("profiles", pa.Table.from_pylist(profiles, schema=PROFILES.schema.to_pyarrow()))
    contacts = [
        {c: None for c in ACCOUNT_CONTACTS.columns} | {"account_id": a, "customer_id": c}
        for a, c in world["contacts"]
    ]
    engine.replace(
        "account_contacts",
        pa.Table.from_pylist(contacts, schema=ACCOUNT_CONTACTS.schema.to_pyarrow()),
    )
    day = timedelta(days=1)
    stays = []
    for s, by_account in world["stays"].items():
        for a, state in by_account.items():
            if state is not None:
                out = NOW - day if state == "closed" else None
                stays.append(
                    {"segment": s, "account_id": a, "entered_at": NOW - 2 * day, "exited_at": out}
                )
    engine.replace(
        ACCOUNT_MEMBERSHIP.name,
        pa.Table.from_pylist(stays, schema=ACCOUNT_MEMBERSHIP.schema.to_pyarrow()),
    )
    vip = [
        {"segment": "vip", "customer_id": c, "entered_at": NOW - day, "exited_at": None}
        for c in sorted(world["vip"])
    ]
    membership = engine.catalogue.get("segment_membership").schema.to_pyarrow()
    engine.replace("segment_membership", pa.Table.from_pylist(vip, schema=membership))


def reference(s: SegmentDef, world: dict[str, Any]) -> set[str]:
    out = set()
    for c, orders in world["orders"].items():
        row: dict[str, Any] = {"orders": orders}
        for x in leaves(s.where):
            if not isinstance(x, SegmentRef):
                continue
            target = account_target(x)
            if target is None:
                row[x.derived_column] = c in world["vip"]
            else:
                mine = {a for a, who in world["contacts"] if who == c}
                row[x.derived_column] = any(world["stays"][target][a] == "open" for a in mine)
        if evaluate_python(s.where, row):
            out.add(c)
    return out


def members(engine: Engine, s: SegmentDef) -> set[str]:
    return set(members_expr(engine, s, FIELDS, NOW).customer_id.to_pyarrow().to_pylist())


@pytest.fixture(scope="module")
def duck() -> Iterator[Engine]:
    with Engine("duckdb://") as e:
        yield e


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=conditions, world=worlds)
@example(  # a closed stay is not membership; two accounts, one of them in
    raw={"account_in_segment": "big"},
    world={
        "orders": dict.fromkeys(CUSTOMERS),
        "contacts": [("a0", "c0"), ("a1", "c0"), ("a1", "c1"), ("a2", "c2")],
        "stays": {
            "big": {"a0": "open", "a1": "closed", "a2": None},
            "hot": dict.fromkeys(ACCOUNTS),
        },
        "vip": set(),
    },
)
def test_compiled_account_membership_matches_python(
    duck: Engine, raw: dict[str, Any], world: dict[str, Any]
) -> None:
    s = seg(raw)
    assert check_segment(s, FIELDS) == []
    load_world(duck, world)
    assert members(duck, s) == reference(s, world)


WORLD: dict[str, Any] = {
    "orders": {"c0": 2, "c1": None, "c2": 0, "c3": 1, "c4": 3},
    "contacts": [("a0", "c0"), ("a0", "c1"), ("a1", "c1"), ("a1", "c3"), ("a2", "c4")],
    "stays": {
        "big": {"a0": "open", "a1": "closed", "a2": "open"},
        "hot": {"a0": None, "a1": "open", "a2": "closed"},
    },
    "vip": {"c2", "c4"},
}
CONDITIONS: list[dict[str, Any]] = [
    {"account_in_segment": "big"},
    {"not": {"account_in_segment": "hot"}},
    {"all": [{"account_in_segment": "big"}, {"trait": "orders", "op": "gte", "value": 1}]},
    {"any": [{"account_in_segment": "hot"}, {"in_segment": "vip"}]},
    {"all": [{"account_in_segment": "big"}, {"not": {"in_segment": "vip"}}]},
]


@pytest.mark.postgres
def test_postgres_equals_duckdb(postgres_url: str) -> None:
    got: dict[str, list[set[str]]] = {}
    for url in ("duckdb://", postgres_url):
        engine = Engine(url)
        try:
            load_world(engine, WORLD)
            got[url] = [members(engine, seg(c)) for c in CONDITIONS]
        finally:
            engine.close()
    assert got["duckdb://"] == got[postgres_url]
    assert got["duckdb://"] == [reference(seg(c), WORLD) for c in CONDITIONS]
    assert got["duckdb://"][0] == {"c0", "c1", "c4"}
