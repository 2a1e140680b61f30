from __future__ import annotations

from closedloop.core.definitions import IdentityConfig
from closedloop.core.engine import Engine
from closedloop.identity.resolve import resolve, resolve_customer
from tests.conftest import add_events

CONFIG = IdentityConfig.model_validate(
    {
        "default_region": "CN",
        "types": [
            {"name": "member_id", "priority": 100, "strong": True, "paths": ["user_id"]},
            {
                "name": "phone",
                "normaliser": "phone",
                "priority": 90,
                "strong": True,
                "paths": ["traits.phone"],
                "max_strong_neighbours": 3,
            },
            {
                "name": "email",
                "normaliser": "email",
                "priority": 80,
                "strong": True,
                "paths": ["traits.email"],
            },
            {
                "name": "anonymous_id",
                "priority": 10,
                "strong": False,
                "paths": ["anonymous_id"],
                "max_strong_neighbours": 1,
            },
        ],
        "blocked_values": ["null", "undefined", "0", "test@test.com"],
    }
)


def customer_of(engine: Engine, id_type: str, value: str) -> str:
    m = engine.table("identity_map")
    got = m.filter((m.id_type == id_type) & (m.id_value == value)).to_pyarrow()
    assert got.num_rows == 1, (id_type, value)
    return str(got["customer_id"][0])


def test_phone_formats_and_email_case_link_one_customer(engine: Engine) -> None:
    add_events(
        engine,
        [
            {"anonymous_id": "ck1", "type": "identify", "traits": {"phone": "138-0013-8000"}},
            {
                "user_id": "M1",
                "type": "identify",
                "traits": {"phone": "+86 138 0013 8000", "email": " Li.Wei@QQ.com "},
            },
            {"anonymous_id": "ck2", "type": "identify", "traits": {"email": "li.wei@qq.com"}},
            {"user_id": "M2", "type": "identify", "traits": {"email": "li.wei@163.com"}},
        ],
    )
    r = resolve(engine, CONFIG)
    c = customer_of(engine, "phone", "+8613800138000")
    assert customer_of(engine, "anonymous_id", "ck1") == c
    assert customer_of(engine, "member_id", "M1") == c
    assert customer_of(engine, "email", "li.wei@qq.com") == c
    assert customer_of(engine, "anonymous_id", "ck2") == c
    # Same user name at another provider is another person.
    assert customer_of(engine, "member_id", "M2") != c
    assert r.customers == 2


def test_blocked_values_never_link(engine: Engine) -> None:
    add_events(
        engine,
        [
            {
                "user_id": "M1",
                "anonymous_id": "undefined",
                "type": "identify",
                "traits": {"email": "test@test.com"},
            },
            {
                "user_id": "M2",
                "anonymous_id": "undefined",
                "type": "identify",
                "traits": {"email": "TEST@test.com"},
            },
        ],
    )
    resolve(engine, CONFIG)
    assert customer_of(engine, "member_id", "M1") != customer_of(engine, "member_id", "M2")
    issues = engine.table("identifier_issues").to_pandas()
    assert set(issues["reason"]) == {"blocked value"}


def test_shared_device_is_quarantined_not_merged(engine: Engine) -> None:
    add_events(
        engine,
        [
            {"user_id": "M1", "anonymous_id": "tablet"},
            {"user_id": "M2", "anonymous_id": "tablet"},
            {"user_id": "M3", "anonymous_id": "tablet"},
            {"anonymous_id": "tablet", "event": "Product Viewed"},
        ],
    )
    r = resolve(engine, CONFIG)
    ids = {customer_of(engine, "member_id", m) for m in ("M1", "M2", "M3")}
    assert len(ids) == 3
    assert r.quarantined == 1
    assert customer_of(engine, "anonymous_id", "tablet") not in ids
    # Each member's events stay with the member, not the tablet.
    ec = engine.table("event_customers").to_pandas().set_index("message_id")["customer_id"]
    assert ec["m0"] == customer_of(engine, "member_id", "M1")


def test_invalid_phone_is_refused_with_reason(engine: Engine) -> None:
    add_events(engine, [{"user_id": "M1", "type": "identify", "traits": {"phone": "12345"}}])
    resolve(engine, CONFIG)
    issues = engine.table("identifier_issues").to_pandas()
    assert issues.iloc[0]["raw_value"] == "12345"
    assert issues.iloc[0]["reason"].startswith("invalid phone")


def test_ids_are_stable_and_merges_leave_aliases(engine: Engine) -> None:
    add_events(
        engine, [{"message_id": "a", "user_id": "M1"}, {"message_id": "b", "anonymous_id": "ck9"}]
    )
    resolve(engine, CONFIG)
    c1 = customer_of(engine, "member_id", "M1")
    c2 = customer_of(engine, "anonymous_id", "ck9")
    assert c1 != c2
    # A rerun with no new data changes nothing.
    resolve(engine, CONFIG)
    assert customer_of(engine, "member_id", "M1") == c1
    # The cookie logs in: the two customers merge; the larger/older survives, the other is an alias.
    add_events(engine, [{"message_id": "c", "user_id": "M1", "anonymous_id": "ck9"}])
    r = resolve(engine, CONFIG)
    survivor = customer_of(engine, "member_id", "M1")
    assert customer_of(engine, "anonymous_id", "ck9") == survivor
    assert survivor in (c1, c2)
    merged = c2 if survivor == c1 else c1
    assert resolve_customer(engine, merged) == survivor
    ledger = engine.table("merge_ledger").to_pandas()
    assert r.merges == 1 and len(ledger) == 1
    assert "member_id:M1" in ledger.iloc[0]["evidence"] and "ck9" in ledger.iloc[0]["evidence"]


def test_new_cluster_id_does_not_depend_on_run_order(engine: Engine) -> None:
    add_events(engine, [{"user_id": "M7", "type": "identify", "traits": {"email": "a@b.cn"}}])
    resolve(engine, CONFIG)
    first = customer_of(engine, "member_id", "M7")
    other = Engine("duckdb://")
    add_events(other, [{"user_id": "M7", "type": "identify", "traits": {"email": "a@b.cn"}}])
    resolve(other, CONFIG)
    assert customer_of(other, "member_id", "M7") == first
