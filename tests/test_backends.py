"""The same definitions on another engine: the build on PostgreSQL equals the build on DuckDB.

The test starts the machine's PostgreSQL server itself (``pg_ctlcluster``), creates a
throw-away database, runs the whole build there and on DuckDB over the same generated files,
and compares customers, profiles and segments row for row.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from closedloop.core.clock import Clock
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.pipeline import build

PASSWORD = "closedloop-test"  # noqa: S105 - a throw-away local test database


def _psql(sql: str, attempts: int = 5) -> None:
    """Run one statement as the server's superuser.

    Retried: test processes running in parallel may run the same ``ALTER USER`` at once,
    and PostgreSQL refuses the loser with "tuple concurrently updated".
    """
    for attempt in range(attempts):
        done = subprocess.run(["su", "postgres", "-c", f'psql -q -c "{sql}"'], capture_output=True)
        if done.returncode == 0:
            return
        time.sleep(0.2 * (attempt + 1))
    raise AssertionError(f"psql failed: {sql}: {done.stderr.decode(errors='replace')}")


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    if shutil.which("pg_ctlcluster") is None or not Path("/etc/postgresql").is_dir():
        pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    # Test processes running in parallel may start the server at the same moment: one
    # start wins, the others fail with "already running" or find it still starting.
    deadline = time.monotonic() + 60
    while True:
        subprocess.run(["pg_ctlcluster", version, "main", "start"], capture_output=True)
        status = subprocess.run(["pg_ctlcluster", version, "main", "status"], capture_output=True)
        if status.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status.returncode == 0, "PostgreSQL did not start"
    db = "cl_" + uuid.uuid4().hex[:12]
    _psql(f"ALTER USER postgres PASSWORD '{PASSWORD}'")
    _psql(f"CREATE DATABASE {db}")
    yield f"postgres://postgres:{PASSWORD}@localhost:5432/{db}"
    _psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def _build(url: str, root: Path) -> dict[str, pd.DataFrame]:
    project = load_project(root / "p")
    clock = Clock(pd.Timestamp("2026-11-20T00:00:00Z").to_pydatetime())
    with Engine(url) as engine:
        report = build(engine, project, clock=clock)
        profiles = engine.table("profiles").drop("computed_at").order_by("customer_id").to_pandas()
        members = (
            engine.table("segment_membership")
            .select("segment", "customer_id")
            .order_by(["segment", "customer_id"])
            .to_pandas()
        )
        imap = engine.table("identity_map").select("id_type", "id_value", "customer_id")
        identity = imap.order_by(["id_type", "id_value"]).to_pandas()
    assert report.customers > 0
    return {"profiles": profiles, "members": members, "identity": identity}


@pytest.mark.postgres
def test_build_on_postgres_equals_duckdb(tmp_path: Path, postgres_url: str) -> None:
    generate(tmp_path / "brand", 300, seed=5)
    init_project(
        tmp_path / "p", data_dir=relative_data_dir(tmp_path / "p", tmp_path / "brand" / "data")
    )
    duck = _build("duckdb://", tmp_path)
    pg = _build(postgres_url, tmp_path)
    pd.testing.assert_frame_equal(duck["identity"], pg["identity"], check_dtype=False)
    pd.testing.assert_frame_equal(duck["members"], pg["members"], check_dtype=False)
    a, b = duck["profiles"], pg["profiles"]
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for col in a.columns:
        if pd.api.types.is_float_dtype(a[col]):
            # Sums may add in another order: equal to rounding.
            pd.testing.assert_series_equal(a[col], b[col], check_dtype=False, rtol=1e-9)
        else:
            pd.testing.assert_series_equal(
                a[col].astype("object").where(a[col].notna(), None),
                b[col].astype("object").where(b[col].notna(), None),
                check_dtype=False,
            )
