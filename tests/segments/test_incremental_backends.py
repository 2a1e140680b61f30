"""Incremental segments equal a full evaluation on PostgreSQL too: the randomised changes of
``tests/segments/test_incremental.py``, and the account chain of
``test_account_contact_segments``, on one real database (the stays after the first
evaluation are put back before the full one)."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pytest

from closedloop.core.clock import Clock
from closedloop.core.engine import Engine, table_differences
from closedloop.segments.accounts import ACCOUNT_MEMBERSHIP
from closedloop.segments.audience import evaluate_segments
from closedloop.segments.incremental import evaluate_changed
from closedloop.segments.tables import SEGMENT_MEMBERSHIP
from tests.segments import test_account_contact_segments as chain
from tests.segments.test_incremental import (
    FIELDS,
    T0,
    _bands,
    _events,
    _profiles,
    _segments,
    _stays,
)
from tests.tags.helpers import set_profiles
from tests.tags.test_incremental_backends import typed_events
from tests.test_backends import postgres_url  # noqa: F401  (the fixture that starts PostgreSQL)


def _state(engine: Engine, s: dict[str, Any], at: Any) -> None:
    set_profiles(engine, s["profiles"])
    typed_events(engine, s["events"])
    _bands(engine, s["bands"], at)


def _world(rng: random.Random) -> tuple[dict[str, Any], dict[str, Any], set[str]]:
    """Two states of a warehouse and the customers changed between (as test_incremental)."""
    ids = [f"c{i}" for i in range(40)]
    first: dict[str, Any] = {
        "profiles": _profiles(rng, ids),
        "events": _events(rng, ids, 150, 0, T0),
        "bands": {c: rng.choice(["gold", "grey"]) for c in rng.sample(ids, 25)},
    }
    profiles = {p["customer_id"]: p for p in first["profiles"]}
    changed = set(rng.sample(ids, 4))
    for c in changed:
        profiles[c] = _profiles(rng, [c])[0]
    gone = set(rng.sample(sorted(set(ids) - changed), 3))
    for c in gone:
        del profiles[c]
    for p in _profiles(rng, ["n1", "n2"]):
        profiles[p["customer_id"]] = p
    alive = sorted(profiles)
    bands = {c: v for c, v in first["bands"].items() if c not in gone}
    for c in rng.sample(alive, 4):
        changed.add(c)
        bands[c] = rng.choice(["gold", "grey"])
    events = []
    for e in first["events"]:
        if e["user_id"] in gone or rng.random() < 0.04:
            changed.add(e["user_id"])
            if rng.random() < 0.5:
                continue
            e = e | {"user_id": rng.choice(alive)}
            changed.add(e["user_id"])
        events.append(e)
    added = _events(rng, alive, 10, 1000, T0 + timedelta(hours=5))
    changed |= {e["user_id"] for e in added} | gone | {"n1", "n2"}
    second = {"profiles": [profiles[c] for c in alive], "events": events + added, "bands": bands}
    return first, second, changed


def check_random_changes(url: str, seed: int) -> None:
    """Incremental == full on the engine at ``url`` after test_incremental's random changes."""
    rng = random.Random(seed)
    first, second, changed = _world(rng)
    segs = _segments()
    t1 = T0 + timedelta(hours=[1, 5, 26][seed % 3])
    with Engine(url) as engine:
        engine.replace(
            SEGMENT_MEMBERSHIP.name, SEGMENT_MEMBERSHIP.schema.to_pyarrow().empty_table()
        )
        _state(engine, first, T0)
        evaluate_segments(engine, segs, FIELDS, Clock(T0))
        before = _stays(engine)
        _state(engine, second, t1)
        ids = pa.table({"customer_id": pa.array(sorted(changed), pa.string())})
        with engine.temporary(ids) as ch:
            inc = evaluate_changed(engine, segs, FIELDS, Clock(t1), changed=ch, since=T0)
        inc_stays = _stays(engine)
        engine.replace(SEGMENT_MEMBERSHIP.name, before)
        full = evaluate_segments(engine, segs, FIELDS, Clock(t1))
        full_stays = _stays(engine)
    assert table_differences(inc_stays, full_stays) == []
    assert inc == full
    assert any(r.entered or r.exited for r in full.values())  # something moved


def check_account_chain(url: str) -> None:
    """The contacts-segment chain (customers → accounts → customers → accounts) on ``url``:
    right members, and incremental == full."""
    rng = random.Random(7)
    ids = [f"c{i:02d}" for i in range(16)]
    first = {c: rng.randint(0, 3) for c in ids}
    second = first | {c: rng.randint(0, 3) for c in rng.sample(ids, 6)}
    moved = {c for c in ids if first[c] != second[c]}
    t1 = chain.NOW + timedelta(hours=1)
    with Engine(url) as engine:
        for name, spec in (
            (SEGMENT_MEMBERSHIP.name, SEGMENT_MEMBERSHIP),
            (ACCOUNT_MEMBERSHIP.name, ACCOUNT_MEMBERSHIP),
        ):
            engine.replace(name, spec.schema.to_pyarrow().empty_table())
        chain._world(engine, first)
        chain._evaluate(engine, chain.NOW)
        people = engine.table(SEGMENT_MEMBERSHIP.name).to_pyarrow()
        accounts = engine.table(ACCOUNT_MEMBERSHIP.name).to_pyarrow()
        chain._world(engine, second)
        with engine.temporary(
            pa.table({"customer_id": pa.array(sorted(moved), pa.string())})
        ) as ch:
            evaluate_changed(
                engine, chain.CHAIN, chain.CHAIN_FIELDS, Clock(t1), changed=ch, since=chain.NOW
            )
        inc = _stays(engine)
        _, buying, colleagues = chain._expected(second)
        assert (
            chain._open(engine, SEGMENT_MEMBERSHIP.name, "customer_id").get("colleagues", set())
            == colleagues
        )
        engine.replace(SEGMENT_MEMBERSHIP.name, people)
        engine.replace(ACCOUNT_MEMBERSHIP.name, accounts)
        chain._evaluate(engine, t1)
        assert table_differences(inc, _stays(engine)) == []
        assert (
            chain._open(engine, ACCOUNT_MEMBERSHIP.name, "account_id").get("buying_accounts", set())
            == buying
        )


@pytest.mark.postgres
@pytest.mark.parametrize("seed", range(3))
def test_incremental_segments_equal_full_on_postgres(postgres_url: str, seed: int) -> None:  # noqa: F811
    check_random_changes(postgres_url, seed)


@pytest.mark.postgres
def test_account_chain_incremental_equals_full_on_postgres(postgres_url: str) -> None:  # noqa: F811
    check_account_chain(postgres_url)
