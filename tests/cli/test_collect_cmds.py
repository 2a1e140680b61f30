"""`closedloop serve` end to end, and `closedloop failed list|show|replay`.

`serve` runs as a real process (collector + loader) on a free loopback port; events sent
to it must reach `events` in the project's warehouse through the spool and the loader.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from closedloop.cli.main import app
from closedloop.collect.spool import Offsets, segment_names
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from tests.collect.conftest import free_port, request

runner = CliRunner()


def _spool_drained(spool: Path) -> bool:
    if not spool.is_dir():
        return False
    offsets = Offsets(spool)
    return all(offsets.get(n) >= (spool / n).stat().st_size for n in segment_names(spool))


def _serve(proj: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``closedloop serve`` as a real process on a free port, once it answers /health."""
    port = free_port()
    command = [sys.executable, "-m", "closedloop.cli.main", "serve", "-p", str(proj)]
    proc = subprocess.Popen([*command, "--port", str(port)], start_new_session=True)
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


def test_serve_runs_collector_and_loader(tmp_path: Path) -> None:
    proj = tmp_path / "brand"
    assert runner.invoke(app, ["init", str(proj)]).exit_code == 0
    project = load_project(proj)
    web, pos = project.config.sources[0], project.config.sources[-1]
    proc, url = _serve(proj)
    try:
        batch = [
            {"type": "track", "event": "Order Completed", "userId": "u1", "messageId": "s1"},
            {"type": "identify", "userId": "u1", "traits": {"phone": "13800000000"}},
            {"type": "track", "userId": "u2"},  # no event: failed
        ]
        a = request(url + "/v1/batch", {"batch": batch, "writeKey": web.write_key})
        assert a.status == 200 and (a.json["accepted"], a.json["failed"]) == (2, 1)
        b = request(url + "/v1/t", {"userId": "p", "event": "Paid", "writeKey": pos.write_key})
        assert b.status == 200
        assert request(url + "/v1/t", {"userId": "p", "writeKey": "wk_wrong_x"}).status == 401
        deadline = time.monotonic() + 20
        while not _spool_drained(proj / "spool"):
            assert time.monotonic() < deadline, "the loader did not drain the spool"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    with Engine(project.engine_url) as engine:
        events = engine.to_arrow(engine.table("events")).to_pylist()
        failed = engine.to_arrow(engine.table("failed_events")).to_pylist()
    assert sorted((e["source"], e["type"]) for e in events) == [
        (pos.name, "track"),
        (web.name, "identify"),
        (web.name, "track"),
    ]
    assert sorted(f["reason_code"] for f in failed) == ["bad_write_key", "missing_field"]


def test_failed_list_show_replay(tmp_path: Path) -> None:
    proj = tmp_path / "brand"
    runner.invoke(app, ["init", str(proj)])
    project = load_project(proj)
    web = project.config.sources[0]
    # Spool two refusals the way the collector does, and load them.
    import asyncio
    from datetime import UTC, datetime

    from closedloop.collect.drain import SpoolLoader
    from closedloop.collect.ingest import Collector
    from closedloop.collect.spool import SpoolWriter

    collector = Collector(list(project.config.sources))
    now = datetime.now(UTC)
    bad_key = json.dumps(
        {"writeKey": "wk_typo_0000", "userId": "u9", "event": "E", "messageId": "r1"}
    )
    no_id = json.dumps({"writeKey": web.write_key, "event": "E", "messageId": "r2"})
    outcomes = [
        collector.prepare("track", bad_key.encode(), {}, None, "127.0.0.1", now),
        collector.prepare("track", no_id.encode(), {}, None, "127.0.0.1", now),
    ]
    assert [o.status for o in outcomes] == [401, 400]

    async def spool() -> None:
        w = SpoolWriter(proj / "spool")
        for o in outcomes:
            assert o.record is not None
            await w.append(o.record)
        w.close()

    asyncio.run(spool())
    with Engine(project.engine_url) as engine:
        SpoolLoader(engine, list(project.config.sources), proj / "spool").run_once()

    r = runner.invoke(app, ["failed", "list", "-p", str(proj)])
    assert r.exit_code == 0 and "source" in r.output, r.output
    r = runner.invoke(app, ["failed", "list", "-p", str(proj), "--json"])
    rows = [json.loads(line) for line in r.output.splitlines()]
    ids = {row["reason_code"]: row["failure_id"] for row in rows}
    assert set(ids) == {"bad_write_key", "missing_identity"}

    r = runner.invoke(app, ["failed", "show", ids["bad_write_key"], "-p", str(proj)])
    assert (
        r.exit_code == 0 and "wk_typo_0000" in r.output and "reason_code: bad_write_key" in r.output
    )
    assert runner.invoke(app, ["failed", "show", "f_nope", "-p", str(proj)]).exit_code == 1

    # The missing-identity message is still refused; the bad-key one needs --to-source.
    r = runner.invoke(app, ["failed", "replay", "-p", str(proj)])
    assert r.exit_code == 0, r.output
    assert "0 resolved" in r.output and "1 still failing" in r.output and "1 skipped" in r.output
    r = runner.invoke(
        app,
        ["failed", "replay", "-p", str(proj), "--reason", "bad_write_key", "--to-source", web.name],
    )
    assert r.exit_code == 0 and "1 resolved (1 messages accepted" in r.output, r.output
    # Replaying again finds nothing to do; the message is stored once.
    r = runner.invoke(app, ["failed", "replay", "-p", str(proj), "--to-source", web.name])
    assert "0 resolved" in r.output
    with Engine(project.engine_url) as engine:
        events = engine.to_arrow(engine.table("events")).to_pylist()
        left = engine.to_arrow(engine.table("failed_events")).to_pylist()
    assert [(e["message_id"], e["source"]) for e in events] == [("r1", web.name)]
    assert [f["reason_code"] for f in left] == ["missing_identity"]


