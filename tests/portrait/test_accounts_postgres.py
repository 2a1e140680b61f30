"""Accounts, their contacts and account segments give the same rows on PostgreSQL as on DuckDB."""

from __future__ import annotations

from typing import Any

import pytest

from closedloop.collect.tables import EVENTS
from closedloop.core.catalogue import CATALOGUE
from closedloop.core.clock import Clock
from closedloop.core.definitions import SegmentDef
from closedloop.core.engine import Engine
from closedloop.identity.resolve import resolve
from closedloop.portrait.refresh import full_build
from closedloop.segments.accounts import evaluate_account_segment
from tests.conftest import event_rows
from tests.identity.test_resolve import CONFIG
from tests.portrait.test_accounts import MESSAGES, NOW, track
from tests.portrait.test_accounts_refresh import keyed
from tests.test_backends import postgres_url  # noqa: F401  (the fixture)

SEGMENTS = [
    {"trait": "industry", "op": "eq", "value": "Tea"},
    {
        "contacts": {
            "role": ["decision_maker", "finance"],
            "where": [{"trait": "orders", "op": "gte", "value": 1}],
            "did": {
                "event": "Order Completed",
                "count": {"op": "gte", "value": 2},
                "within_days": 9,
            },
        }
    },
    {"contacts": {"role": "it"}, "count": {"op": "eq", "value": 0}},
]


def run(engine: Engine) -> tuple[Any, ...]:
    for spec in CATALOGUE:  # a fresh warehouse on a database other tests share
        engine.drop(spec.name)
    extra = [track("t8", "C", "Order Completed", 3, "acme", order_id="o8", revenue=12.25)]
    rows = event_rows([*MESSAGES, *extra])
    engine.append("events", rows.cast(EVENTS.schema.to_pyarrow()))  # typed nulls for PostgreSQL
    resolve(engine, CONFIG, Clock(NOW))
    full_build(engine, {}, Clock(NOW))
    sizes = []
    for i, where in enumerate(SEGMENTS):
        seg = SegmentDef.model_validate({"name": f"s{i}", "of": "accounts", "where": where})
        sizes.append(evaluate_account_segment(engine, seg, Clock(NOW)))
    m = engine.table("account_membership").drop("entered_at").order_by(["segment", "account_id"])
    return (*keyed(engine), sizes, m.to_pyarrow().to_pylist())


@pytest.mark.postgres
def test_accounts_on_postgres_equal_duckdb(postgres_url: str) -> None:  # noqa: F811
    with Engine("duckdb://") as duck:
        want = run(duck)
    with Engine(postgres_url) as pg:
        got = run(pg)
    assert got == want
    assert [s[0] for s in want[2]] == [1, 2, 1]  # every segment selects something
