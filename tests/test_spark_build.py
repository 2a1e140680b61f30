"""The whole build on Spark (PySpark local mode) equals the build on DuckDB, table by table.

Both engines run ``pipeline.build`` — load, identity, portrait, traits, tags, segments —
over the same generated files with the same clock. Every table the DuckDB build writes must
exist on Spark with the same columns, types and rows (as a multiset); floats may differ by
``RTOL`` (sums may add up in another order). Left out, on purpose: the columns that record
the wall clock of a run or a load (``VOLATILE``), which differ between any two runs, and the
loader's key index, which only engines with transactions keep (``ENGINE_ONLY``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from closedloop.core.clock import Clock
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine, table_differences
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.pipeline import BuildReport, build
from tests.test_spark import _need_java

pytest.importorskip("pyspark")

RTOL = 1e-9
# Per table, the columns that record when (on the wall clock) a load or run happened, or
# name a load (a random id): two builds on one engine differ there too.
VOLATILE: dict[str, tuple[str, ...]] = {
    "events": ("received_at", "load_id"),
    "failed_events": ("failed_at", "load_id"),
    "loads": ("load_id", "started_at", "finished_at"),
    "portrait_runs": ("finished_at", "seconds"),
    "tag_runs": ("inputs_at",),  # the latest event's received_at
    "identity_runs": ("watermark",),  # the latest received_at the run read
}
# Tables only one engine writes, by design.
ENGINE_ONLY = {
    # The loader's index of message-id hashes needs transactions (keys and rows written
    # together); Spark's loader takes the portable path and semi-joins against the log.
    "intake_keys",
    # The portrait refresh's shortcut marks (the snapshot's signature) need deletes and
    # DuckDB's 64-bit hash; on Spark every refresh compares the whole snapshot.
    "portrait_marks",
}


def build_tables(url: str, root: Path) -> tuple[BuildReport, dict[str, pa.Table]]:
    """Build the project under ``root`` on ``url``: its report, and every table's rows
    (volatile columns out)."""
    project = load_project(root / "p")
    clock = Clock(pd.Timestamp("2026-11-20T00:00:00Z").to_pydatetime())
    out: dict[str, pa.Table] = {}
    with Engine(url) as engine:
        report = build(engine, project, clock=clock)
        assert report.customers > 0
        for name in engine.con.list_tables():
            if name.startswith("_"):  # scratch tables of this run
                continue
            t = engine.table(name)
            drop = [c for c in VOLATILE.get(name, ()) if c in t.columns]
            out[name] = (t.drop(*drop) if drop else t).to_pyarrow()
    return report, out


@pytest.mark.spark
@pytest.mark.slow
def test_whole_build_on_spark_equals_duckdb(tmp_path: Path) -> None:
    _need_java()
    generate(tmp_path / "brand", 300, seed=5)
    init_project(
        tmp_path / "p", data_dir=relative_data_dir(tmp_path / "p", tmp_path / "brand" / "data")
    )
    duck_report, duck = build_tables("duckdb://", tmp_path)
    spark_report, spark = build_tables("pyspark://", tmp_path)
    # Identity first (it was checked alone before): the same clusters, links and drops.
    assert duck_report.identity is not None and duck_report.identity.links > 0
    assert spark_report.identity == duck_report.identity
    assert spark_report.customers == duck_report.customers > 100
    assert spark_report.segments == duck_report.segments
    # The build wrote every stage's tables, with rows (the comparison is not of empties).
    for name in ("events", "identity_map", "profiles", "computed_traits", "tag_values"):
        assert duck[name].num_rows > 0, name
    assert duck["segment_membership"].num_rows > 0
    assert sorted(set(spark) - ENGINE_ONLY) == sorted(set(duck) - ENGINE_ONLY)
    differences = {
        name: d
        for name in sorted(set(duck) - ENGINE_ONLY)
        if (d := table_differences(duck[name], spark[name], rtol=RTOL))
    }
    assert differences == {}
