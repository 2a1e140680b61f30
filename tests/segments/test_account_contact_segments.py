"""Accounts selected by their contacts' membership of segments of customers.

``{contacts: {role: R, in_segment: X}, count: ...}``: how many of the account's contacts
(of role R) are current members of customer segment X. Checked against a plain-Python
reading of the same random world; then validation (file:line [key], "did you mean") and
dependency order, in a build and in an incremental evaluation.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from closedloop.core.clock import Clock
from closedloop.core.conditions import ContactsCondition, evaluate_python, leaves
from closedloop.core.definitions import SegmentDef, load_project
from closedloop.core.engine import Engine, table_differences
from closedloop.demo.project import init_project
from closedloop.pipeline import check_project, segment_order
from closedloop.portrait.accounts import ACCOUNT_CONTACTS, ACCOUNTS
from closedloop.segments.accounts import (
    account_members_expr,
    check_account_segment,
    contact_segments,
    evaluate_in_batches,
    segment_batches,
)
from closedloop.segments.audience import Fields, evaluate_segments
from closedloop.segments.incremental import evaluate_changed
from closedloop.segments.tables import SEGMENT_MEMBERSHIP
from tests.segments.test_accounts import ACCOUNT_IDS, ADAPTER, CUSTOMERS, ROLES, _load, bound, seg
from tests.tags.helpers import set_profiles

NOW = datetime(2026, 11, 20, tzinfo=UTC)
NAMES = ["vip", "churn"]
# Each customer's history in a segment: never in, in now, was in, was in and came back.
STATES = ["none", "open", "closed", "closed_open"]

contact_leaves = st.builds(
    lambda roles, name, count: {
        "contacts": {
            **({"role": roles} if roles else {}),
            **({"in_segment": name} if name else {}),
        },
        "count": count,
    },
    st.lists(st.sampled_from(ROLES), max_size=2, unique=True),
    st.none() | st.sampled_from(NAMES),
    bound(),
)
field_leaves = st.builds(
    lambda op, v: {"trait": "industry", "op": op, "value": v},
    st.sampled_from(["eq", "ne"]),
    st.sampled_from(["Tea", "Retail"]),
)
conditions = st.recursive(
    st.one_of(contact_leaves, field_leaves),
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: {"all": xs}),
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: {"any": xs}),
        inner.map(lambda x: {"not": x}),
    ),
    max_leaves=4,
)
worlds = st.fixed_dictionaries(
    {
        "accounts": st.fixed_dictionaries(
            {
                a: st.tuples(st.none() | st.sampled_from(["Tea", "Retail"]), st.none())
                for a in ACCOUNT_IDS
            }
        ),
        "contacts": st.lists(
            st.tuples(st.sampled_from(ACCOUNT_IDS), st.sampled_from(CUSTOMERS)),
            min_size=1,
            max_size=10,
            unique=True,
        ).flatmap(
            lambda pairs: st.lists(
                st.sampled_from(ROLES), min_size=len(pairs), max_size=len(pairs)
            ).map(lambda roles: list(zip(pairs, roles, strict=True)))
        ),
        "demos": st.just([]),
        "stays": st.fixed_dictionaries(
            {(c, s): st.sampled_from(STATES) for c in CUSTOMERS for s in NAMES}
        ),
    }
)


def _stay_rows(stays: dict[tuple[str, str], str]) -> pa.Table:
    rows: list[tuple[str, str, datetime, datetime | None]] = []
    day = timedelta(days=1)
    for (c, s), state in stays.items():
        if state in ("closed", "closed_open"):
            rows.append((s, c, NOW - 9 * day, NOW - 5 * day))
        if state in ("open", "closed_open"):
            rows.append((s, c, NOW - 2 * day, None))
    cols = ["segment", "customer_id", "entered_at", "exited_at"]
    table = pa.Table.from_pylist([dict(zip(cols, r, strict=True)) for r in rows])
    return (
        table.cast(SEGMENT_MEMBERSHIP.schema.to_pyarrow())
        if rows
        else SEGMENT_MEMBERSHIP.schema.to_pyarrow().empty_table()
    )


def reference(cond: Any, world: dict[str, Any]) -> set[str]:
    """The accounts a plain-Python evaluation selects, from the raw world."""
    inside = {(c, s) for (c, s), state in world["stays"].items() if state.endswith("open")}
    out = set()
    for a, (industry, _) in world["accounts"].items():
        row: dict[str, Any] = {"industry": industry}
        for leaf in leaves(cond):
            if isinstance(leaf, ContactsCondition):
                f = leaf.contacts
                row[leaf.derived_column] = sum(
                    1
                    for (acct, c), role in world["contacts"]
                    if acct == a
                    and (not f.role or role in f.role)
                    and (f.in_segment is None or (c, f.in_segment) in inside)
                )
        if evaluate_python(cond, row):
            out.add(a)
    return out


@pytest.fixture(scope="module")
def duck() -> Iterator[Engine]:
    with Engine("duckdb://") as e:
        yield e


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=conditions, world=worlds)
@example(  # a closed stay is not membership; a stay reopened is
    raw={"contacts": {"in_segment": "vip"}, "count": {"op": "gte", "value": 1}},
    world={
        "accounts": {"a0": ("Tea", None), "a1": (None, None), "a2": (None, None)},
        "contacts": [(("a0", "c0"), "it"), (("a1", "c1"), "user"), (("a2", "c2"), "user")],
        "demos": [],
        "stays": {(c, s): "none" for c in CUSTOMERS for s in NAMES}
        | {("c0", "vip"): "closed", ("c1", "vip"): "closed_open", ("c2", "churn"): "open"},
    },
)
def test_contacts_in_segment_matches_python(
    duck: Engine, raw: dict[str, Any], world: dict[str, Any]
) -> None:
    cond = ADAPTER.validate_python(raw)
    _load(duck, world)
    duck.replace(SEGMENT_MEMBERSHIP.name, _stay_rows(world["stays"]))
    got = set(account_members_expr(duck, seg(raw), NOW).account_id.to_pyarrow().to_pylist())
    assert got == reference(cond, world)


def test_wrong_contact_segments_are_refused() -> None:
    s = seg(
        {
            "all": [
                {"contacts": {"in_segment": "vipp"}},
                {"contacts": {"in_segment": "big_accounts"}},
                {"contacts": {"in_segment": "s"}},
                {"contacts": {"role": "finance", "in_segment": "vip"}},
            ]
        }
    )
    problems = {
        p.key: p.message
        for p in check_account_segment(s, ["s", "vip", "big_accounts"], ["s", "big_accounts"])
    }
    assert "did you mean 'vip'" in problems["where.all.0.contacts.in_segment"]
    assert "segment of accounts" in problems["where.all.1.contacts.in_segment"]
    assert "segment of accounts" in problems["where.all.2.contacts.in_segment"]
    assert "where.all.3.contacts.in_segment" not in problems
    with pytest.raises(ValueError, match="in_segment"):
        seg({"contacts": {"in_segment": ""}})


ACCTS = """\
name: aa_accounts
of: accounts
where:
  contacts:
    role: decision_maker
    in_segment: {name}
