"""`closedloop profile IDENTIFIER` on a real built project."""

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
    root = tmp_path_factory.mktemp("profile-cli")
    generate(root / "brand", 120, seed=5)
    p = root / "p"
    init_project(p, data_dir=relative_data_dir(p, root / "brand" / "data"))
    r = runner.invoke(app, ["build", "-p", str(p)])
    assert r.exit_code == 0, r.output
    return p


def a_member(p: Path) -> dict[str, str]:
    with Engine(load_project(p).engine_url) as e:
        m = e.table("identity_map")
        row = (
            m.filter((m.id_type == "email") & ~m.quarantined)
            .order_by("id_value")
            .limit(1)
            .to_pyarrow()
            .to_pylist()[0]
        )
    return {"email": row["id_value"], "customer_id": row["customer_id"]}


def test_profile_by_email_as_json_and_table(built: Path) -> None:
    who = a_member(built)
    r = runner.invoke(app, ["profile", who["email"].upper(), "--json", "-p", str(built)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["customer_id"] == who["customer_id"]
    assert doc["matched"] == {"type": "email", "value": who["email"]}
    assert doc["source"] == "serving"
    assert doc["profile"]["customer_id"] == who["customer_id"]
    r = runner.invoke(app, ["profile", who["email"], "--type", "email", "-p", str(built)])
    assert r.exit_code == 0, r.output
    assert f"customer {who['customer_id']}" in r.output and "from the serving" in r.output


def test_profile_errors(built: Path) -> None:
    r = runner.invoke(app, ["profile", "nobody@example.org", "-p", str(built)])
    assert r.exit_code == 1 and "no customer" in r.output
    r = runner.invoke(app, ["profile", "x", "--type", "shoe_size", "-p", str(built)])
    assert r.exit_code == 2 and "unknown identifier type" in r.output
    r = runner.invoke(app, ["profile", "x", "-p", str(built / "nowhere")])
    assert r.exit_code == 2
