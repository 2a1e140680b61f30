"""Account segments through the whole build, and `closedloop account ...` on the result."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from closedloop.cli import account_cmds
from closedloop.core.clock import Clock
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.demo.generator import REFERENCE_TIME, generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.pipeline import build, check_project

pytestmark = pytest.mark.slow  # a whole build of a generated brand (~20 s here)
runner = CliRunner()
AS_OF = "2026-11-20T00:00:00+00:00"
BIG = """\
name: big_accounts
of: accounts
where:
  all:
    - {trait: employees, op: gte, value: 51}
    - {trait: contacts, op: gte, value: 2}
"""
BUYERS = """\
name: b2b_buyers
of: accounts
where:
  contacts:
    role: decision_maker
    did: {event: Order Completed, count: {op: gte, value: 1}}
"""
BAD = """\
name: bad_accounts
of: accounts
where:
  any:
    - {trait: employes, op: gte, value: 51}
    - {event: Order Completed}
"""


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("noop")(lambda: None)  # a group, so `account` stays a sub-command
    account_cmds.register(app)
    return app


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("acct")
    generate(root / "brand", 400, seed=5, accounts=12)
    p = root / "p"
    init_project(p, data_dir=relative_data_dir(p, root / "brand" / "data"))
    (p / "segments" / "big_accounts.yaml").write_text(BIG)
    (p / "segments" / "b2b_buyers.yaml").write_text(BUYERS)
    with Engine(load_project(p).engine_url) as engine:
        report = build(engine, load_project(p), clock=Clock(REFERENCE_TIME))
    assert report.segments["big_accounts"].size > 0
    assert report.segments["b2b_buyers"].size > 0
    assert report.segments["lapsed_buyers"].size > 0  # customer segments as before
    yield p


def truth(project: Path, name: str) -> list[dict[str, object]]:
    brand = project.parent / "brand" / "truth"
    return pq.read_table(brand / f"{name}.parquet").to_pylist()


def test_the_build_selects_accounts_by_traits(project: Path) -> None:
    contacts: dict[str, int] = {}
    for c in truth(project, "account_contacts"):
        contacts[str(c["account_id"])] = contacts.get(str(c["account_id"]), 0) + 1
    want = {
        a["account_id"]
        for a in truth(project, "accounts")
        if int(a["employees"]) >= 51 and contacts[str(a["account_id"])] >= 2  # type: ignore[call-overload]
    }
    with Engine(load_project(project).engine_url) as engine:
        m = engine.table("account_membership").to_pyarrow().to_pylist()
        # account segments leave customer memberships alone
        seg = engine.table("segment_membership")
        assert seg.filter(seg.segment == "big_accounts").count().execute() == 0
    assert {r["account_id"] for r in m if r["segment"] == "big_accounts"} == want


def test_account_show_lists_contacts_with_roles(project: Path) -> None:
    acct = truth(project, "accounts")[0]
    r = runner.invoke(
        cli(), ["account", "show", str(acct["account_id"]), "--json", "-p", str(project)]
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["account"]["industry"] == acct["industry"]
    assert doc["account"]["employees"] == acct["employees"]
    roles = sorted(
        c["role"]
        for c in truth(project, "account_contacts")
        if c["account_id"] == acct["account_id"]
    )
    assert sorted(c["role"] for c in doc["contacts"]) == roles
    assert all(c["contact_name"] for c in doc["contacts"])  # profiles joined
    r = runner.invoke(cli(), ["account", "show", str(acct["account_id"]), "-p", str(project)])
    assert r.exit_code == 0 and "decision_maker" in r.output
    r = runner.invoke(cli(), ["account", "show", "acct_nope", "-p", str(project)])
    assert r.exit_code == 1 and "no account 'acct_nope'" in r.output
    r = runner.invoke(cli(), ["account", "list", "-p", str(project)])
    assert r.exit_code == 0 and "12 accounts" in r.output


def test_size_preview_export(project: Path, tmp_path: Path) -> None:
    base = ["-p", str(project), "--as-of", AS_OF]
    r = runner.invoke(cli(), ["account", "size", "big_accounts", *base])
    assert r.exit_code == 0, r.output
    total = int(r.output.split(":")[1].split()[0])
    wide = {"COLUMNS": "300"}
    r = runner.invoke(cli(), ["account", "preview", "b2b_buyers", *base], env=wide)
    assert r.exit_code == 0 and "contacts (decision_maker) who did Order Completed" in r.output
    out = tmp_path / "big.parquet"
    r = runner.invoke(cli(), ["account", "export", "big_accounts", "--out", str(out), *base])
    assert r.exit_code == 0, r.output
    data = pq.read_table(out)
    assert data.num_rows == total and "industry" in data.column_names
    assert min(data.column("employees").to_pylist()) >= 51
    r = runner.invoke(cli(), ["account", "size", "lapsed_buyers", *base])
    assert r.exit_code == 2 and "no account segment 'lapsed_buyers'" in r.output


def test_a_wrong_account_segment_fails_validation_with_lines(tmp_path: Path) -> None:
    init_project(tmp_path / "p")
    (tmp_path / "p" / "segments" / "bad_accounts.yaml").write_text(BAD)
    problems = [str(p) for p in check_project(load_project(tmp_path / "p"))]
    assert any(
        p.startswith("segments/bad_accounts.yaml:5 [where.any.0.trait]") and "'employees'" in p
        for p in problems
    ), problems
    assert any(
        p.startswith("segments/bad_accounts.yaml:6 [where.any.1.event]") for p in problems
    ), problems


def test_validate_reports_accounts_yaml_with_lines(tmp_path: Path) -> None:
    from closedloop.cli.main import app

    init_project(tmp_path / "p")
    r = runner.invoke(app, ["validate", "-p", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    (tmp_path / "p" / "accounts.yaml").write_text(
        "role_sources:\n  - {from: crm, trait: title}\ndefault_role: boss\n"
    )
    r = runner.invoke(app, ["validate", "-p", str(tmp_path / "p")], env={"COLUMNS": "300"})
    assert r.exit_code == 2
    assert "accounts.yaml:2 [role_sources.0.from]" in r.output
    assert "accounts.yaml:3 [default_role]" in r.output
    # accounts.yaml is part of the project: every command refuses it broken, not only validate
    r = runner.invoke(app, ["account", "list", "-p", str(tmp_path / "p")], env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "accounts.yaml:3 [default_role]" in r.output
    (tmp_path / "p" / "accounts.yaml").write_text("default_role: finance\n")
    r = runner.invoke(app, ["account", "list", "-p", str(tmp_path / "p")])
    assert r.exit_code == 0 and "0 accounts" in r.output


def test_segment_commands_answer_account_segments_too(project: Path, tmp_path: Path) -> None:
    """`closedloop segment size|preview|export` on an of: accounts segment: accounts, not customers."""
    from closedloop.cli import segment_cmds

    app = typer.Typer()
    app.command("noop")(lambda: None)
    segment_cmds.register(app)
    base = ["-p", str(project), "--as-of", AS_OF]
    expected = runner.invoke(cli(), ["account", "size", "big_accounts", *base]).output
    r = runner.invoke(app, ["segment", "size", "big_accounts", *base])
    assert r.exit_code == 0, r.output
    assert r.output == expected and " accounts" in r.output
    r = runner.invoke(app, ["segment", "preview", "b2b_buyers", *base], env={"COLUMNS": "300"})
    assert r.exit_code == 0 and "account_id" in r.output, r.output
    out = tmp_path / "big.csv"
    r = runner.invoke(app, ["segment", "export", "big_accounts", "--out", str(out), *base])
    assert r.exit_code == 0, r.output
    assert out.read_text().splitlines()[0].startswith('"account_id"')
    r = runner.invoke(app, ["segment", "export", "big_accounts", "--webhook", "http://x", *base])
    assert r.exit_code == 2 and "export it with --out FILE" in r.output