"""


def test_validate_points_at_the_line_and_suggests(tmp_path: Path) -> None:
    init_project(tmp_path / "p")
    path = tmp_path / "p" / "segments" / "aa_accounts.yaml"
    path.write_text(ACCTS.format(name="lapsed_buyer"))
    problems = [str(p) for p in check_project(load_project(tmp_path / "p"))]
    want = "segments/aa_accounts.yaml:6 [where.contacts.in_segment]"
    assert any(p.startswith(want) and "did you mean 'lapsed_buyers'" in p for p in problems), (
        problems
    )
    path.write_text(ACCTS.format(name="lapsed_buyers"))
    project = load_project(tmp_path / "p")
    assert check_project(project) == []
    order = [s.name for s in segment_order(project)[0]]
    # named first alphabetically, evaluated after the segment its contacts must be in
    assert order.index("lapsed_buyers") < order.index("aa_accounts")


def _defs(raw: list[dict[str, Any]]) -> list[SegmentDef]:
    return [SegmentDef.model_validate(r) for r in raw]


CHAIN = _defs(
    [
        {"name": "buyers", "where": {"trait": "orders", "op": "gte", "value": 2}},
        {
            "name": "buying_accounts",
            "of": "accounts",
            "where": {"contacts": {"in_segment": "buyers"}, "count": {"op": "gte", "value": 2}},
        },
        {"name": "colleagues", "where": {"account_in_segment": "buying_accounts"}},
        {
            "name": "quiet_accounts",
            "of": "accounts",
            "where": {"contacts": {"in_segment": "colleagues"}, "count": {"op": "eq", "value": 0}},
        },
    ]
)
CHAIN_FIELDS = Fields(
    segments=tuple(s.name for s in CHAIN),
    account_segments=("buying_accounts", "quiet_accounts"),
)


def test_batches_put_customers_before_the_accounts_that_read_them() -> None:
    assert contact_segments(CHAIN[1]) == {"buyers"}
    assert [[s.name for s in b] for b in segment_batches(CHAIN)] == [
        ["buyers"],
        ["buying_accounts", "colleagues"],
        ["quiet_accounts"],
    ]
    # account segments that read only account traits stay in one run
    plain = _defs(
        [{"name": "a", "of": "accounts", "where": {"trait": "employees", "op": "gt", "value": 1}}]
    )
    assert [[s.name for s in b] for b in segment_batches(plain + CHAIN[:1])] == [["a", "buyers"]]


def _world(engine: Engine, orders: dict[str, int]) -> None:
    set_profiles(engine, [{"customer_id": c, "orders": n} for c, n in orders.items()])
    accounts = [f"a{i}" for i in range(4)]
    acc = [dict.fromkeys(ACCOUNTS.columns) | {"account_id": a, "name": a} for a in accounts]
    engine.replace("accounts", pa.Table.from_pylist(acc, schema=ACCOUNTS.schema.to_pyarrow()))
    contacts = [
        dict.fromkeys(ACCOUNT_CONTACTS.columns)
        | {"account_id": accounts[i % 4], "customer_id": c, "role": "user"}
        for i, c in enumerate(sorted(orders))
    ]
    engine.replace(
        "account_contacts",
        pa.Table.from_pylist(contacts, schema=ACCOUNT_CONTACTS.schema.to_pyarrow()),
    )


def _evaluate(engine: Engine, at: datetime) -> None:
    evaluate_in_batches(engine, CHAIN, CHAIN_FIELDS, Clock(at))  # as a build and a live refresh


def test_all_at_once_reads_last_runs_stays_in_batches_this_runs() -> None:
    """Why builds and live refreshes evaluate run by run: at once, an account segment reads
    its contacts' segment as it was before this evaluation (empty here)."""
    orders = {f"c{i:02d}": 3 for i in range(8)}  # everyone buys: every account has 2 buyers
    buyers, buying, _ = _expected(orders)
    assert buying
    for batched in (False, True):
        with Engine("duckdb://") as engine:
            _world(engine, orders)
            if batched:
                _evaluate(engine, NOW)
            else:
                evaluate_segments(engine, CHAIN, CHAIN_FIELDS, Clock(NOW))
            accounts = _open(engine, "account_membership", "account_id")
            assert _open(engine, SEGMENT_MEMBERSHIP.name, "customer_id")["buyers"] == buyers
            assert accounts.get("buying_accounts", set()) == (buying if batched else set())


