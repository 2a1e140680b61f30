"""`closedloop serve` keeps the warehouse fresh: an event posted over HTTP changes the
customer's profile, traits and segment membership within a bounded time.

`serve` runs as a real process on a loopback port. While it runs it owns the DuckDB file, so
the test watches what a reader outside can see — the profile lookup's SQLite serving store,
rewritten at the end of every refresh — and reads the warehouse after stopping it.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from tests.collect.conftest import free_port, request

KEY = "wk_web_0123456789"
FILES = {
    "closedloop.yaml": "name: brand\nengine: duckdb:///warehouse.duckdb\ntimezone: UTC\n"
    f"sources:\n  - {{name: web, channel: web, write_key: {KEY}}}\n",
    "identity.yaml": "types:\n  - {name: member_id, priority: 100, strong: true, paths: [user_id]}\n"
    "  - {name: email, normaliser: email, priority: 80, strong: true, paths: [traits.email]}\n",
    "traits/orders_30d.yaml": "name: orders_30d\nevent: Order Completed\naggregation: count\n"
    "window_days: 30\n",
    "segments/buyers.yaml": "name: buyers\nwhere: {trait: orders_30d, op: gte, value: 1}\n",
}


def write_project(root: Path, files: dict[str, str] = FILES) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def start_serve(proj: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """``closedloop serve`` as a real process on a free port, once it answers /health."""
    port = free_port()
    command = [sys.executable, "-m", "closedloop.cli.main", "serve", "-p", str(proj)]
    proc = subprocess.Popen([*command, "--port", str(port), *extra], start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if request(url + "/health", timeout=1).status == 200:
                return proc, url
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)


def stop_serve(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def served_profile(store: Path, member_id: str) -> dict[str, Any] | None:
    """The profile the serving store holds for a member id (None: not there yet)."""
    if not store.exists():
        return None
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        hit = db.execute(
            "SELECT customer_id FROM identifiers WHERE id_value = ? AND id_type = 'member_id'",
            (member_id,),
        ).fetchone()
        if hit is None:
            return None
        doc = db.execute("SELECT doc FROM profiles WHERE customer_id = ?", hit).fetchone()
        columns = json.loads(
            db.execute("SELECT value FROM meta WHERE key = 'columns'").fetchone()[0]
        )
    finally:
        db.close()
    if doc is None:
        return None
    return {"customer_id": hit[0]} | {
        c[0]: v for c, v in zip(columns, json.loads(doc[0]), strict=True)
    }


def wait_for(
    what: str,
    probe: Callable[[], dict[str, Any] | None],
    proc: subprocess.Popen[bytes],
    limit: float,
) -> tuple[dict[str, Any], float]:
    """Poll ``probe`` until it gives a row; the row and the seconds it took."""
    start = time.monotonic()
    while True:
        row = probe()
        if row is not None:
            return row, time.monotonic() - start
        assert proc.poll() is None, "serve exited"
        assert time.monotonic() - start < limit, f"{what} not seen within {limit} s"
        time.sleep(0.1)


def test_an_event_posted_over_http_changes_traits_and_segments_while_serving(
    tmp_path: Path,
) -> None:
    proj = write_project(tmp_path / "brand")
    store = proj / "warehouse.duckdb.lookup.sqlite"
    proc, url = start_serve(proj, "--refresh-interval", "0")
    try:
        view = {"userId": "u1", "event": "Product Viewed", "messageId": "m1", "writeKey": KEY}
        assert request(url + "/v1/t", view).status == 200
        first, _ = wait_for("the new customer", lambda: served_profile(store, "u1"), proc, 60)
        assert (first["orders"], first["product_views"]) == (0, 1)
        posted = time.time()
        order = {
            "userId": "u1",
            "event": "Order Completed",
            "messageId": "m2",
            "properties": {"order_id": "o1", "revenue": 12.5},
            "writeKey": KEY,
        }
        assert request(url + "/v1/t", order).status == 200
        row, seconds = wait_for(
            "the order in the profile",
            lambda: p if (p := served_profile(store, "u1")) and p["orders"] == 1 else None,
            proc,
            60,
        )
        assert row["customer_id"] == first["customer_id"] and row["revenue"] == 12.5
    finally:
        stop_serve(proc)
    cid = first["customer_id"]
    with Engine(load_project(proj).engine_url) as engine:
        traits = engine.table("computed_traits")
        values = traits.filter(traits.customer_id == cid).to_pyarrow().to_pylist()
        m = engine.table("segment_membership")
        stays = m.filter(m.customer_id == cid).to_pyarrow().to_pylist()
        runs = engine.table("live_refreshes").to_pyarrow().to_pylist()
    assert [(v["trait"], v["number_value"]) for v in values] == [("orders_30d", 1.0)]
    # One stay in buyers, entered by the refresh that loaded the order, after it was posted.
    assert [(s["segment"], s["exited_at"]) for s in stays] == [("buyers", None)]
    entered = stays[0]["entered_at"]
    assert entered.timestamp() >= posted
    (run,) = [r for r in runs if r["as_of"] == entered]
    assert run["reason"] == "events" and run["entered"] == 1 and run["loaded"] >= 1
    assert run["identity_path"] == "incremental"  # only the new events are resolved
    assert run["finished_at"].timestamp() - posted <= seconds + 1
    assert runs[0]["reason"] == "start"


def test_serve_without_refresh_only_loads(tmp_path: Path) -> None:
    proj = write_project(tmp_path / "brand")
    proc, url = start_serve(proj, "--no-refresh")
    try:
        view = {"userId": "u1", "event": "Product Viewed", "messageId": "m1", "writeKey": KEY}
        assert request(url + "/v1/t", view).status == 200
        spool = proj / "spool"
        deadline = time.monotonic() + 30
        from closedloop.collect.spool import Offsets, segment_names

        while True:
            offsets = Offsets(spool)
            names = segment_names(spool)
            if names and all(offsets.get(n) >= (spool / n).stat().st_size for n in names):
                break
            assert time.monotonic() < deadline, "the loader did not drain the spool"
            time.sleep(0.1)
    finally:
        stop_serve(proc)
    with Engine(load_project(proj).engine_url) as engine:
        assert engine.count("events") == 1
        assert not engine.exists("profiles") and not engine.exists("live_refreshes")


def _state(engine: Engine) -> tuple[Any, Any, list[tuple[str, str]]]:
    """Profiles, traits and current segment members, customers named by an identifier."""
    from tests.portrait.test_refresh import keyed

    profiles, traits = keyed(engine)
    m = engine.table("identity_map").to_pyarrow().to_pylist()
    key: dict[str, str] = {}
    for r in m:
        k = f"{r['id_type']}:{r['id_value']}"
        key[r["customer_id"]] = min(key.get(r["customer_id"], k), k)
    s = engine.table("segment_membership")
    rows = s.filter(s.exited_at.isnull()).to_pyarrow().to_pylist()
    members = sorted((r["segment"], key.get(r["customer_id"], r["customer_id"])) for r in rows)
    return profiles, traits, members


@pytest.mark.slow  # two generated warehouses, a killed refresh and its repair (about 40 s)
@pytest.mark.parametrize("kill_after", [0.0, 1.0])
def test_a_refresh_killed_half_way_is_repaired_by_the_next_run(
    tmp_path: Path, kill_after: float
) -> None:
    """SIGKILL the warehouse owner during its refresh; its next run equals a clean build."""
    from closedloop.demo.generator import generate
    from closedloop.demo.project import init_project, relative_data_dir
    from closedloop.pipeline import build, load_imports

    generate(tmp_path / "brand", 300)
    data = tmp_path / "brand" / "data"
    live, clean = tmp_path / "live", tmp_path / "clean"
    for root in (live, clean):
        init_project(root, data_dir=relative_data_dir(root, data))
    project = load_project(live)
    with Engine(project.engine_url) as engine:
        load_imports(engine, project)
    command = [sys.executable, "-m", "closedloop.serving.owner", "--project", str(live)]
    command += ["--spool", str(live / "spool")]
    killed = subprocess.Popen(command, stderr=subprocess.PIPE)
    wal = live / "warehouse.duckdb.wal"
    deadline = time.monotonic() + 120
    while not wal.exists():  # the refresh has started writing
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(kill_after)
    killed.kill()
    killed.wait(timeout=30)
    with Engine(project.engine_url) as engine:  # killed before the refresh finished
        assert not engine.exists("live_refreshes") or engine.count("live_refreshes") == 0
    repair = subprocess.run([*command, "--once"], capture_output=True, timeout=300, check=False)
    assert repair.returncode == 0, repair.stderr.decode()[-2000:]
    reference = load_project(clean)
    with Engine(reference.engine_url) as engine:
        build(engine, reference)
        expected = _state(engine)
    with Engine(project.engine_url) as engine:
        got = _state(engine)
        runs = engine.table("live_refreshes").to_pyarrow().to_pylist()
    assert runs and runs[-1]["reason"] == "start"
    assert got[0] == expected[0]
    assert got[1] == expected[1]
    assert got[2] == expected[2]


THANKS = """\
name: thanks
audience: buyers
holdout: 0.01
template: "thanks {{ name }}"
trigger: {segment_entry: buyers}
steps:
  - {id: thanks, send: {template: "thanks {{ name }}"}}
