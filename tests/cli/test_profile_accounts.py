"""`closedloop profile` for B2B: an account's profile by id or domain; a contact's accounts.

A generated brand with accounts is built for real, with an account segment and a customer
segment that reads it (``account_in_segment``), so the membership the profile shows is the
build's own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from closedloop.cli.main import app
from closedloop.cli.profile_cmds import profile_document
from closedloop.core.clock import Clock
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.core.errors import InputError
from closedloop.demo.generator import REFERENCE_TIME, generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.pipeline import build
from closedloop.portrait.accounts import ACCOUNTS
from closedloop.segments.accounts import domain_of, find_accounts
from tests.identity.test_resolve import CONFIG

pytestmark = pytest.mark.slow  # a whole build of a generated brand
runner = CliRunner()
WIDE = {"COLUMNS": "300"}  # rich tables unwrapped, so ids are whole
BIG = """\
name: big_accounts
of: accounts
where:
  all:
    - {trait: employees, op: gte, value: 51}
    - {trait: contacts, op: gte, value: 2}
"""
PEOPLE = """\
name: big_account_people
where:
  account_in_segment: big_accounts
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("profile-acct")
    generate(root / "brand", 300, seed=7, accounts=8)
    p = root / "p"
    init_project(p, data_dir=relative_data_dir(p, root / "brand" / "data"))
    (p / "segments" / "big_accounts.yaml").write_text(BIG)
    (p / "segments" / "big_account_people.yaml").write_text(PEOPLE)
    with Engine(load_project(p).engine_url) as engine:
        report = build(engine, load_project(p), clock=Clock(REFERENCE_TIME))
    assert report.segments["big_accounts"].size > 0
    yield p


def rows(p: Path, table: str) -> list[dict[str, Any]]:
    with Engine(load_project(p).engine_url) as e:
        out: list[dict[str, Any]] = e.table(table).to_pyarrow().to_pylist()
        return out


def profile(p: Path, *args: str) -> Any:
    r = runner.invoke(app, ["profile", *args, "--json", "-p", str(p)])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_an_account_by_its_id(project: Path) -> None:
    truth = pq.read_table(project.parent / "brand" / "truth" / "accounts.parquet").to_pylist()
    big = {
        r["account_id"]
        for r in rows(project, "account_membership")
        if r["segment"] == "big_accounts" and r["exited_at"] is None
    }
    contacts = rows(project, "account_contacts")
    for acct in truth[:3]:
        aid = str(acct["account_id"])
        doc = profile(project, aid)
        assert doc["kind"] == "account" and doc["account_id"] == aid
        assert doc["matched"] == {"type": "account_id", "value": aid}
        assert doc["account"]["industry"] == acct["industry"]
        assert doc["account"]["employees"] == acct["employees"]
        # contacts by role: every role present, each contact under its role
        assert set(doc["contacts"]) == {"decision_maker", "finance", "it", "user"}
        got = {(c["customer_id"], role) for role, cs in doc["contacts"].items() for c in cs}
        want = {(c["customer_id"], c["role"]) for c in contacts if c["account_id"] == aid}
        assert got == want and want
        assert [s["segment"] for s in doc["segments"]] == (["big_accounts"] if aid in big else [])
    r = runner.invoke(app, ["profile", str(truth[0]["account_id"]), "-p", str(project)], env=WIDE)
    assert r.exit_code == 0, r.output
    assert f"account {truth[0]['account_id']}" in r.output and "account segments:" in r.output
    assert "decision_maker" in r.output


