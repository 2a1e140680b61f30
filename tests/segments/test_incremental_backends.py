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
from closedloop.segments import incremental
from closedloop.segments.accounts import ACCOUNT_MEMBERSHIP
from closedloop.segments.audience import evaluate_segments
from closedloop.segments.incremental import evaluate_changed
from closedloop.segments.tables import SEGMENT_MEMBERSHIP
from tests.segments import test_account_contact_segments as chain
from tests.segments.test_incremental import (
    FIELDS,
    T0,
    _bands,
    _segments,
    _stays,
    random_changes,
)
from tests.tags.helpers import set_profiles
from tests.tags.test_incremental_backends import typed_events
from tests.test_backends import postgres_url  # noqa: F401  (the fixture that starts PostgreSQL)


@pytest.fixture(autouse=True, params=["narrow", "wide"])
def share(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both paths (``incremental.WIDE``): only the customers in scope, or everyone."""
    monkeypatch.setattr(incremental, "WIDE", 1.0 if request.param == "narrow" else 0.0)


def _state(engine: Engine, s: dict[str, Any], at: Any) -> None:
    set_profiles(engine, s["profiles"])
    typed_events(engine, s["events"])
    _bands(engine, s["bands"], at)


def check_random_changes(url: str, seed: int) -> None:
    """Incremental == full on the engine at ``url`` after test_incremental's random changes."""
    segs = _segments()
    t1 = T0 + timedelta(hours=[1, 5, 26][seed % 3])
    first, second, changed = random_changes(random.Random(seed), t1)
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
