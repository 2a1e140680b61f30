"""Importing at scale and from databases: 1,000,000 rows in bounded memory, a crash mid-way
resumed by running again, and tables of DuckDB and PostgreSQL databases as sources."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from typer.testing import CliRunner

from closedloop.cli.main import app
from closedloop.collect.importer import import_ibis_table, import_table, open_table_ref
from closedloop.core.definitions import ImportSpec, Source, load_project
from closedloop.core.engine import Engine
from closedloop.core.errors import InputError
from tests.test_backends import postgres_url  # noqa: F401  (the fixture)

from .conftest import rows

POS = Source(name="pos", channel="pos", write_key="wk_pos_00000001")
ROOT = Path(__file__).resolve().parents[2]
MAPPING: dict[str, Any] = {
    "type": "track",
    "event": "Order Completed",
    "message_id_from": ["order_no"],
    "user_id": "member_phone",
    "timestamp": "paid_at",
    "properties": {"order_id": "order_no", "revenue": "amount", "category": "sku_category"},
}
BAD_EVERY = 50_000  # every 50,000th order has no payment time: a failed event with its row


def orders(n: int, *, typed: bool = False) -> pa.Table:
    """``n`` orders; ``typed`` gives real timestamp and decimal columns, as a database has."""
    import numpy as np

    i = np.arange(1, n + 1)
    paid = np.datetime64("2024-01-01T00:00:00") + (i * 37).astype("timedelta64[s]")
    cols: dict[str, Any] = {
        "order_no": pa.array([f"{k:09d}" for k in i]),
        "member_phone": pa.array([f"+86138{k % 900_000:08d}" for k in i]),
        "paid_at": pa.array(paid, pa.timestamp("s")),
        "amount": pa.array((i % 500) + 0.5),
        "sku_category": pa.array(np.array(["tea", "cups", "gifts"])[i % 3]),
    }
    bad = pa.array(i % BAD_EVERY == 0)
    if typed:
        cols["paid_at"] = pa.compute.if_else(
            bad, pa.scalar(None, pa.timestamp("s")), cols["paid_at"]
        )
        cols["amount"] = cols["amount"].cast(pa.decimal128(10, 2))
    else:
        text = pa.compute.strftime(cols["paid_at"], "%Y-%m-%d %H:%M:%S")
        cols["paid_at"] = pa.compute.if_else(bad, pa.scalar(""), text)
        cols["amount"] = pa.compute.cast(cols["amount"], pa.string())
    return pa.table(cols)


def write_csv(path: Path, n: int) -> Path:
    pacsv.write_csv(orders(n), path)
    return path


def spec(name: str = "orders", fmt: str = "csv") -> ImportSpec:
    return ImportSpec.model_validate(
        {"name": name, "path": "x", "source": "pos", "format": fmt, "mapping": MAPPING}
    )


def good(n: int) -> int:
    return n - n // BAD_EVERY


def distinct_and_total(engine: Engine) -> tuple[int, int]:
    t = engine.table("events")
    got = engine.to_arrow(t.aggregate(d=t.message_id.nunique(), n=t.count())).to_pylist()[0]
    return int(got["d"]), int(got["n"])


# ---- a crash mid-import, then the same import again -----------------------------------------
IMPORT_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from closedloop.collect.importer import import_table
from closedloop.core.engine import Engine
from tests.collect.test_collect_import_scale import POS, spec
done = 0
def progress(n):
    global done
    done += n
    print(done, flush=True)
with Engine({url!r}) as engine:
    import_table(engine, Path({csv!r}), spec(), POS, chunk_rows=10_000, progress=progress)
print("finished", flush=True)
"""