def test_a_contact_lists_its_accounts_and_role(project: Path) -> None:
    contacts = rows(project, "account_contacts")
    people = {
        r["customer_id"]
        for r in rows(project, "segment_membership")
        if r["segment"] == "big_account_people" and r["exited_at"] is None
    }
    emails = {
        r["customer_id"]: r["id_value"]
        for r in rows(project, "identity_map")
        if r["id_type"] == "email" and not r["quarantined"]
    }
    contact = next(c for c in contacts if c["customer_id"] in emails)
    cid = contact["customer_id"]
    doc = profile(project, emails[cid])  # found by e-mail, like any customer
    assert doc["kind"] == "customer" and doc["customer_id"] == cid
    mine = {(c["account_id"], c["role"]) for c in contacts if c["customer_id"] == cid}
    assert {(a["account_id"], a["role"]) for a in doc["accounts"]} == mine
    membership = rows(project, "account_membership")
    for a in doc["accounts"]:
        open_ = {
            m["segment"]
            for m in membership
            if m["account_id"] == a["account_id"] and m["exited_at"] is None
        }
        assert set(a["segments"]) == open_
    in_big = any("big_accounts" in a["segments"] for a in doc["accounts"])
    assert (cid in people) == in_big  # the customer segment read the account segment
    r = runner.invoke(app, ["profile", cid, "-p", str(project)], env=WIDE)
    assert r.exit_code == 0 and contact["account_id"] in r.output and contact["role"] in r.output
    # a customer outside every account has an empty list
    other = next(c for c in emails if c not in {x["customer_id"] for x in contacts})
    assert profile(project, other)["accounts"] == []


def test_nothing_matches(project: Path) -> None:
    r = runner.invoke(app, ["profile", "acct_nope", "-p", str(project)])
    assert r.exit_code == 1 and "no customer or account has the identifier 'acct_nope'" in r.output
    r = runner.invoke(app, ["profile", "acct_nope", "--type", "account", "-p", str(project)])
    assert r.exit_code == 1 and "no account has the id or website domain" in r.output
    r = runner.invoke(app, ["profile", "acct_nope", "--json", "-p", str(project)])
    assert r.exit_code == 1 and json.loads(r.output) is None
    # an account id asked for as an e-mail is not an account
    aid = rows(project, "accounts")[0]["account_id"]
    r = runner.invoke(app, ["profile", aid, "--type", "member_id", "-p", str(project)])
    assert r.exit_code == 1 and "no customer has" in r.output


# ---- accounts by website domain (the generator's accounts have none) ----------------------


def test_domain_of() -> None:
    assert domain_of("https://www.Acme.com/about?x=1") == "acme.com"
    assert domain_of("acme.com") == "acme.com"
    assert domain_of("http://shop.acme.com:8080") == "shop.acme.com"
    assert domain_of("acme") is None and domain_of("a b.com") is None


def test_accounts_by_domain(engine: Engine) -> None:
    now = datetime(2026, 11, 20, tzinfo=UTC)
    data = [
        {"account_id": "g1", "name": "Acme", "website": "https://www.acme.com/"},
        {"account_id": "g2", "name": "Zeta", "website": "zeta.io"},
        {"account_id": "g3", "name": "Zeta EU", "website": "http://ZETA.io/eu"},
        {"account_id": "g4", "name": "None", "website": None},
    ]
    full = [{c: None for c in ACCOUNTS.columns} | r | {"computed_at": now} for r in data]
    engine.replace("accounts", pa.Table.from_pylist(full, schema=ACCOUNTS.schema.to_pyarrow()))
    assert find_accounts(engine, "acme.com") == [("g1", "website")]
    assert find_accounts(engine, "http://acme.com/pricing") == [("g1", "website")]
    assert find_accounts(engine, "g2") == [("g2", "account_id")]
    assert find_accounts(engine, "nope.com") == [] and find_accounts(engine, "  ") == []
    identity = CONFIG
    doc = profile_document(engine, identity, "www.acme.com", "account")
    assert doc is not None and doc["account_id"] == "g1" and doc["account"]["name"] == "Acme"
    assert doc["contacts"] == {r: [] for r in ("decision_maker", "finance", "it", "user")}
    with pytest.raises(InputError, match=r"several accounts \(g2, g3\)"):
        profile_document(engine, identity, "zeta.io", "account")
