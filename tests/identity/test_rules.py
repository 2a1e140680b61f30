"""Over-merge rules, and the properties the issue asks of the whole resolution.

The property tests run the real ``resolve`` on DuckDB over random event logs; their
references are independent of the code under test (a plain union-find over the message
pairs, or a direct check of the rule on the resulting customers).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop.core.definitions import IdentityConfig
from closedloop.core.engine import Engine
from closedloop.identity.explain import split
from closedloop.identity.resolve import resolve
from tests.conftest import add_events
from tests.identity.test_resolve import customer_of

TYPES: list[dict[str, Any]] = [
    {"name": "member_id", "priority": 100, "strong": True, "paths": ["user_id"]},
    {
        "name": "phone",
        "normaliser": "phone",
        "priority": 90,
        "strong": True,
        "paths": ["traits.phone"],
    },
    {
        "name": "email",
        "normaliser": "email",
        "priority": 80,
        "strong": True,
        "paths": ["traits.email"],
    },
    {
        "name": "advertising_id",
        "priority": 15,
        "strong": False,
        "paths": ["context.device.advertisingId"],
    },
    {"name": "anonymous_id", "priority": 10, "strong": False, "paths": ["anonymous_id"]},
]
JUNK = ["null", "undefined", "0", "anonymous", "test@test.com", "13800000000"]


def config(**rules: Any) -> IdentityConfig:
    types = [dict(t) for t in TYPES]
    for t in types:
        if t["name"] in rules.get("limits", {}):
            t["max_per_customer"] = rules["limits"][t["name"]]
    return IdentityConfig.model_validate(
        {
            "types": types,
            "blocked_values": JUNK,
            "blocked_patterns": ["^test@"],
            "never_link": rules.get("never", []),
        }
    )


PLAIN = config()
RULED = config(limits={"member_id": 1, "phone": 2}, never=[["phone", "advertising_id"]])


def partition(engine: Engine) -> set[frozenset[tuple[str, str]]]:
    m = engine.table("identity_map").to_pandas()
    groups = m.groupby("customer_id")[["id_type", "id_value"]]
    return {frozenset(zip(g["id_type"], g["id_value"], strict=True)) for _, g in groups}


# ---- the rules, on hand-made cases -----------------------------------------------------------
def test_max_per_customer_drops_the_weakest_link_and_records_it(engine: Engine) -> None:
    add_events(
        engine,
        [
            {"message_id": "a", "user_id": "M1", "traits": {"email": "e@x.cn"}},
            {"message_id": "b", "user_id": "M1", "traits": {"email": "e@x.cn"}},
            {"message_id": "c", "user_id": "M2", "traits": {"email": "e@x.cn"}},
        ],
    )
    r = resolve(engine, RULED)
    assert customer_of(engine, "email", "e@x.cn") == customer_of(engine, "member_id", "M1")
    assert customer_of(engine, "member_id", "M2") != customer_of(engine, "member_id", "M1")
    assert r.dropped == 1
    d = engine.table("identity_dropped_links").to_pandas()
    assert d[["a_value", "b_value", "message_id", "rule"]].values.tolist() == [
        ["e@x.cn", "M2", "c", "max_per_customer member_id=1"]
    ]
    e = engine.table("identity_edges").to_pandas()
    assert e.loc[e["b_value"] == "M2", "status"].tolist() == [
        "dropped: max_per_customer member_id=1"
    ]
    # Without the rule the two members merge.
    other = Engine("duckdb://")
    add_events(
        other,
        [
            {"message_id": m, **v}
            for m, v in [
                ("a", {"user_id": "M1", "traits": {"email": "e@x.cn"}}),
                ("c", {"user_id": "M2", "traits": {"email": "e@x.cn"}}),
            ]
        ],
    )
    resolve(other, PLAIN)
    assert customer_of(other, "member_id", "M2") == customer_of(other, "member_id", "M1")
    other.close()


def test_never_link_holds_even_through_other_identifiers(engine: Engine) -> None:
    add_events(
        engine,
        [
            {"user_id": "M1", "traits": {"phone": "13800138000"}},
            {"anonymous_id": "ck", "traits": {"phone": "13800138000"}},
            {"anonymous_id": "ck", "context": {"device": {"advertisingId": "IDFA-1"}}},
            {"user_id": "M1", "anonymous_id": "ck"},
        ],
    )
    r = resolve(engine, RULED)
    assert customer_of(engine, "advertising_id", "IDFA-1") != customer_of(engine, "member_id", "M1")
    assert r.dropped >= 1
    rules = set(engine.table("identity_dropped_links").to_pandas()["rule"])
    assert rules == {"never_link phone~advertising_id"}


# ---- random event logs ----------------------------------------------------------------------
def _phone(i: int) -> str:
    return f"1390000{i:04d}"


@st.composite
def event_logs(draw: Callable[..., Any], junk: bool = False) -> list[dict[str, Any]]:
    """Messages carrying 1–3 identifiers drawn from small pools, so links are frequent."""
    pools: dict[str, list[str]] = {
        "user_id": [f"M{i}" for i in range(6)],
        "phone": [_phone(i) for i in range(5)],
        "email": [f"u{i}@x.cn" for i in range(5)],
        "adid": [f"AD{i}" for i in range(3)],
        "anonymous_id": [f"ck{i}" for i in range(6)],
    }
    n = draw(st.integers(1, 14))
    out = []
    for i in range(n):
        kinds = draw(st.lists(st.sampled_from(sorted(pools)), min_size=1, max_size=3, unique=True))
        m: dict[str, Any] = {"message_id": f"m{i:03d}", "traits": {}}
        for k in kinds:
            v = draw(st.sampled_from(pools[k] + (JUNK if junk else [])))
            if k in ("phone", "email"):
                m["traits"][k] = v
            elif k == "adid":
                m["context"] = {"device": {"advertisingId": v}}
            else:
                m[k] = v
        out.append(m)
    return out


def _union_find(messages: list[dict[str, Any]], cut: set[frozenset[str]]) -> set[frozenset[str]]:
    """Reference partition: identifiers of one message are one person, minus ``cut`` links."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            x = parent[x]
        return x

    for m in messages:
        ids = [f"member_id:{m['user_id']}"] if "user_id" in m else []
        ids += [f"anonymous_id:{m['anonymous_id']}"] if "anonymous_id" in m else []
        ids += [f"email:{m['traits']['email']}"] if "email" in m["traits"] else []
        ids += [f"phone:+86{m['traits']['phone']}"] if "phone" in m["traits"] else []
        if "context" in m:
            ids.append(f"advertising_id:{m['context']['device']['advertisingId']}")
        for x in ids:
            find(x)
        for x in ids:
            for y in ids:
                if x < y and frozenset((x, y)) not in cut:
                    parent[find(x)] = find(y)
    groups: dict[str, set[str]] = {}
    for x in parent:
        groups.setdefault(find(x), set()).add(x)
    return {frozenset(g) for g in groups.values()}


