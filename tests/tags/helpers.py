"""Small warehouse set-ups for tag tests: profiles, customers and customer events."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

import closedloop.tags.tables  # noqa: F401  (declares the tag tables)
from closedloop.collect.tables import EVENTS
from closedloop.core.definitions.tags import TagDef
from closedloop.core.engine import Engine
from closedloop.identity.tables import CUSTOMERS
from closedloop.portrait.tables import PROFILES
from tests.conftest import event_rows

NOW = datetime(2026, 11, 20, tzinfo=UTC)


def set_profiles(engine: Engine, rows: list[dict[str, Any]]) -> None:
    full = [{c: r.get(c) for c in PROFILES.columns} for r in rows]
    engine.replace("profiles", pa.Table.from_pylist(full, schema=PROFILES.schema.to_pyarrow()))
    cols = CUSTOMERS.columns
    customers = [dict.fromkeys(cols) | {"customer_id": r["customer_id"]} for r in rows]
    engine.replace(
        "customers", pa.Table.from_pylist(customers, schema=CUSTOMERS.schema.to_pyarrow())
    )


def set_events(engine: Engine, messages: list[dict[str, Any]]) -> None:
    """Events already resolved: each message's ``user_id`` is its customer id."""
    rows = event_rows(messages)
    if not messages:
        rows = EVENTS.schema.to_pyarrow().empty_table()
    engine.replace("events", rows)
    engine.replace(
        "event_customers",
        pa.table({"message_id": rows["message_id"], "customer_id": rows["user_id"]}),
    )


def message(
    cust: str,
    mid: str,
    at: datetime,
    event: str = "Order Completed",
    category: str | None = None,
    properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One track message of ``cust`` (a ``set_events`` row), the fields tag tests vary."""
    return {
        "message_id": mid,
        "user_id": cust,
        "event": event,
        "category": category,
        "timestamp": at,
        "properties": properties or {},
    }


def tag(**kw: Any) -> TagDef:
    return TagDef.model_validate({"name": "t", **kw})


def values(engine: Engine, name: str = "t") -> dict[str, str]:
    tv = engine.table("tag_values")
    rows = tv.filter(tv.tag == name).to_pyarrow().to_pylist()
    return {str(r["customer_id"]): str(r["value"]) for r in rows}
