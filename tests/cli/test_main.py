"""The CLI as a user meets it: exit codes and messages."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from closedloop.cli.main import app

runner = CliRunner()


def test_init_validate_sources(tmp_path: Path) -> None:
    target = tmp_path / "brand"
    r = runner.invoke(app, ["init", str(target)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["validate", "-p", str(target)])
    assert r.exit_code == 0, r.output
    assert "8 sources" in r.output and "1 campaigns" in r.output
    r = runner.invoke(app, ["sources", "-p", str(target), "--json"])
    assert r.exit_code == 0
    rows = json.loads(r.output)
    assert {row["name"] for row in rows} >= {"web", "pos", "crm"}
    assert len({row["write_key"] for row in rows}) == len(rows)


def test_validate_reports_problems_with_exit_code_2(tmp_path: Path) -> None:
    target = tmp_path / "brand"
    runner.invoke(app, ["init", str(target)])
    seg = target / "segments" / "champions.yaml"
    seg.write_text("name: champions\nwhere: {trait: rfm_group, op: eq, value: 5}\n")
    r = runner.invoke(app, ["validate", "-p", str(target)])
    assert r.exit_code == 2
    assert "segments/champions.yaml" in r.output and "is string" in r.output


def test_init_twice_fails_cleanly(tmp_path: Path) -> None:
    runner.invoke(app, ["init", str(tmp_path)])
    r = runner.invoke(app, ["init", str(tmp_path)])
    assert r.exit_code == 2 and "already holds" in r.output


def test_demo_refuses_a_folder_that_is_not_its_own(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    r = runner.invoke(app, ["demo", "--persons", "100", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "not an earlier demo" in r.output
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_build_with_missing_inputs_fails_before_loading(tmp_path: Path) -> None:
    target = tmp_path / "brand"
    runner.invoke(app, ["init", str(target)])
    r = runner.invoke(app, ["build", "-p", str(target)])
    assert r.exit_code == 2
    assert "import 'web_events': no file matches" in r.output
    from closedloop.core.definitions import load_project
    from closedloop.core.engine import Engine

    with Engine(load_project(target).engine_url) as engine:
        assert not engine.exists("events")