def _as_text(p: set[frozenset[tuple[str, str]]]) -> set[frozenset[str]]:
    return {frozenset(f"{t}:{v}" for t, v in g) for g in p}


SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(event_logs(junk=True))
def test_junk_values_never_join_two_customers(messages: list[dict[str, Any]]) -> None:
    with Engine("duckdb://") as engine:
        add_events(engine, messages)
        resolve(engine, PLAIN)
        got = _as_text(partition(engine))
    # Reference: drop every junk value from the messages, then link what is left.
    clean = []
    for m in messages:
        c = {k: v for k, v in m.items() if not (isinstance(v, str) and v in JUNK)}
        c["traits"] = {k: v for k, v in m["traits"].items() if v not in JUNK}
        if "context" in m and m["context"]["device"]["advertisingId"] in JUNK:
            del c["context"]
        clean.append(c)
    assert got == _union_find(clean, set())


def rules_kept(engine: Engine) -> None:
    """RULED's limits and never-link pair hold on every customer of ``engine``."""
    m = engine.table("identity_map").to_pandas()
    per = m.groupby(["customer_id", "id_type"]).size().unstack(fill_value=0)
    for t, limit in (("member_id", 1), ("phone", 2)):
        if t in per:
            assert (per[t] <= limit).all()
    if "phone" in per and "advertising_id" in per:
        assert not ((per["phone"] > 0) & (per["advertising_id"] > 0)).any()


