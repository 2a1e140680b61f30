"""`closedloop sources [--json]`: every source with its channel, data class and whole write key."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from closedloop.cli.main import app, console
from closedloop.core.definitions import load_project


def test_sources_lists_whole_write_keys(tmp_path: Path) -> None:
    runner = CliRunner()
    project = tmp_path / "brand"
    assert runner.invoke(app, ["init", str(project)]).exit_code == 0
    sources = load_project(project).config.sources
    # A narrow terminal: other columns give way, the keys do not. (Through COLUMNS, read at
    # each print: setting console.width would freeze the width for every later test.)
    table = runner.invoke(app, ["sources", "-p", str(project)], env={"COLUMNS": "70"})
    assert console.size.width == 80  # the width came from the environment, and went with it
    assert table.exit_code == 0, table.output
    assert max(len(line) for line in table.output.splitlines()) <= 70
    for s in sources:
        assert s.write_key in table.output  # names may wrap in a narrow table; keys never
    listed = runner.invoke(app, ["sources", "-p", str(project), "--json"])
    assert listed.exit_code == 0
    rows = json.loads(listed.output)
    assert [(r["name"], r["channel"], r["data_class"], r["write_key"]) for r in rows] == [
        (s.name, s.channel, s.data_class.value, s.write_key) for s in sources
    ]
    assert len({r["write_key"] for r in rows}) == len(rows) >= 5
