"""Each resolution records which customers changed (``identity_changes``) and how."""

from __future__ import annotations

from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.identity.resolve import resolve
from tests.conftest import add_events
from tests.identity.test_resolve import CONFIG, customer_of


def _changes(engine: Engine, run_id: str) -> dict[str, str]:
    t = engine.table("identity_changes")
    rows = t.filter(t.run_id == run_id).to_pyarrow().to_pylist()
    return {r["customer_id"]: r["change"] for r in rows}


def test_changes_name_new_grown_and_merged_customers(engine: Engine) -> None:
    add_events(
        engine,
        [
            {"message_id": "a", "user_id": "M1", "traits": {"email": "a@x.cn"}},
            {"message_id": "b", "user_id": "M2", "anonymous_id": "ck2"},
            {"message_id": "c", "user_id": "M3"},
        ],
    )
    first = resolve(engine, CONFIG, Clock())
    m1, m2, m3 = (customer_of(engine, "member_id", m) for m in ("M1", "M2", "M3"))
    assert _changes(engine, first.run_id) == {m1: "new", m2: "new", m3: "new"}
    assert first.changed == {m1, m2, m3}

    # M1 gains a cookie; M2 and M3 are joined by a phone; nothing else changes.
    add_events(
        engine,
        [
            {"message_id": "d", "user_id": "M1", "anonymous_id": "ck1"},
            {"message_id": "e", "user_id": "M2", "traits": {"phone": "13900001111"}},
            {"message_id": "f", "user_id": "M3", "traits": {"phone": "13900001111"}},
        ],
    )
    second = resolve(engine, CONFIG, Clock())
    got = _changes(engine, second.run_id)
    assert got[m1] == "grown"
    survivor = customer_of(engine, "member_id", "M3")
    assert survivor == customer_of(engine, "member_id", "M2")
    loser = ({m2, m3} - {survivor}).pop()
    assert got[survivor] == "grown" and got[loser] == "merged"
    assert set(got) == {m1, m2, m3} == second.changed

    # A run over the same events changes nobody.
    third = resolve(engine, CONFIG, Clock())
    assert _changes(engine, third.run_id) == {} and third.changed == frozenset()
