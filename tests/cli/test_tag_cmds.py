"""`closedloop tags list|show`, `tag set|clear|history` and `personas` on a real built project."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from closedloop.cli.main import app
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir

runner = CliRunner()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tags")
    generate(root / "brand", 400, seed=2)
    init_project(root / "p", data_dir=relative_data_dir(root / "p", root / "brand" / "data"))
    r = runner.invoke(app, ["build", "-p", str(root / "p")])
    assert r.exit_code == 0, r.output
    return root / "p"


def _list(built: Path) -> dict[str, dict[str, object]]:
    r = runner.invoke(app, ["tags", "list", "-p", str(built), "--json"])
    assert r.exit_code == 0, r.output
    return {str(t["name"]): t for t in json.loads(r.output)}


def test_list_shows_every_tag_with_coverage_freshness_and_flags(built: Path) -> None:
    tags = _list(built)
    project = load_project(built)
    assert set(tags) == set(project.tags)
    with Engine(project.engine_url) as engine:
        total = engine.count("profiles")
        tv = engine.table("tag_values")
        n = int(tv.filter(tv.tag == "aov_quartile").count().execute())
    q = tags["aov_quartile"]
    assert q["customers"] == n > 0 and q["coverage"] == pytest.approx(n / total)
    assert q["path"] == ["rfm_group_tag", "aov_quartile"] and q["owner"] == "crm-team"
    assert sum(q["values"].values()) == n  # type: ignore[union-attr]
    assert q["computed_at"] is not None and q["stale"] is False
    assert "no scores yet" in str(tags["churn_risk"]["note"])
    assert tags["repeat_buyer"]["customers"] > 0
    r = runner.invoke(app, ["tags", "list", "-p", str(built)])
    assert r.exit_code == 0 and "aov_quartile" in r.output


def test_show_one_tag_and_unknown_tag(built: Path) -> None:
    r = runner.invoke(app, ["tags", "show", "first_category", "-p", str(built)])
    assert r.exit_code == 0, r.output
    assert "coverage:" in r.output and "merchandising" in r.output
    r = runner.invoke(app, ["tags", "show", "nope", "-p", str(built)])
    assert r.exit_code == 2 and "no tag 'nope'" in r.output


def test_manual_tag_set_clear_and_history(built: Path) -> None:
    project = load_project(built)
    with Engine(project.engine_url) as engine:
        cid = str(engine.table("customers").customer_id.min().execute())
    r = runner.invoke(
        app, ["tag", "set", cid, "vip_flag", "vip", "--by", "alice", "-p", str(built)]
    )
    assert r.exit_code == 0, r.output
    assert _list(built)["vip_flag"]["values"] == {"vip": 1}  # at once, before any build
    r = runner.invoke(app, ["tag", "set", cid, "vip_flag", "gold", "--by", "bob", "-p", str(built)])
    assert r.exit_code == 2 and "allowed: vip, watch" in r.output
    r = runner.invoke(
        app, ["tag", "set", cid, "value_band", "high", "--by", "bob", "-p", str(built)]
    )
    assert r.exit_code == 2 and "only manual tags" in r.output
    r = runner.invoke(
        app, ["tag", "set", "c_nobody", "vip_flag", "vip", "--by", "bob", "-p", str(built)]
    )
    assert r.exit_code == 2 and "no customer" in r.output
    r = runner.invoke(
        app, ["tag", "clear", cid, "vip_flag", "--by", "carol", "--note", "left", "-p", str(built)]
    )
    assert r.exit_code == 0, r.output
    assert _list(built)["vip_flag"]["customers"] == 0
    r = runner.invoke(app, ["tag", "history", cid, "-p", str(built), "--json"])
    rows = json.loads(r.output)
    assert [(x["value"], x["set_by"]) for x in rows] == [("vip", "alice"), (None, "carol")]
    # A rebuild keeps manual settings (the latest one: cleared).
    r = runner.invoke(app, ["build", "-p", str(built)])
    assert r.exit_code == 0, r.output
    assert _list(built)["vip_flag"]["customers"] == 0


def test_personas_command(built: Path) -> None:
    r = runner.invoke(
        app,
        [
            "personas",
            "--traits",
            "recency_days,orders,revenue",
            "--k",
            "3",
            "-p",
            str(built),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["k"] == 3 and len(out["cards"]) == 3
    assert sum(c["size"] for c in out["cards"]) == out["customers"]
    r = runner.invoke(app, ["personas", "--traits", "recency_days,city", "-p", str(built)])
    assert r.exit_code == 2 and "not a numeric profile field" in r.output
    r = runner.invoke(app, ["personas", "--traits", "recency_days,events", "-p", str(built)])
    assert r.exit_code == 0 and "typical member" in r.output
