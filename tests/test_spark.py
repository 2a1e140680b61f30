"""The Spark engine (PySpark local mode) keeps what it is handed and unwraps JSON as DuckDB does.

The session runs in this process (``local[2]``), so the tests need only Java and the
``pyspark`` package. The whole build on Spark — identity's clusters included — is compared
with DuckDB's table by table in ``tests/test_spark_build.py``; the engine's other Spark
primitives in ``tests/test_spark_engine.py``.
"""

from __future__ import annotations

import os
import shutil

import ibis
import pytest

from closedloop.core.engine import Engine

pytest.importorskip("pyspark")


def _need_java() -> None:
    """Skip without Java on a developer's machine; in CI (which installs it) fail instead.

    The JVM options of the test sessions are set in tests/conftest.py.
    """
    if shutil.which("java") is None:
        if os.environ.get("CI"):
            pytest.fail("Spark needs Java, and .ci/run installs it: CI must not skip this")
        pytest.skip("Spark needs Java (apt-get install default-jre-headless)")


@pytest.mark.spark
def test_spark_engine_keeps_missing_strings_missing_and_unwraps_json() -> None:
    """Arrow hand-offs keep nulls (not the text "NaN"); JSON strings unwrap natively."""
    import closedloop.collect.tables  # noqa: F401  (declares events)
    from tests.conftest import add_events

    _need_java()
    with Engine("pyspark://") as engine:
        add_events(
            engine,
            [
                {"user_id": "M1", "traits": {"phone": "138", "n": 5, "o": {"x": 1}}},
                {"anonymous_id": "a2", "traits": {"phone": "139"}},
            ],
        )
        ev = engine.table("events")
        j = ev.traits.cast("json")
        got = (
            ev.select(
                "message_id",
                "user_id",
                phone=j["phone"].unwrap_as("string"),
                obj=j["o"].unwrap_as("string"),
                n=j["n"].unwrap_as("int64"),
                # Edit distance in bytes, as DuckDB counts it (one Chinese character = 3).
                lev=ibis.literal("王伟").levenshtein(ibis.literal("王玮")),
                first=ibis.literal("female").left(1),
                # Ibis 12 strips "\\f" as the letter f on Spark; the engine fixes it.
                stripped=ibis.literal(" \tfive of ").strip(),
            )
            .order_by("message_id")
            .to_pyarrow()
            .to_pylist()
        )
    assert got == [
        {
            "message_id": "m0",
            "user_id": "M1",
            "phone": "138",
            "obj": None,
            "n": 5,
            "lev": 3,
            "first": "f",
            "stripped": "five of",
        },
        {
            "message_id": "m1",
            "user_id": None,
            "phone": "139",
            "obj": None,
            "n": None,
            "lev": 3,
            "first": "f",
            "stripped": "five of",
        },
    ]
