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