def test_import_then_sql_read_only(tmp_path: Path) -> None:
    proj = tmp_path / "brand"
    runner.invoke(app, ["init", str(proj)])
    events = tmp_path / "events.jsonl"
    events.write_text(
        "\n".join(
            json.dumps({"type": "track", "event": "E", "userId": f"u{i}", "messageId": f"j{i}"})
            for i in range(5)
        )
        + "\n{not json\n"
    )
    r = runner.invoke(app, ["import", str(events), "--source", "web", "-p", str(proj)])
    assert r.exit_code == 0, r.output
    assert "received 6, accepted 5, failed 1, duplicate 0" in r.output
    orders = tmp_path / "orders.csv"
    orders.write_text(
        "order_id,member,amount,at\no1,m1,10.5,2024-03-01T10:00:00Z\n"
        "o2,,3,2024-03-01T11:00:00Z\no3,m3,7,2024-03-02T09:00:00Z\n"
    )
    mapping = tmp_path / "orders.yaml"
    mapping.write_text(
        "type: track\nevent: Order Completed\nmessage_id_from: [order_id]\nuser_id: member\n"
        "timestamp: at\nproperties: {order_id: order_id, revenue: amount}\n"
    )
    args = ["import", str(orders), "--source", "pos", "--mapping", str(mapping), "-p", str(proj)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "accepted 2, failed 1" in r.output, r.output
    r = runner.invoke(app, args)  # a re-run adds nothing
    assert "accepted 0, failed 1, duplicate 2" in r.output, r.output

    q = "SELECT source, count(*) AS n, sum(revenue) AS revenue FROM events GROUP BY 1 ORDER BY 1"
    r = runner.invoke(app, ["sql", q, "-p", str(proj)])
    assert r.exit_code == 0, r.output
    assert "pos" in r.output and "17.5" in r.output and "web" in r.output
    out = tmp_path / "out.csv"
    r = runner.invoke(app, ["sql", q, "-p", str(proj), "--csv", str(out)])
    assert r.exit_code == 0 and "2 rows written" in r.output
    assert out.read_text().splitlines()[1:] == ['"pos",2,17.5', '"web",5,']
    for refused in (
        "DELETE FROM events",
        "CREATE TABLE x AS SELECT 1",
        f"COPY events TO '{tmp_path / 'leak.csv'}'",
        f"SELECT * FROM read_csv('{orders}')",  # noqa: S608 - the test's own path
    ):
        r = runner.invoke(app, ["sql", refused, "-p", str(proj)])
        assert r.exit_code == 2, (refused, r.output)
    assert not (tmp_path / "leak.csv").exists()
    with Engine(load_project(proj).engine_url) as engine:
        assert engine.count("events") == 7


WELCOME_BACK = """\
name: welcome_back
audience: everyone
holdout: 0.01
template: "hello {{ name }}"
trigger: {event: Product Added}
steps:
  - {id: hello, send: {template: "welcome back {{ name }}"}}
"""


def test_serve_runs_the_journey_worker_on_events_as_they_arrive(tmp_path: Path) -> None:
    """With a triggered campaign, `serve` loads through the worker, which messages at once."""
    from tests.activate.test_journey import IDENTITY, SEGMENT, outbox_lines, people

    proj = tmp_path / "brand"
    (proj / "segments").mkdir(parents=True)
    (proj / "campaigns").mkdir()
    (proj / "closedloop.yaml").write_text(
        "name: brand\nengine: duckdb:///warehouse.duckdb\ntimezone: UTC\nsources:\n"
        "  - {name: web, channel: web, write_key: wk_web_0123456789}\n"
    )
    (proj / "identity.yaml").write_text(IDENTITY)
    (proj / "segments" / "everyone.yaml").write_text(SEGMENT)
    (proj / "campaigns" / "welcome_back.yaml").write_text(WELCOME_BACK)
    project = load_project(proj)
    with Engine(project.engine_url) as engine:
        ids = people(engine, 3)
    proc, url = _serve(proj)
    try:
        sent = request(
            url + "/v1/t",
            {"userId": ids[1], "event": "Product Added", "writeKey": "wk_web_0123456789"},
        )
        assert sent.status == 200
        deadline = time.monotonic() + 60
        while not outbox_lines(proj / "outbox"):
            assert proc.poll() is None, "serve exited"
            assert time.monotonic() < deadline, "the worker sent nothing within 60 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    lines = outbox_lines(proj / "outbox")
    assert [(x["customer_id"], x["body"]) for x in lines] == [(ids[1], "welcome back N1")]