def test_an_import_killed_mid_way_is_resumed_by_running_it_again(tmp_path: Path) -> None:
    n = 100_000
    csv_path = write_csv(tmp_path / "orders.csv", n)
    url = f"duckdb:///{tmp_path / 'w.duckdb'}"
    script = IMPORT_SCRIPT.format(root=str(ROOT), url=url, csv=str(csv_path))
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    written = 0
    for line in proc.stdout:  # the progress callback runs after each chunk is written
        if line.strip() == "finished":
            break
        written = int(line)
        if written >= 30_000:
            proc.send_signal(signal.SIGKILL)  # mid-import, between or inside chunk writes
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    with Engine(url) as engine:
        before, total_before = distinct_and_total(engine)
        assert before == total_before and 0 < before < good(n)
        again = import_table(engine, csv_path, spec(), POS, chunk_rows=10_000)
        after, total_after = distinct_and_total(engine)
        # Nothing lost, nothing twice: every good row exactly once.
        assert after == total_after == good(n)
        assert again.accepted == good(n) - before and again.duplicate == before
        assert again.failed == n // BAD_EVERY
        failed = rows(engine, "failed_events")
        assert sorted(f["location"] for f in failed) == sorted(
            f"{csv_path}:row {k}" for k in range(BAD_EVERY, n + 1, BAD_EVERY)
        )
        third = import_table(engine, csv_path, spec(), POS, chunk_rows=10_000)
        assert (third.accepted, third.duplicate, third.failed) == (0, good(n), n // BAD_EVERY)
        assert distinct_and_total(engine) == (good(n), good(n))
        assert len(rows(engine, "failed_events")) == n // BAD_EVERY


# ---- 1,000,000 rows through the CLI, in bounded memory, with a progress bar -----------------
@pytest.mark.slow
def test_a_million_row_import_in_bounded_memory(tmp_path: Path) -> None:
    n = 1_000_000
    runner = CliRunner()
    project = tmp_path / "brand"
    assert runner.invoke(app, ["init", str(project)]).exit_code == 0
    csv_path = write_csv(tmp_path / "orders.csv", n)
    mapping = tmp_path / "orders.yaml"
    mapping.write_text(json.dumps(MAPPING), encoding="utf-8")  # JSON is YAML
    command = [sys.executable, "-c", "from closedloop.cli.main import app; app()"]
    args = ["import", str(csv_path), "--mapping", str(mapping), "--source", "pos"]
    env = {**os.environ, "COLUMNS": "120"}
    started = time.perf_counter()
    done = subprocess.run(
        [*command, *args, "-p", str(project)], capture_output=True, text=True, env=env, timeout=900
    )
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    assert done.returncode == 0, done.stderr
    bad = n // BAD_EVERY
    assert f"received {n:,}, accepted {n - bad:,}, failed {bad:,}, duplicate 0" in done.stdout
    assert f"{n:,} rows" in done.stdout  # the progress bar's count
    # Memory is bounded by the chunk (100,000 rows), not the file: the whole file's rows as
    # Python objects would take several GiB.
    assert peak_mib < 1200, f"peak RSS {peak_mib:.0f} MiB"
    print(
        f"\n1,000,000-row import: {seconds:.1f} s, {n / seconds:,.0f} rows/s, peak RSS {peak_mib:.0f} MiB"
    )
    with Engine(load_project(project).engine_url) as engine:
        assert distinct_and_total(engine) == (n - bad, n - bad)
    again = subprocess.run(
        [*command, *args, "-p", str(project)], capture_output=True, text=True, env=env, timeout=900
    )
    assert again.returncode == 0, again.stderr
    assert f"accepted 0, failed {bad:,}, duplicate {n - bad:,}" in again.stdout


# ---- tables of databases ------------------------------------------------------------------
def test_import_from_a_duckdb_table_through_the_cli(tmp_path: Path) -> None:
    import duckdb

    n = 60_000
    shop = tmp_path / "shop.duckdb"
    data = orders(n, typed=True)
    with duckdb.connect(str(shop)) as con:
        con.register("data", data)
        con.execute("CREATE TABLE orders AS SELECT * FROM data ORDER BY random()")
    runner = CliRunner()
    project = tmp_path / "brand"
    assert runner.invoke(app, ["init", str(project)]).exit_code == 0
    mapping = tmp_path / "orders.yaml"
    mapping.write_text(json.dumps(MAPPING), encoding="utf-8")
    ref = f"duckdb:///{shop}#orders"
    args = ["import", ref, "--mapping", str(mapping), "--source", "pos", "-p", str(project)]
    r = runner.invoke(app, args)
    bad = n // BAD_EVERY
    assert r.exit_code == 0, r.output
    assert f"orders: received {n:,}, accepted {n - bad:,}, failed {bad:,}, duplicate 0" in r.output
    with Engine(load_project(project).engine_url) as engine:
        events = engine.to_arrow(
            engine.table("events").filter(lambda t: t.message_id == "orders:000000007")
        ).to_pylist()
        assert len(events) == 1
        assert events[0]["revenue"] == 7.5 and events[0]["user_id"] == "+8613800000007"
        assert events[0]["timestamp"].isoformat().startswith("2024-01-01T00:04:19")
        # Rows are read in messageId order, so row numbers are the same on every run.
        failed = sorted(f["location"] for f in rows(engine, "failed_events"))
        assert failed == sorted(f"{ref}:row {k}" for k in range(BAD_EVERY, n + 1, BAD_EVERY))
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert f"accepted 0, failed {bad:,}, duplicate {n - bad:,}" in again.output
    # The shop's database was opened read-only and is unchanged.
    with duckdb.connect(str(shop), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM orders").fetchone() == (n,)


def test_table_refs_that_name_nothing_fail_clearly(tmp_path: Path, engine: Engine) -> None:
    with pytest.raises(InputError, match="no DuckDB database file"):
        open_table_ref(f"duckdb:///{tmp_path / 'none.duckdb'}#orders")
    import duckdb

    with duckdb.connect(str(tmp_path / "shop.duckdb")) as con:
        con.execute("CREATE TABLE orders AS SELECT 1 AS order_no")
    with pytest.raises(InputError, match="no table 'members'"):
        open_table_ref(f"duckdb:///{tmp_path / 'shop.duckdb'}#members")
    con2, table = open_table_ref(f"duckdb:///{tmp_path / 'shop.duckdb'}#orders")
    try:
        with pytest.raises(InputError, match=r"missing column\(s\) .*member_phone"):
            import_ibis_table(engine, table, spec(), POS, location="shop#orders")
    finally:
        con2.disconnect()
    assert not engine.exists("events")


def test_import_from_a_postgres_table(tmp_path: Path, postgres_url: str) -> None:  # noqa: F811
    import ibis

    n = 30_000
    con = ibis.connect(postgres_url)
    try:
        con.raw_sql("CREATE SCHEMA IF NOT EXISTS crm")
        con.create_table("members_orders", orders(n, typed=True), database="crm", overwrite=True)
    finally:
        con.disconnect()
    ref = f"{postgres_url}#crm.members_orders"
    with Engine(f"duckdb:///{tmp_path / 'w.duckdb'}") as engine:
        for run in range(2):
            pg, table = open_table_ref(ref)
            try:
                r = import_ibis_table(
                    engine, table, spec("members"), POS, location="crm", chunk_rows=7_000
                )
            finally:
                pg.disconnect()
            bad = n // BAD_EVERY
            if run == 0:
                assert (r.received, r.accepted, r.failed) == (n, n - bad, bad)
            else:
                assert (r.accepted, r.duplicate, r.failed) == (0, n - bad, bad)
        assert distinct_and_total(engine) == (n - bad, n - bad)
        one = engine.to_arrow(
            engine.table("events").filter(lambda t: t.message_id == "members:000000010")
        ).to_pylist()[0]
        assert one["revenue"] == 10.5 and one["category"] == "cups"
