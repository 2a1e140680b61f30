"""Data quality: identifiers on many unrelated names are quarantined and reported."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from closedloop.cli.main import app
from closedloop.core.definitions import IdentityConfig, load_project
from closedloop.core.engine import Engine
from closedloop.identity.quality import report
from closedloop.identity.resolve import resolve
from tests.conftest import add_events
from tests.identity.test_resolve import CONFIG, customer_of

CLERK = "13912345678"


def _config(max_names: int | None) -> IdentityConfig:
    data = CONFIG.model_dump(mode="json")
    for t in data["types"]:
        if t["name"] == "phone":
            t["max_names"] = max_names
    return IdentityConfig.model_validate(data)


def _world(engine: Engine) -> None:
    add_events(
        engine,
        [
            # A clerk types the shop's phone for two unrelated walk-in members...
            {"user_id": "M1", "type": "identify", "traits": {"name": "Luo Fang", "phone": CLERK}},
            {"user_id": "M2", "type": "identify", "traits": {"name": "Zhang Peng", "phone": CLERK}},
            # ...while one person typing her own name twice, once with a typo, is one name.
            {
                "user_id": "M3",
                "type": "identify",
                "traits": {"name": "Li Wei", "phone": "13900000001"},
            },
            {
                "user_id": "M4",
                "type": "identify",
                "traits": {"name": "Li Wie", "phone": "13900000001"},
            },
            {"user_id": "M5", "type": "identify", "traits": {"phone": "12345", "name": "X"}},
        ],
    )


def test_phone_on_unrelated_names_is_quarantined_and_listed(engine: Engine) -> None:
    _world(engine)
    resolve(engine, _config(1))
    assert customer_of(engine, "member_id", "M1") != customer_of(engine, "member_id", "M2")
    assert customer_of(engine, "member_id", "M3") == customer_of(engine, "member_id", "M4")
    q = report(engine)
    assert q.suspects.to_pylist()[0]["id_value"] == "+86" + CLERK
    assert q.suspects.num_rows == 1
    reasons = {(r["id_type"], r["reason"]) for r in q.issues.to_pylist()}
    assert ("phone", "invalid phone") in reasons and ("phone", "quarantined") in reasons
    detail = engine.table("identifier_issues").to_pandas().set_index("raw_value")["reason"]
    assert detail["+86" + CLERK] == "quarantined: seen under too many unrelated names"


def test_without_a_limit_suspects_are_listed_but_still_link(engine: Engine) -> None:
    _world(engine)
    resolve(engine, _config(None))
    # Two names are under the default listing threshold: nothing listed, the merge stands.
    assert customer_of(engine, "member_id", "M1") == customer_of(engine, "member_id", "M2")
    assert report(engine).suspects.num_rows == 0


def test_cli_quality(tmp_path: Path) -> None:
    runner = CliRunner()
    target = tmp_path / "brand"
    assert runner.invoke(app, ["init", str(target)]).exit_code == 0
    project = load_project(target)
    with Engine(project.engine_url) as engine:
        _world(engine)
        resolve(engine, project.identity)
    r = runner.invoke(app, ["identity", "quality", "-p", str(target)])
    assert r.exit_code == 0, r.output
    assert "+86" + CLERK in r.output and "invalid phone" in r.output


def test_names_read_from_matching_records_and_incrementally_give_the_same_suspects(
    engine: Engine,
) -> None:
    """With matching configured the names come from its kept records, and an incremental
    run reads only its region's: both must list and quarantine exactly as a full run does."""
    from closedloop.core.definitions import MatchingConfig

    config = _config(1).model_copy(
        update={
            "matching": MatchingConfig.model_validate(
                {"gender": None, "city": None, "blocking": [["birthday"]]}
            )
        }
    )
    first = {"user_id": "M1", "type": "identify", "traits": {"name": "Luo Fang", "phone": CLERK}}
    other = {"message_id": "m-wu", "user_id": "M9", "traits": {"name": "Wu Hao"}}
    add_events(engine, [first, other])
    resolve(engine, config)
    assert report(engine).suspects.num_rows == 0
    # The clerk's phone under a second, unrelated name arrives later: an incremental run.
    second = {
        "message_id": "m-second",
        "user_id": "M2",
        "type": "identify",
        "traits": {"name": "Zhang Peng", "phone": CLERK},
    }
    add_events(engine, [second])
    r = resolve(engine, config)
    runs = engine.table("identity_runs").to_pyarrow().to_pylist()
    assert r.path == "incremental", runs[-1]["why"]
    listed = report(engine).suspects.to_pylist()
    assert [(s["id_value"], s["names"]) for s in listed] == [("+86" + CLERK, 2)]
    assert customer_of(engine, "member_id", "M1") != customer_of(engine, "member_id", "M2")
    before = engine.table("identity_suspects").to_pyarrow()
    resolve(engine, config, incremental=False)
    assert engine.table("identity_suspects").to_pyarrow().equals(before)
