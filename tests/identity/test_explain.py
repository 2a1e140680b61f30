"""Explain and split on a real DuckDB warehouse, through the API and the CLI."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from closedloop.cli.main import app
from closedloop.core.clock import Clock
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.identity.explain import Ident, IdentityError, explain, split
from closedloop.identity.resolve import resolve
from tests.conftest import add_events
from tests.identity.test_resolve import CONFIG, customer_of

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LATER = datetime(2026, 3, 1, tzinfo=UTC)


def _world(engine: Engine) -> None:
    add_events(
        engine,
        [
            {
                "message_id": "a",
                "user_id": "M1",
                "type": "identify",
                "traits": {"phone": "13800138000"},
            },
            {
                "message_id": "b",
                "anonymous_id": "ck1",
                "type": "identify",
                "traits": {"phone": "+8613800138000"},
            },
            {"message_id": "c", "user_id": "M1", "type": "identify", "traits": {"email": "e@x.cn"}},
            # A second member typed the same address: the merge we will want to undo.
            {"message_id": "d", "user_id": "M2", "type": "identify", "traits": {"email": "E@x.cn"}},
        ],
    )


def test_explain_tree_and_path_name_the_messages(engine: Engine) -> None:
    _world(engine)
    resolve(engine, CONFIG)
    c = customer_of(engine, "member_id", "M1")
    ex = explain(engine, CONFIG, c)
    # Root is the highest-priority identifier; every identifier is reached.
    assert ex.root == Ident("member_id", "M1")
    assert not ex.unreachable and len(ex.paths) == 5
    depth = {i: d for d, i, _ in ex.tree()}
    assert depth[Ident("anonymous_id", "ck1")] == 2 and depth[Ident("member_id", "M2")] == 2
    # A path between two named identifiers, raw phone formats accepted.
    ex = explain(engine, CONFIG, c, frm="anonymous_id:ck1", to="member_id:M1")
    hops = ex.paths[Ident("member_id", "M1")]
    assert [h.message_id for h in hops] == ["b", "a"]
    with pytest.raises(IdentityError, match="not an identifier"):
        explain(engine, CONFIG, c, frm="member_id:M1", to="member_id:M9")


def test_explain_follows_aliases(engine: Engine) -> None:
    add_events(
        engine, [{"message_id": "a", "user_id": "M1"}, {"message_id": "b", "anonymous_id": "ck9"}]
    )
    resolve(engine, CONFIG)
    old = {customer_of(engine, "member_id", "M1"), customer_of(engine, "anonymous_id", "ck9")}
    add_events(engine, [{"message_id": "c", "user_id": "M1", "anonymous_id": "ck9"}])
    resolve(engine, CONFIG)
    now = customer_of(engine, "member_id", "M1")
    (alias,) = old - {now}
    ex = explain(engine, CONFIG, alias)
    assert ex.customer_id == now
    assert ex.paths[Ident("anonymous_id", "ck9")][0].message_id == "c"


def test_split_edge_without_block_relinks_on_new_evidence(engine: Engine) -> None:
    _world(engine)
    resolve(engine, CONFIG)
    before = customer_of(engine, "member_id", "M1")
    r = split(
        engine, CONFIG, edge="member_id:M2~email:e@x.cn", reason="two people", clock=Clock(T0)
    )
    assert r.splits == 1
    assert customer_of(engine, "member_id", "M1") == before  # the larger part keeps its id
    m2 = customer_of(engine, "member_id", "M2")
    assert m2 != before
    ledger = engine.table("merge_ledger").to_pandas()
    row = ledger[ledger["action"] == "split"].iloc[0]
    assert row["survivor_id"] == before and row["merged_id"] == m2
    assert "two people" in row["evidence"]
    edges = engine.table("identity_edges").to_pandas()
    assert set(edges.loc[~edges["used"], "status"]) == {"blocked"}
    # Resolving again keeps the split, and records nothing new.
    resolve(engine, CONFIG)
    assert customer_of(engine, "member_id", "M2") == m2
    assert len(engine.table("merge_ledger").to_pandas()) == len(ledger)
    # New evidence after the split links them again (the split removed only past evidence).
    add_events(
        engine,
        [{"message_id": "e", "timestamp": LATER, "user_id": "M2", "traits": {"email": "e@x.cn"}}],
    )
    resolve(engine, CONFIG, Clock(LATER))
    assert customer_of(engine, "member_id", "M2") == customer_of(engine, "member_id", "M1")


def test_split_with_block_holds_for_every_later_resolve(engine: Engine) -> None:
    _world(engine)
    resolve(engine, CONFIG)
    split(engine, CONFIG, identifier="email:e@x.cn", block=True, clock=Clock(T0))
    ids = {customer_of(engine, "member_id", m) for m in ("M1", "M2")}
    assert len(ids) == 2
    add_events(
        engine,
        [{"message_id": "e", "timestamp": LATER, "user_id": "M2", "traits": {"email": "e@x.cn"}}],
    )
    resolve(engine, CONFIG)
    assert customer_of(engine, "member_id", "M2") != customer_of(engine, "member_id", "M1")
    # The phone still links the cookie to M1: only the blocked identifier stopped linking.
    assert customer_of(engine, "anonymous_id", "ck1") == customer_of(engine, "member_id", "M1")


def test_split_refuses_unknown_and_ambiguous_requests(engine: Engine) -> None:
    _world(engine)
    resolve(engine, CONFIG)
    with pytest.raises(IdentityError, match="exactly one"):
        split(engine, CONFIG)
    with pytest.raises(IdentityError, match="not in the identity map"):
        split(engine, CONFIG, identifier="member_id:M404")
    with pytest.raises(IdentityError, match="unknown type"):
        split(engine, CONFIG, identifier="fax:123")
    assert engine.count("identity_blocks") == 0


def test_cli_explain_and_split(tmp_path: Path) -> None:
    runner = CliRunner()
    target = tmp_path / "brand"
    assert runner.invoke(app, ["init", str(target)]).exit_code == 0
    project = load_project(target)
    with Engine(project.engine_url) as engine:
        _world(engine)
        resolve(engine, project.identity)
        c = customer_of(engine, "member_id", "M1")
    r = runner.invoke(app, ["identity", "explain", c, "-p", str(target)])
    assert r.exit_code == 0, r.output
    assert "member_id:M1" in r.output and "message a" in r.output
    assert "└ anonymous_id:ck1" in r.output
    r = runner.invoke(
        app,
        [
            "identity",
            "explain",
            c,
            "-p",
            str(target),
            "--from",
            "anonymous_id:ck1",
            "--to",
            "member_id:M2",
        ],
    )
    assert r.exit_code == 0, r.output
    assert r.output.count("~") == 4  # ck1 ~ phone ~ M1 ~ email ~ M2
    r = runner.invoke(
        app,
        ["identity", "split", "-p", str(target), "--edge", "member_id:M2~email:e@x.cn", "--block"],
    )
    assert r.exit_code == 0, r.output
    assert "1 customer(s) split" in r.output
    r = runner.invoke(app, ["identity", "explain", "c_nobody", "-p", str(target)])
    assert r.exit_code == 2 and "no customer" in r.output
