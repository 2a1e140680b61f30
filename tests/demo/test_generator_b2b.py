"""The generator's optional B2B slice: accounts, contacts with roles, and their ground truth."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tests.identity.test_resolve import CONFIG

from closedloop.collect.loader import load_jsonl
from closedloop.core.clock import Clock
from closedloop.core.definitions import Source
from closedloop.core.engine import Engine
from closedloop.demo.generator import REFERENCE_TIME, generate
from closedloop.identity.resolve import resolve
from closedloop.portrait.accounts import build_accounts

PERSONS = 1500
ACCOUNTS = 25


@pytest.fixture(scope="module")
def brands(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("b2b")
    generate(root / "plain", PERSONS, seed=3)
    generate(root / "b2b", PERSONS, seed=3, accounts=ACCOUNTS)
    return root / "plain", root / "b2b"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_consumer_brand_is_the_same_with_or_without_accounts(brands: tuple[Path, Path]) -> None:
    plain, b2b = brands
    files = sorted(p.relative_to(plain) for p in plain.rglob("*") if p.is_file())
    assert files, "nothing generated"
    for rel in files:
        if rel.name != "manifest.json":
            assert digest(plain / rel) == digest(b2b / rel), rel
    extra = {p.relative_to(b2b) for p in b2b.rglob("*") if p.is_file()} - set(files)
    assert extra == {
        Path("data/events/web/b2b-00000.jsonl"),
        Path("data/events/app/b2b-00000.jsonl"),
        Path("truth/accounts.parquet"),
        Path("truth/account_contacts.parquet"),
        Path("truth/b2b_messages.parquet"),
    }
    a = json.loads((plain / "manifest.json").read_text())
    b = json.loads((b2b / "manifest.json").read_text())
    assert "b2b" not in a and b["b2b"]["accounts"] == ACCOUNTS
    assert b["counts"]["messages"] == a["counts"]["messages"] + b["b2b"]["messages"]


def test_group_calls_and_context_group_ids(brands: tuple[Path, Path]) -> None:
    _, b2b = brands
    lines = [
        json.loads(line)
        for f in sorted((b2b / "data" / "events").glob("*/b2b-*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    groups = [m for m in lines if m["type"] == "group"]
    accounts = pq.read_table(b2b / "truth" / "accounts.parquet").to_pylist()
    assert {m["groupId"] for m in groups} == {a["account_id"] for a in accounts}
    assert all(m["context"]["groupId"] for m in lines if m["type"] == "track")
    assert all(m["userId"].startswith("M") for m in lines)
    assert {m["event"] for m in lines if m["type"] == "track"} >= {"Order Completed"}


def test_accounts_built_from_the_slice_match_the_truth(brands: tuple[Path, Path]) -> None:
    """Load only the B2B messages (userId is the member id), resolve, and build accounts."""
    _, b2b = brands
    with Engine("duckdb://") as engine:
        for name in ("web", "app"):
            source = Source(name=name, channel=name, write_key=f"wk_{name}_test")
            files = sorted((b2b / "data" / "events" / name).glob("b2b-*.jsonl"))
            load_jsonl(engine, files, source, import_name=f"{name}_b2b")
        resolve(engine, CONFIG, Clock(REFERENCE_TIME))
        assert build_accounts(engine, REFERENCE_TIME) == ACCOUNTS
        built = {r["account_id"]: r for r in engine.table("accounts").to_pyarrow().to_pylist()}
        member = {
            r["customer_id"]: r["id_value"]
            for r in engine.table("identity_map").to_pyarrow().to_pylist()
            if r["id_type"] == "member_id"
        }
        contacts = {
            (r["account_id"], member[r["customer_id"]]): r["role"]
            for r in engine.table("account_contacts").to_pyarrow().to_pylist()
        }
    truth = pq.read_table(b2b / "truth" / "accounts.parquet").to_pylist()
    for t in truth:
        got = built[t["account_id"]]
        for field in ("name", "industry", "region", "size", "employees", "current_software"):
            assert got[field] == t[field], (t["account_id"], field)
    persons = pq.read_table(b2b / "truth" / "persons.parquet", columns=["person_id", "member_id"])
    member_of = dict(zip(*persons.to_pydict().values(), strict=True))
    expected = {
        (r["account_id"], member_of[r["person_id"]]): r["role"]
        for r in pq.read_table(b2b / "truth" / "account_contacts.parquet").to_pylist()
    }
    assert contacts == expected  # the default role rules read every stated role right
    roles = set(expected.values())
    assert roles == {"decision_maker", "finance", "it", "user"}
    for t in truth:
        n = sum(1 for a, _ in expected if a == t["account_id"])
        assert built[t["account_id"]]["contacts"] == n
