"""Identity records a customer whose identifier is quarantined or lifted in place.

The live refresh serves anew only the customers identity recorded as changed since the
last refresh (``serving.changes.plan_changes`` by key), so a quarantine that moves no
identifier to another customer must be recorded as well: the served profile shows which
identifiers are quarantined.
"""

from __future__ import annotations

from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.identity.resolve import resolve
from tests.conftest import add_events
from tests.identity.test_resolve import CONFIG, customer_of


def _changed(engine: Engine, run_id: str) -> set[str]:
    t = engine.table("identity_changes")
    return set(t.filter(t.run_id == run_id).customer_id.to_pyarrow().to_pylist())


def _quarantined(engine: Engine, value: str) -> bool:
    m = engine.table("identity_map")
    row = m.filter(m.id_value == value).quarantined.to_pyarrow().to_pylist()
    return bool(row[0])


def test_a_quarantine_in_place_is_recorded(engine: Engine) -> None:
    add_events(engine, [{"message_id": "t0", "anonymous_id": "tablet", "event": "Viewed"}])
    resolve(engine, CONFIG, Clock())
    tablet = customer_of(engine, "anonymous_id", "tablet")
    assert not _quarantined(engine, "tablet")
    # Two members on the tablet in one load: over its limit of one strong neighbour, so it
    # is quarantined — and stays its own customer (nothing moves between customers).
    add_events(
        engine,
        [
            {"message_id": "t1", "user_id": "M1", "anonymous_id": "tablet"},
            {"message_id": "t2", "user_id": "M2", "anonymous_id": "tablet"},
        ],
    )
    run = resolve(engine, CONFIG, Clock())
    assert _quarantined(engine, "tablet")
    assert customer_of(engine, "anonymous_id", "tablet") == tablet
    assert tablet in _changed(engine, run.run_id)
    assert tablet in run.changed


def test_a_quarantine_lifted_in_place_is_recorded(engine: Engine) -> None:
    add_events(
        engine,
        [
            {"message_id": "t0", "anonymous_id": "tablet", "event": "Viewed"},
            {"message_id": "t1", "user_id": "M1", "anonymous_id": "tablet"},
            {"message_id": "t2", "user_id": "M2", "anonymous_id": "tablet"},
        ],
    )
    resolve(engine, CONFIG, Clock())
    assert _quarantined(engine, "tablet")
    tablet = customer_of(engine, "anonymous_id", "tablet")
    # The limit raised: the tablet is no longer quarantined (a changed configuration
    # resolves everything again). Whatever customer it joins, the change is recorded.
    types = [
        t.model_copy(update={"max_strong_neighbours": 5}) if t.name == "anonymous_id" else t
        for t in CONFIG.types
    ]
    run = resolve(engine, CONFIG.model_copy(update={"types": types}), Clock())
    assert not _quarantined(engine, "tablet")
    now = customer_of(engine, "anonymous_id", "tablet")
    assert {tablet, now} <= _changed(engine, run.run_id)