def test_rules_kept_sees_a_broken_rule() -> None:
    """The check the property below makes can fail: PLAIN merges what RULED forbids."""
    with Engine("duckdb://") as engine:
        add_events(
            engine,
            [{"user_id": "M1", "anonymous_id": "ck"}, {"user_id": "M2", "anonymous_id": "ck"}],
        )
        resolve(engine, PLAIN)
        with pytest.raises(AssertionError):
            rules_kept(engine)


@pytest.mark.slow
@SETTINGS
@given(event_logs(), st.randoms(use_true_random=False), st.integers(1, 4))
def test_same_clusters_whatever_the_order_and_increments(
    messages: list[dict[str, Any]], rnd: random.Random, pieces: int
) -> None:
    """Also the rules are never broken, by a run over the whole log or run by run (this
    was a test of its own, over the same random logs, resolving the same whole log)."""
    with Engine("duckdb://") as whole:
        add_events(whole, messages)
        resolve(whole, RULED)
        rules_kept(whole)
        expected = partition(whole)
    shuffled = list(messages)
    rnd.shuffle(shuffled)
    cuts = sorted(rnd.sample(range(1, len(shuffled) + 1), min(pieces, len(shuffled))))
    with Engine("duckdb://") as inc:
        start = 0
        for end in cuts:
            if end > start:
                add_events(inc, shuffled[start:end])
                resolve(inc, RULED)
            start = end
        if start < len(shuffled):
            add_events(inc, shuffled[start:])
            resolve(inc, RULED)
        assert partition(inc) == expected
        rules_kept(inc)


@pytest.mark.slow
@SETTINGS
@given(event_logs(), st.randoms(use_true_random=False))
def test_split_then_rebuild_gives_what_the_rules_say(
    messages: list[dict[str, Any]], rnd: random.Random
) -> None:
    messages = [{k: v for k, v in m.items() if k != "context"} for m in messages]
    with Engine("duckdb://") as engine:
        add_events(engine, messages)
        resolve(engine, PLAIN)
        e = engine.table("identity_edges").to_pandas()
        if e.empty:
            return
        row = e.iloc[rnd.randrange(len(e))]
        a, b = f"{row['a_type']}:{row['a_value']}", f"{row['b_type']}:{row['b_value']}"
        split(engine, PLAIN, edge=f"{a}~{b}", block=True)
        after = _as_text(partition(engine))
        blocks = engine.table("identity_blocks").to_pyarrow()
    # Rebuild from nothing with the same events and the same block.
    with Engine("duckdb://") as fresh:
        add_events(fresh, messages)
        fresh.append("identity_blocks", blocks)
        resolve(fresh, PLAIN)
        assert _as_text(partition(fresh)) == after
    assert after == _union_find(messages, {frozenset((a, b))})


def test_partition_helper_sees_customers(engine: Engine) -> None:
    add_events(engine, [{"user_id": "M1", "anonymous_id": "ck1"}, {"user_id": "M2"}])
    resolve(engine, PLAIN)
    assert partition(engine) == {
        frozenset({("member_id", "M1"), ("anonymous_id", "ck1")}),
        frozenset({("member_id", "M2")}),
    }
    assert isinstance(engine.table("identity_map").to_pandas(), pd.DataFrame)
