"""Incremental resolution on PostgreSQL gives what it gives on DuckDB, table for table.

The incremental path is written once over Ibis (region, evidence read back, tables rewritten
as rows outside the region plus the region's); this runs it on a second engine: members who
registered twice arrive over three loads, with probabilistic matching on, so the refitted
model's moved pairs are part of what must agree.
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pytest

from closedloop.collect.tables import EVENTS
from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.identity.resolve import resolve
from tests.conftest import event_rows
from tests.identity.test_incremental import START, TABLES, _figures
from tests.identity.test_matching import MATCHING, _population
from tests.test_backends import postgres_url  # noqa: F401  (the PostgreSQL fixture)

# Floats and timestamps come back from each engine in its own Python types: compare values.
KEYS = {
    "identity_map": ["id_type", "id_value", "customer_id", "quarantined", "messages"],
    "customers": ["customer_id", "identifiers"],
    "customer_aliases": ["alias_id", "customer_id"],
    "merge_ledger": ["merge_id", "survivor_id", "merged_id", "action"],
    "identity_changes": ["customer_id", "run_id", "change"],
    "identity_edges": ["a_type", "a_value", "b_type", "b_value", "message_id", "status"],
    "identity_dropped_links": ["a_type", "a_value", "b_type", "b_value", "rule"],
    "identifier_issues": ["id_type", "raw_value", "reason", "messages"],
    "event_customers": ["message_id", "customer_id"],
    "identity_suspects": ["id_type", "id_value", "names"],
    "identity_clusters": ["id_type", "id_value", "cluster"],
    "identity_records": ["message_id", "anchor", "name", "email", "phone"],
}


def _add(engine: Engine, messages: list[dict[str, Any]]) -> None:
    """Events typed by the declared schema (PostgreSQL refuses columns of only nulls)."""
    schema = EVENTS.schema.to_pyarrow()
    engine.append("events", pa.Table.from_pylist(event_rows(messages).to_pylist(), schema=schema))


def _rows(engine: Engine, name: str) -> list[tuple[object, ...]]:
    cols = KEYS[name]
    rows = engine.table(name).select(*cols).to_pyarrow().to_pylist()
    return sorted((tuple(r[c] for c in cols) for r in rows), key=repr)


@pytest.mark.slow
def test_incremental_runs_agree_on_postgres_and_duckdb(postgres_url: str) -> None:  # noqa: F811
    assert set(KEYS) == set(TABLES)
    msgs, _twins = _population(3)
    random.Random(5).shuffle(msgs)
    parts = [msgs[:200], msgs[200:380], msgs[380:]]
    with Engine("duckdb://") as duck, Engine(postgres_url) as pg:
        for n, part in enumerate(parts):
            _add(duck, part)
            _add(pg, part)
            clock = Clock(START + timedelta(hours=n))
            rd = resolve(duck, MATCHING, clock)
            rp = resolve(pg, MATCHING, clock)
            assert rd.path == rp.path == ("incremental" if n else "full")
            assert _figures(rd) == _figures(rp)
            for name in TABLES:
                assert _rows(duck, name) == _rows(pg, name), name
