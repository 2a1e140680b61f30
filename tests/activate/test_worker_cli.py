"""``closedloop worker`` and ``closedloop validate`` on a journey project with a DuckDB file."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from typer.testing import CliRunner

from closedloop.cli.main import app
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from tests.activate.test_journey import CART, T0, make_project, outbox_lines, people
from tests.conftest import add_events

runner = CliRunner()


def test_worker_once_sends_and_validate_reports_bad_journeys(tmp_path: Path) -> None:
    root = tmp_path / "p"
    make_project(root, {"cart": CART})
    (root / "closedloop.yaml").write_text(
        (root / "closedloop.yaml").read_text().replace('"duckdb://"', "duckdb:///wh.duckdb")
    )
    project = load_project(root)
    with Engine(project.engine_url) as engine:
        ids = people(engine, 3)
        add_events(
            engine,
            [
                {
                    "message_id": f"a{i}",
                    "user_id": c,
                    "event": "Product Added",
                    "timestamp": T0,
                    "properties": {"category": "tea"},
                }
                for i, c in enumerate(ids)
            ],
        )
    for minutes in (1, 125):
        at = (T0 + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S")
        r = runner.invoke(app, ["worker", "--once", "--as-of", at, "-p", str(root)])
        assert r.exit_code == 0, r.output
    assert "sent" in r.output
    lines = outbox_lines(root / "outbox")
    assert lines and {x["customer_id"] for x in lines} <= set(ids)
    # --as-of without --once is refused; so is a journey on an unknown trait.
    r = runner.invoke(app, ["worker", "--as-of", "2026-11-20", "-p", str(root)])
    assert r.exit_code == 2 and "--once" in r.output
    bad = (root / "campaigns" / "cart.yaml").read_text() + (
        "  - id: vip\n    branch: {when: {trait: tierr, op: eq, value: gold}, then: done, else: done}\n"
    )
    (root / "campaigns" / "cart.yaml").write_text(bad)
    r = runner.invoke(app, ["validate", "-p", str(root)])
    assert r.exit_code == 2
    assert "campaigns/cart.yaml:19 [steps.3.branch.when.trait]: unknown trait 'tierr'" in r.output
    r = runner.invoke(app, ["worker", "--once", "-p", str(root)])
    assert r.exit_code == 2 and "unknown trait 'tierr'" in r.output


def test_run_worker_loads_the_spool_and_reacts_until_stopped(tmp_path: Path) -> None:
    import asyncio
    import base64
    import json
    import threading
    import time
    from datetime import UTC, datetime

    from closedloop.activate.worker import run_worker
    from closedloop.collect.ingest import Collector
    from closedloop.collect.spool import SpoolWriter

    root = tmp_path / "p"
    make_project(root, {"cart": CART.replace("steps:", "steps: []\nx_steps:").split("x_steps:")[0]})
    (root / "closedloop.yaml").write_text(
        (root / "closedloop.yaml").read_text().replace('"duckdb://"', "duckdb:///wh.duckdb")
    )
    project = load_project(root)
    with Engine(project.engine_url) as engine:
        people(engine, 3)
    spool = root / "spool"
    lines: list[str] = []
    stop = threading.Event()
    worker = threading.Thread(
        target=run_worker,
        args=(project,),
        kwargs={"interval": 0.05, "spool": spool, "stop": stop, "on_tick": lines.append},
    )
    worker.start()
    try:
        now = datetime.now(UTC)
        body = json.dumps(
            {
                "userId": "c001",
                "event": "Product Added",
                "messageId": "m-1",
                "timestamp": now.isoformat(),
                "properties": {"category": "tea"},
            }
        ).encode()
        auth = "Basic " + base64.b64encode(b"wk_web_0123456789:").decode()
        out = Collector(project.config.sources).prepare(
            "track", body, {"authorization": auth}, None, "127.0.0.1", now
        )
        assert out.status == 200 and out.record is not None

        async def spooled() -> None:
            writer = SpoolWriter(spool)
            await writer.append(out.record)  # type: ignore[arg-type]
            writer.close()

        asyncio.run(spooled())
        deadline = time.monotonic() + 60
        while not outbox_lines(root / "outbox") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert not worker.is_alive()
    sent = outbox_lines(root / "outbox")
    assert [x["customer_id"] for x in sent] == ["c001"]
    assert lines and "entered 1" in lines[0]
