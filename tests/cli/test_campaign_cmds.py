"""`closedloop campaign dry-run|run` and `closedloop report campaign` on a real built project."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from closedloop.cli.main import app
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir

runner = CliRunner()
AS_OF = "2026-11-20T10:00:00+00:00"


@pytest.fixture
def built(tmp_path: Path) -> Path:
    generate(tmp_path / "brand", 500, seed=4)
    init_project(
        tmp_path / "p", data_dir=relative_data_dir(tmp_path / "p", tmp_path / "brand" / "data")
    )
    r = runner.invoke(app, ["build", "-p", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    return tmp_path / "p"


def deliveries(project: Path) -> int:
    with Engine(load_project(project).engine_url) as engine:
        return engine.count("deliveries")


def test_dry_run_writes_nothing_then_run_and_report(built: Path) -> None:
    args = ["winback", "-p", str(built), "--as-of", AS_OF, "--occasion", "o1"]
    r = runner.invoke(app, ["campaign", "dry-run", *args])
    assert r.exit_code == 0, r.output
    assert "would be messaged" in r.output and "no_consent" in r.output
    assert deliveries(built) == 0
    assert not (built / "outbox").exists()
    r = runner.invoke(app, ["campaign", "run", *args])
    assert r.exit_code == 0, r.output
    decided = deliveries(built)
    assert decided > 0 and "outbox:" in r.output
    r = runner.invoke(app, ["campaign", "run", *args])
    assert f"({decided:,} already decided)" in r.output and deliveries(built) == decided
    r = runner.invoke(
        app,
        [
            "report",
            "campaign",
            "winback",
            "--occasion",
            "o1",
            "-p",
            str(built),
            "--as-of",
            "2026-12-04T00:00:00+00:00",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "absolute lift, 95% CI" in r.output
    assert (built / "reports" / "winback-o1" / "report.html").exists()


def test_unknown_campaign(built: Path) -> None:
    r = runner.invoke(app, ["campaign", "dry-run", "nope", "-p", str(built)])
    assert r.exit_code == 2 and "no campaign 'nope'" in r.output