"""


def test_a_segment_entry_found_by_the_live_refresh_fires_its_journey(tmp_path: Path) -> None:
    """serve with a segment-entry journey: an order over HTTP → buyers → a message."""
    from tests.activate.test_journey import outbox_lines

    proj = write_project(tmp_path / "brand", FILES | {"campaigns/thanks.yaml": THANKS})
    proc, url = start_serve(proj, "--refresh-interval", "0")
    try:
        who = {"userId": "u1", "messageId": "i1", "writeKey": KEY}
        traits = {"name": "Li", "email": "li@example.cn"}
        consent = {"consent": {"categoryPreferences": {"marketing": True}}}  # policy asks
        identify = who | {"traits": traits, "context": consent}
        assert request(url + "/v1/i", identify).status == 200
        order = {"event": "Order Completed", "properties": {"order_id": "o1", "revenue": 3}}
        assert request(url + "/v1/t", who | order | {"messageId": "m1"}).status == 200
        deadline = time.monotonic() + 150  # a loaded machine: the bound is loose
        while not outbox_lines(proj / "outbox"):
            assert proc.poll() is None, "serve exited"
            assert time.monotonic() < deadline, "no message within 150 s"
            time.sleep(0.2)
    finally:
        stop_serve(proc)
    lines = outbox_lines(proj / "outbox")
    assert [x["body"] for x in lines] == ["thanks Li"]
    with Engine(load_project(proj).engine_url) as engine:
        m = engine.table("segment_membership").to_pyarrow().to_pylist()
    assert [(r["segment"], r["customer_id"]) for r in m] == [("buyers", lines[0]["customer_id"])]
