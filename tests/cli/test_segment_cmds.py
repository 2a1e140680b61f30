"""`closedloop segment size|preview|export` on a real built project."""

from __future__ import annotations

from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from closedloop.cli.main import app
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir

runner = CliRunner()
AS_OF = "2026-11-20T00:00:00+00:00"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seg")
    generate(root / "brand", 400, seed=2)
    init_project(root / "p", data_dir=relative_data_dir(root / "p", root / "brand" / "data"))
    r = runner.invoke(app, ["build", "-p", str(root / "p")])
    assert r.exit_code == 0, r.output
    return root / "p"


def test_size_preview_and_export_agree(built: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["segment", "size", "lapsed_buyers", "-p", str(built), "--as-of", AS_OF])
    assert r.exit_code == 0, r.output
    total = int(r.output.split(":")[1].split()[0].replace(",", ""))
    assert total > 0
    r = runner.invoke(
        app,
        ["segment", "preview", "tea_regulars", "-p", str(built), "--limit", "3", "--as-of", AS_OF],
    )
    assert r.exit_code == 0, r.output
    assert "Order Completed count in 90d" in r.output
    out = tmp_path / "lapsed.parquet"
    r = runner.invoke(
        app,
        [
            "segment",
            "export",
            "lapsed_buyers",
            "-p",
            str(built),
            "--out",
            str(out),
            "--as-of",
            AS_OF,
        ],
    )
    assert r.exit_code == 0, r.output
    data = pq.read_table(out)
    assert data.num_rows == total
    assert set(data.column("lifecycle_stage").to_pylist()) <= {"silent", "churn_risk"}
    csv = tmp_path / "lapsed.csv"
    runner.invoke(
        app,
        [
            "segment",
            "export",
            "lapsed_buyers",
            "-p",
            str(built),
            "--out",
            str(csv),
            "--as-of",
            AS_OF,
        ],
    )
    assert pacsv.read_csv(csv).num_rows == total


def test_unknown_segment_and_bad_file_type(built: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["segment", "size", "nope", "-p", str(built)])
    assert r.exit_code == 2 and "no segment 'nope'" in r.output
    r = runner.invoke(
        app, ["segment", "export", "champions", "-p", str(built), "--out", str(tmp_path / "x.xlsx")]
    )
    assert r.exit_code == 2 and ".csv or .parquet" in r.output
