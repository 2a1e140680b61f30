"""`closedloop refresh` on a real built project."""

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


def snapshot(project: Path) -> list[dict[str, object]]:
    with Engine(load_project(project).engine_url) as e:
        rows: list[dict[str, object]] = (
            e.table("profiles").drop("computed_at").order_by("customer_id").to_pyarrow().to_pylist()
        )
    # Sums of floats may add in another order (parallel scans): equal to rounding.
    return [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in rows]


@pytest.mark.slow  # generates a brand and builds it three times
def test_refresh_rolls_forward_and_matches_a_full_build(tmp_path: Path) -> None:
    generate(tmp_path / "brand", 200, seed=4)
    p = tmp_path / "p"
    init_project(p, data_dir=relative_data_dir(p, tmp_path / "brand" / "data"))
    r = runner.invoke(app, ["refresh", "-p", str(p), "--as-of", "2026-11-20T00:00:00"])
    assert r.exit_code == 0, r.output
    assert "portrait (full)" in r.output  # nothing to start from yet
    r = runner.invoke(app, ["refresh", "-p", str(p), "--as-of", "2026-12-20T00:00:00"])
    assert r.exit_code == 0, r.output
    assert "portrait (incremental)" in r.output and "segment lapsed_buyers" in r.output
    incremental = snapshot(p)
    r = runner.invoke(app, ["refresh", "-p", str(p), "--full", "--as-of", "2026-12-20T00:00:00"])
    assert r.exit_code == 0 and "portrait (full)" in r.output, r.output
    assert snapshot(p) == incremental
    r = runner.invoke(app, ["refresh", "-p", str(tmp_path / "nowhere")])
    assert r.exit_code != 0
