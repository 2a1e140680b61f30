"""Incremental tags equal a full build on PostgreSQL too: the same randomised changes as
``tests/tags/test_incremental.py`` (its test body), run on a real server."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from closedloop.collect.tables import EVENTS
from closedloop.core.engine import Engine
from closedloop.tags import incremental
from tests.conftest import event_rows
from tests.tags import test_incremental
from tests.test_backends import postgres_url  # noqa: F401  (the fixture that starts PostgreSQL)


def typed_events(engine: Engine, messages: list[dict[str, Any]]) -> None:
    """``tests.tags.helpers.set_events`` with every column typed: PostgreSQL refuses columns
    of the null type, which a column no message fills has in Arrow."""
    rows = event_rows(messages).cast(EVENTS.schema.to_pyarrow())
    engine.replace("events", rows)
    engine.replace(
        "event_customers",
        pa.table({"message_id": rows["message_id"], "customer_id": rows["user_id"]}),
    )


@pytest.mark.postgres
@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_incremental_tags_equal_full_on_postgres(
    postgres_url: str,  # noqa: F811
    seed: int,
    wide: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(test_incremental, "set_events", typed_events)
    monkeypatch.setattr(incremental, "WIDE", 0.0 if wide else 1.0)  # everyone, or narrowed
    with Engine(postgres_url) as engine:
        test_incremental.test_incremental_equals_full_after_random_changes(engine, seed)
