"""`closedloop report campaign|funnel|cohorts|programme` on a real built project."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from closedloop.cli.main import app
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir

runner = CliRunner()
AS_OF = "2026-11-20T10:00:00+00:00"
UNTIL = ["--until", "2026-11-20T10:00:00"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    generate(root / "brand", 400, seed=9)
    init_project(root / "p", data_dir=relative_data_dir(root / "p", root / "brand" / "data"))
    r = runner.invoke(app, ["build", "-p", str(root / "p")])
    assert r.exit_code == 0, r.output
    args = ["winback", "-p", str(root / "p"), "--as-of", AS_OF, "--occasion", "o1"]
    r = runner.invoke(app, ["campaign", "run", *args])
    assert r.exit_code == 0, r.output
    return root / "p"


def ok(*args: str) -> str:
    r = runner.invoke(app, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.slow
def test_campaign_report_states_the_estimand(built: Path) -> None:
    out = ok(
        "report",
        "campaign",
        "winback",
        "--occasion",
        "o1",
        "-p",
        str(built),
        "--as-of",
        "2026-12-04T00:00:00+00:00",
    )
    assert "intent-to-treat" in out and "absolute lift, 95% CI" in out
    assert "assigned treatment / holdout" in out


@pytest.mark.slow
def test_funnel_overall_and_by_campaign_group(built: Path, tmp_path: Path) -> None:
    steps = ["--step", "Product Viewed", "--step", "Product Added", "--step", "Order Completed"]
    out = ok(
        "report",
        "funnel",
        *steps,
        "-p",
        str(built),
        *UNTIL,
        "--days",
        "365",
        "--out",
        str(tmp_path / "f"),
    )
    assert "Product Added" in out and "all" in out
    html = (tmp_path / "f" / "report.html").read_text()
    assert "Product Viewed → Product Added → Order Completed" in html
    assert (tmp_path / "f" / "funnel.png").exists()
    out = ok(
        "report", "funnel", *steps, "--campaign", "winback", "--occasion", "o1",
        "-p", str(built), "--until", "2026-12-04T00:00:00", "--days", "30", "--out", str(tmp_path / "g"),
    )  # fmt: skip
    assert "treatment" in out and "holdout" in out
    r = runner.invoke(app, ["report", "funnel", *steps, "--campaign", "winback", "-p", str(built)])
    assert r.exit_code == 2 and "--occasion" in r.output
    r = runner.invoke(
        app, ["report", "funnel", "--step", "X", "--segment", "nope", "-p", str(built)]
    )
    assert r.exit_code == 2 and "unknown segment" in r.output


@pytest.mark.slow
def test_cohorts_and_programme(built: Path, tmp_path: Path) -> None:
    out = ok(
        "report",
        "cohorts",
        "--by",
        "channel",
        "-p",
        str(built),
        *UNTIL,
        "--out",
        str(tmp_path / "c"),
    )
    assert "M0" in out and (tmp_path / "c" / "cohorts.png").exists()
    r = runner.invoke(app, ["report", "cohorts", "--by", "city", "-p", str(built)])
    assert r.exit_code == 2 and "source or channel" in r.output
    r = runner.invoke(app, ["report", "programme", "-p", str(built)])
    assert r.exit_code == 2 and "global_control" in r.output
    # This project ran without a global control, so the "control" drawn now was messaged:
    # the report must say so rather than print a clean-looking lift.
    out = ok(
        "report",
        "programme",
        "--share",
        "0.1",
        "-p",
        str(built),
        "--until",
        "2026-12-04T00:00:00",
        "--out",
        str(tmp_path / "p"),
    )
    assert "programme / global control" in out and "global-control customers were messaged" in out
    # With a global control configured, a later run keeps it out, and the report is clean.
    with (built / "closedloop.yaml").open("a") as f:
        f.write("\nglobal_control:\n  share: 0.1\n")
    later = ["--as-of", "2026-11-25T10:00:00+00:00", "--occasion", "o2"]
    ok("campaign", "run", "winback", "-p", str(built), *later)
    out = ok(
        "report",
        "programme",
        "-p",
        str(built),
        "--since",
        "2026-11-25T09:00:00",
        "--until",
        "2026-12-09T00:00:00",
        "--out",
        str(tmp_path / "q"),
    )
    assert "were messaged" not in out
    messaged = next(line for line in out.splitlines() if "messaged in the period" in line)
    assert messaged.rstrip().endswith("/ 0") and not messaged.rstrip().endswith(": 0 / 0")
