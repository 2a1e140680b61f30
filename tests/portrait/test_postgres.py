"""Profile traits and incremental refresh give the same rows on PostgreSQL as on DuckDB."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pyarrow.compute as pc
import pytest

from closedloop.core.catalogue import CATALOGUE
from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.identity.resolve import resolve
from closedloop.portrait.refresh import full_build, refresh
from tests.identity.test_resolve import CONFIG
from tests.portrait.test_build import NOW
from tests.portrait.test_profile_traits import STRATEGIES, load, values
from tests.portrait.test_refresh import TRAITS, keyed, msgs
from tests.test_backends import postgres_url  # noqa: F401  (the fixture)

DAY = timedelta(days=1)
SPEC = [
    ("A", "order", -20, 5),
    ("A", "view", -3, 2),
    ("B", "tier", -10, 1),
    ("B", "refer", -2, 0),
    ("C", "order", -1, 8),
    ("A", "tier", -1, 4),
    ("D", "refer", 1, 2),
    ("C", "view", -6, 3),
    ("B", "order", -9, 7),
]


def _fresh(engine: Engine) -> None:
    for spec in CATALOGUE:
        engine.drop(spec.name)


def run(url: str) -> tuple[Any, ...]:
    with Engine(url) as e:
        _fresh(e)
        load(
            e,
            [
                ("A", "crm", 3, "gold"),
                ("A", "web", 1, "Silver"),
                ("A", "web", 1, "silver"),
                ("B", "pos", 2, 900),
                ("B", "web", 4, 1200),
            ],
        )
        merged = values(e, STRATEGIES)
        _fresh(e)
        table = msgs(SPEC)
        late = pc.greater(table["timestamp"], pc.cast(NOW - 4 * DAY, table["timestamp"].type))
        e.append("events", table.filter(pc.invert(late)))
        resolve(e, CONFIG, Clock(NOW - 4 * DAY))
        full_build(e, TRAITS, Clock(NOW - 4 * DAY))
        e.append("events", table.filter(late))
        resolve(e, CONFIG, Clock(NOW + 2 * DAY))
        assert refresh(e, TRAITS, Clock(NOW + 2 * DAY)).mode == "incremental"
        incremental = keyed(e)
        full_build(e, TRAITS, Clock(NOW + 2 * DAY))
        assert keyed(e) == incremental
    return merged, incremental


@pytest.mark.postgres
@pytest.mark.slow  # starts PostgreSQL and builds twice per engine
def test_postgres_equals_duckdb(postgres_url: str) -> None:  # noqa: F811
    duck = run("duckdb://")
    pg = run(postgres_url)
    assert pg[0] == duck[0]
    assert pg[1] == duck[1]
