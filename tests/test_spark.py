"""The identity layer on Spark (PySpark local mode) gives the clusters it gives on DuckDB.

Both engines load the same generated files through ``collect`` and resolve them with the
same definitions; the identity maps must agree row for row — same identifiers, same
customer ids, same quarantine flags — which means the same clusters, since ids come from the
clusters. The Spark session runs in this process (``local[2]``), so the test needs only
Java and the ``pyspark`` package.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import ibis
import pandas as pd
import pytest

from closedloop.core.clock import Clock
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.identity.resolve import ResolveResult, resolve
from closedloop.pipeline import load_imports

pytest.importorskip("pyspark")


def _need_java() -> None:
    """Skip without Java on a developer's machine; in CI (which installs it) fail instead."""
    if shutil.which("java") is None:
        if os.environ.get("CI"):
            pytest.fail("Spark needs Java, and .ci/run installs it: CI must not skip this")
        pytest.skip("Spark needs Java (apt-get install default-jre-headless)")


def _resolve(url: str, root: Path) -> tuple[ResolveResult, pd.DataFrame, int]:
    project = load_project(root / "p")
    clock = Clock(pd.Timestamp("2026-11-20T00:00:00Z").to_pydatetime())
    with Engine(url) as engine:
        load_imports(engine, project)
        result = resolve(engine, project.identity, clock)
        imap = engine.table("identity_map").select(
            "id_type", "id_value", "customer_id", "quarantined"
        )
        frame = imap.order_by(["id_type", "id_value"]).to_pandas()
        events = engine.table("event_customers").count().execute()
    return result, frame, int(events)


@pytest.mark.spark
@pytest.mark.slow
def test_spark_resolves_the_same_clusters_as_duckdb(tmp_path: Path) -> None:
    _need_java()
    generate(tmp_path / "brand", 150, seed=5)
    init_project(
        tmp_path / "p", data_dir=relative_data_dir(tmp_path / "p", tmp_path / "brand" / "data")
    )
    duck, duck_map, duck_events = _resolve("duckdb://", tmp_path)
    spark, spark_map, spark_events = _resolve("pyspark://", tmp_path)
    assert duck.customers > 50 and duck.links > 0
    assert spark == duck
    assert spark_events == duck_events
    pd.testing.assert_frame_equal(duck_map, spark_map, check_dtype=False)

    # The maps are row-for-row equal; the partition is therefore equal too (said plainly).
    def clusters(f: pd.DataFrame) -> set[frozenset[str]]:
        keys = f["id_type"] + ":" + f["id_value"]
        return {frozenset(g) for _, g in keys.groupby(f["customer_id"])}

    assert clusters(duck_map) == clusters(spark_map)


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