def _open(engine: Engine, table: str, key: str) -> dict[str, set[str]]:
    m = engine.table(table)
    out: dict[str, set[str]] = {}
    for r in m.filter(m.exited_at.isnull()).to_pyarrow().to_pylist():
        out.setdefault(r["segment"], set()).add(r[key])
    return out


def _expected(orders: dict[str, int]) -> tuple[set[str], set[str], set[str]]:
    ids = sorted(orders)
    account_of = {c: f"a{i % 4}" for i, c in enumerate(ids)}
    buyers = {c for c, n in orders.items() if n >= 2}
    buying = {a for a in account_of.values() if sum(account_of[c] == a for c in buyers) >= 2}
    colleagues = {c for c in ids if account_of[c] in buying}
    return buyers, buying, colleagues


@pytest.mark.parametrize("seed", range(3))
def test_chain_in_order_and_incremental_equals_full(seed: int) -> None:
    rng = random.Random(seed)
    ids = [f"c{i:02d}" for i in range(16)]
    first = {c: rng.randint(0, 3) for c in ids}
    second = dict(first)
    moved = set(rng.sample(ids, 5))
    for c in moved:
        second[c] = rng.randint(0, 3)
    t1 = NOW + timedelta(hours=1)
    stays = []
    for incremental in (True, False):
        with Engine("duckdb://") as engine:
            _world(engine, first)
            _evaluate(engine, NOW)
            _world(engine, second)
            if incremental:
                ch = pa.table({"customer_id": pa.array(sorted(moved), pa.string())})
                with engine.temporary(ch) as changed:
                    evaluate_changed(
                        engine, CHAIN, CHAIN_FIELDS, Clock(t1), changed=changed, since=NOW
                    )
            else:
                _evaluate(engine, t1)
            people = _open(engine, SEGMENT_MEMBERSHIP.name, "customer_id")
            accounts = _open(engine, "account_membership", "account_id")
            buyers, buying, colleagues = _expected(second)
            assert people.get("buyers", set()) == buyers
            assert accounts.get("buying_accounts", set()) == buying
            assert people.get("colleagues", set()) == colleagues
            quiet = {f"a{i}" for i in range(4)} - buying
            assert accounts.get("quiet_accounts", set()) == quiet
            m = engine.table(SEGMENT_MEMBERSHIP.name)
            stays.append(m.order_by(["segment", "customer_id", "entered_at"]).to_pyarrow())
    assert table_differences(stays[0], stays[1]) == []


def test_a_cycle_through_contacts_is_an_error(tmp_path: Path) -> None:
    init_project(tmp_path / "p")
    segs = tmp_path / "p" / "segments"
    (segs / "aa_accounts.yaml").write_text(ACCTS.format(name="their_people"))
    (segs / "their_people.yaml").write_text(
        "name: their_people\nwhere: {account_in_segment: aa_accounts}\n"
    )
    problems = [str(p) for p in check_project(load_project(tmp_path / "p"))]
    assert any("cycle" in p and "aa_accounts" in p for p in problems), problems
