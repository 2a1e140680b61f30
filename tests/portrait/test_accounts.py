"""Accounts (B2B): group calls build account profiles; contacts carry roles."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import ibis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop.core.clock import Clock
from closedloop.core.definitions.accounts import AccountsConfig, load_accounts
from closedloop.core.engine import Engine
from closedloop.core.errors import DefinitionError
from closedloop.identity.resolve import resolve
from closedloop.portrait.accounts import build_accounts, role_of, role_python
from closedloop.portrait.build import build_profiles
from tests.conftest import add_events
from tests.identity.test_resolve import CONFIG

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)


def at(days_ago: float) -> datetime:
    return NOW - timedelta(days=days_ago)


def group(
    mid: str, user: str, gid: str, days_ago: float, traits: dict[str, Any], **ctx: Any
) -> dict[str, Any]:
    return {
        "message_id": mid,
        "user_id": user,
        "type": "group",
        "timestamp": at(days_ago),
        "properties": {"groupId": gid, "traits": traits},
        **({"traits": ctx} if ctx else {}),
    }


def track(
    mid: str, user: str, event: str, days_ago: float, gid: str | None = None, **kw: Any
) -> dict[str, Any]:
    m: dict[str, Any] = {
        "message_id": mid,
        "user_id": user,
        "event": event,
        "timestamp": at(days_ago),
        **kw,
    }
    if gid is not None:
        m["context"] = {"groupId": gid}
    return m


MESSAGES: list[dict[str, Any]] = [
    group("g1", "A", "acme", 30, {"name": "Acme", "industry": "Retail", "employees": 120}),
    # a later call states only some fields: the others stay as known
    group("g2", "B", "acme", 10, {"employees": "250", "region": "East"}, role="Finance Manager"),
    group("g3", "C", "acme", 5, {"industry": "Tea", "current_software": "Excel"}),
    group("g4", "A", "zeta", 3, {"name": "Zeta Ltd", "size": "1-10"}, role="Owner"),
    {
        "message_id": "i1",
        "user_id": "A",
        "type": "identify",
        "timestamp": at(40),
        "traits": {"title": "CEO & Founder"},
    },
    {
        "message_id": "i2",
        "user_id": "C",
        "type": "identify",
        "timestamp": at(40),
        "traits": {"title": "IT administrator"},
    },
    track("t1", "A", "Order Completed", 8, "acme", order_id="o1", revenue=100.0),
    track("t2", "A", "Order Completed", 2, "zeta", order_id="o2", revenue=7.5),
    # naming no account: counts for every account of A
    track("t3", "A", "Order Completed", 1, None, order_id="o3", revenue=1.0),
    track("t4", "B", "Demo Requested", 4, "acme"),
    # D never sent a group call: not a contact, even naming the account
    track("t5", "D", "Order Completed", 4, "acme", order_id="o4", revenue=999.0),
    # after the clock: not seen
    track("t6", "B", "Order Completed", -1, "acme", order_id="o5", revenue=50.0),
]


def member_of(engine: Engine) -> dict[str, str]:
    m = engine.table("identity_map").to_pyarrow().to_pylist()
    return {r["customer_id"]: r["id_value"] for r in m if r["id_type"] == "member_id"}


@pytest.fixture
def built(engine: Engine) -> Engine:
    add_events(engine, MESSAGES)
    resolve(engine, CONFIG, Clock(NOW))
    build_profiles(engine, Clock(NOW))
    return engine


def test_account_traits_merge_per_field_and_behaviour(built: Engine) -> None:
    rows = {r["account_id"]: r for r in built.table("accounts").to_pyarrow().to_pylist()}
    assert set(rows) == {"acme", "zeta"}
    acme = rows["acme"]
    assert acme["name"] == "Acme"
    assert acme["industry"] == "Tea"  # the latest stated
    assert acme["employees"] == 250  # text in the later call, read as a number
    assert acme["region"] == "East"
    assert acme["current_software"] == "Excel"
    assert acme["size"] is None
    assert acme["contacts"] == 3
    assert (acme["decision_makers"], acme["finance_contacts"], acme["it_contacts"]) == (1, 1, 1)
    assert acme["user_contacts"] == 0
    # o1 (names acme) and o3 (names none); not o2 (zeta), o4 (not a contact), o5 (future)
    assert acme["orders"] == 2
    assert acme["revenue"] == pytest.approx(101.0)
    assert acme["last_active"] == at(1)
    assert acme["first_seen"] == at(30) and acme["last_seen"] == at(5)
    zeta = rows["zeta"]
    assert (zeta["orders"], zeta["revenue"], zeta["contacts"]) == (2, 8.5, 1)
    assert zeta["decision_makers"] == 1


def test_contacts_roles_and_seen(built: Engine) -> None:
    members = member_of(built)
    rows = built.table("account_contacts").to_pyarrow().to_pylist()
    got = {(r["account_id"], members[r["customer_id"]]): r for r in rows}
    assert set(got) == {("acme", "A"), ("acme", "B"), ("acme", "C"), ("zeta", "A")}
    # group-call role first, identify title second, per the default sources
    assert got["acme", "B"]["role"] == "finance"
    assert got["acme", "A"]["role"] == "decision_maker"
    assert got["acme", "A"]["role_text"] == "CEO & Founder"
    assert got["zeta", "A"]["role_text"] == "Owner"
    assert got["acme", "C"]["role"] == "it"
    # seen over the group call and the events naming the account
    assert got["acme", "A"]["first_seen"] == at(30)
    assert got["acme", "A"]["last_seen"] == at(8)
    assert got["acme", "B"]["last_seen"] == at(4)


def test_declared_mapping_is_used(engine: Engine) -> None:
    add_events(engine, MESSAGES)
    resolve(engine, CONFIG, Clock(NOW))
    config = AccountsConfig.model_validate(
        {
            "role_sources": [{"from": "identify", "trait": "title"}],
            "role_rules": [{"role": "finance", "match": ["founder"]}],
            "default_role": "it",
        }
    )
    build_accounts(engine, NOW, config)
    roles = {
        (r["account_id"], r["role"])
        for r in engine.table("account_contacts").to_pyarrow().to_pylist()
    }
    assert roles == {("acme", "finance"), ("acme", "it"), ("zeta", "finance")}


def test_no_group_calls_gives_empty_tables(engine: Engine) -> None:
    add_events(engine, [track("t1", "A", "Order Completed", 2, "acme", order_id="o", revenue=1.0)])
    resolve(engine, CONFIG, Clock(NOW))
    assert build_accounts(engine, NOW) == 0
    assert engine.count("accounts") == 0 and engine.count("account_contacts") == 0


def test_a_build_without_the_calls_empties_the_tables(built: Engine) -> None:
    assert built.count("accounts") == 2
    assert build_accounts(built, at(100)) == 0  # before any group call
    assert built.count("account_contacts") == 0


WORDS = st.sampled_from(
    [
        "IT",
        "it",
        "Chief",
        "Financial",
        "Officer",
        "CEO",
        "ceo.",
        "head",
        "of",
        "Digital",
        "marketing",
        "Owner",
        "-",
        "&",
        "/",
        "controller",
        "Édith",
        "cto",
        "user",
        "  ",
    ]
)


@pytest.fixture(scope="module")
def duck() -> Iterator[Engine]:
    with Engine("duckdb://") as e:
        yield e


@given(text=st.lists(WORDS, max_size=5).map(" ".join) | st.none())
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_role_mapping_agrees_with_python(duck: Engine, text: str | None) -> None:
    config = AccountsConfig()
    value = duck.con.execute(role_of(ibis.literal(text, type="string"), config))
    assert value == role_python(text, config)


def test_accounts_yaml_errors_point_at_the_line(tmp_path: Path) -> None:
    (tmp_path / "accounts.yaml").write_text(
        "role_sources:\n  - {from: crm, trait: title}\nrole_rules:\n"
        "  - {role: boss, match: [ceo]}\n  - {role: it, match: ['--']}\n"
    )
    with pytest.raises(DefinitionError) as err:
        load_accounts(tmp_path)
    text = str(err.value)
    assert "accounts.yaml:2 [role_sources.0.from]" in text
    assert "accounts.yaml:4 [role_rules.0.role]" in text
    assert "accounts.yaml:5 [role_rules.1.match]" in text and "no letters or digits" in text
    assert load_accounts(tmp_path / "nowhere") == AccountsConfig()


@pytest.mark.parametrize("incremental", [False, True])
def test_refresh_reads_roles_as_declared(engine: Engine, incremental: bool) -> None:
    """The project's accounts.yaml reaches the build through refresh, full and incremental."""
    from closedloop.portrait.refresh import refresh

    config = AccountsConfig.model_validate(
        {
            "role_sources": [{"from": "identify", "trait": "title"}],
            "role_rules": [{"role": "finance", "match": ["founder"]}],
            "default_role": "it",
        }
    )
    add_events(engine, MESSAGES)
    resolve(engine, CONFIG, Clock(NOW))
    if incremental:  # a first build with the defaults, then an incremental pass
        refresh(engine, {}, Clock(NOW - timedelta(hours=1)))
    result = refresh(engine, {}, Clock(NOW), accounts=config)
    assert result.mode == ("incremental" if incremental else "full")
    roles = {
        (r["account_id"], r["role"])
        for r in engine.table("account_contacts").to_pyarrow().to_pylist()
    }
    assert roles == {("acme", "finance"), ("acme", "it"), ("zeta", "finance")}
