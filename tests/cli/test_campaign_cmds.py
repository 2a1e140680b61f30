"""`closedloop campaign dry-run|run` and `closedloop report campaign` on a real built project."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from closedloop.cli.main import app
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir

runner = CliRunner()
AS_OF = "2026-11-20T10:00:00+00:00"


@pytest.fixture(scope="module")
def built_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A built project that the tests using it only read."""
    return _build(tmp_path_factory.mktemp("built"))


@pytest.fixture
def built(tmp_path: Path) -> Path:
    return _build(tmp_path)


def _build(tmp_path: Path) -> Path:
    generate(tmp_path / "brand", 500, seed=4)
    init_project(
        tmp_path / "p", data_dir=relative_data_dir(tmp_path / "p", tmp_path / "brand" / "data")
    )
    r = runner.invoke(app, ["build", "-p", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    return tmp_path / "p"


def deliveries(project: Path) -> int:
    with Engine(load_project(project).engine_url) as engine:
        return engine.count("deliveries")


def test_dry_run_writes_nothing_then_run_and_report(built: Path) -> None:
    args = ["winback", "-p", str(built), "--as-of", AS_OF, "--occasion", "o1"]
    r = runner.invoke(app, ["campaign", "dry-run", *args])
    assert r.exit_code == 0, r.output
    assert "would be messaged" in r.output and "no_consent" in r.output
    assert deliveries(built) == 0
    assert not (built / "outbox").exists()
    r = runner.invoke(app, ["campaign", "run", *args])
    assert r.exit_code == 0, r.output
    decided = deliveries(built)
    assert decided > 0 and "outbox:" in r.output
    r = runner.invoke(app, ["campaign", "run", *args])
    assert f"({decided:,} already decided)" in r.output and deliveries(built) == decided
    r = runner.invoke(
        app,
        [
            "report",
            "campaign",
            "winback",
            "--occasion",
            "o1",
            "-p",
            str(built),
            "--as-of",
            "2026-12-04T00:00:00+00:00",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "absolute lift, 95% CI" in r.output
    assert (built / "reports" / "winback-o1" / "report.html").exists()


def test_unknown_campaign(built: Path) -> None:
    r = runner.invoke(app, ["campaign", "dry-run", "nope", "-p", str(built)])
    assert r.exit_code == 2 and "no campaign 'nope'" in r.output


def _preview(project: Path, person: str, *extra: str) -> dict[str, Any]:
    args = ["campaign", "preview", "winback", person, "-p", str(project), "--as-of", AS_OF]
    r = runner.invoke(app, [*args, "--json", *extra])
    assert r.exit_code == 0, r.output
    doc: dict[str, Any] = json.loads(r.output)
    return doc


def _people(project: Path) -> list[dict[str, Any]]:
    with Engine(load_project(project).engine_url) as engine:
        p = engine.table("profiles")
        m = engine.table("segment_membership")
        lapsed = m.filter(m.segment == "lapsed_buyers").select("customer_id").distinct()
        rows: list[dict[str, Any]] = (
            p.join(lapsed, "customer_id", how="left")
            .mutate(inside=lapsed.customer_id.notnull())
            .select("customer_id", "email", "phone", "consent_marketing", "inside", "top_category")
            .order_by("customer_id")
            .to_pyarrow()
            .to_pylist()
        )
    return rows


def test_preview_renders_exactly_what_a_run_sends_and_says_why_not(built: Path) -> None:
    people = _people(built)
    inside = [p for p in people if p["inside"] and p["email"]][:24]  # 24 of ~70: time
    previews = {p["customer_id"]: _preview(built, p["email"]) for p in inside}
    assert all(v["customer_id"] == k for k, v in previews.items())
    # Each rule shows up with its reason: holdout, consent; the rest would be sent.
    verdicts = {k: v["stopped_by"] for k, v in previews.items()}
    assert any(v == ["holdout"] for v in verdicts.values())
    assert any(v == ["no_consent"] for v in verdicts.values())
    assert any(v == [] for v in verdicts.values())
    # The run sends exactly the previewed messages to exactly the people previewed as sendable.
    r = runner.invoke(
        app, ["campaign", "run", "winback", "-p", str(built), "--as-of", AS_OF, "--occasion", "o1"]
    )
    assert r.exit_code == 0, r.output
    sent = {
        m["customer_id"]: m
        for f in (built / "outbox" / "winback").glob("o1*.jsonl")
        for m in map(json.loads, f.read_text().splitlines())
    }
    sendable = {k for k, v in previews.items() if v["would_send"]}
    assert sendable == set(sent) & set(previews) and sendable
    for k in sendable:
        (msg,) = previews[k]["messages"]
        assert (msg["subject"], msg["body"]) == (sent[k]["subject"], sent[k]["body"])
        assert msg["address"] == sent[k]["address"]
        assert previews[k]["personalised"] == sent[k]["personalised"]
    # After the run: the decision is logged, and the cap (one a day) stops another today.
    one = sorted(sendable)[0]
    after = _preview(built, one, "--occasion", "o1")
    assert after["stopped_by"][0].startswith("already_decided for occasion o1: sent")
    other = _preview(built, one, "--occasion", "o2")
    assert other["stopped_by"] == ["frequency_cap"]


def test_preview_by_phone_outside_the_audience_and_bad_requests(built_once: Path) -> None:
    built = built_once
    outside = next(p for p in _people(built) if not p["inside"] and p["phone"])
    doc = _preview(built, outside["phone"])
    assert doc["matched"][0] == "phone" and doc["customer_id"] == outside["customer_id"]
    assert doc["stopped_by"][0] == "not_in_audience (lapsed_buyers)"
    (msg,) = doc["messages"]
    assert "BACK20" in msg["body"] and doc["offer"]["conditions"] in msg["body"]
    r = runner.invoke(app, ["campaign", "preview", "winback", outside["phone"], "-p", str(built)])
    assert r.exit_code == 0 and "not_in_audience" in r.output and "subject:" in r.output
    r = runner.invoke(
        app,
        ["campaign", "preview", "winback", outside["phone"], "-p", str(built), "--variant", "x"],
    )
    assert r.exit_code == 2 and "no variant 'x'" in r.output
    r = runner.invoke(
        app, ["campaign", "preview", "winback", "nobody@nowhere.cn", "-p", str(built)]
    )
    assert r.exit_code == 2 and "no customer has the identifier" in r.output


def test_preview_of_a_person_who_refused_personalisation(built_once: Path) -> None:
    built = built_once
    from closedloop.activate.policy import personalisation_refused

    with Engine(load_project(built).engine_url) as engine:
        refused = personalisation_refused(engine)
    people = [p for p in _people(built) if p["customer_id"] in refused and p["top_category"]]
    assert people, "the generator makes some people refuse personalisation"
    doc = _preview(built, people[0]["customer_id"])
    (msg,) = doc["messages"]
    assert doc["personalised"] is False
    assert people[0]["top_category"] not in msg["body"] and "your favourites" in msg["body"]


def test_dry_run_shows_who_lost_arbitration_and_to_whom(built: Path) -> None:
    camp = built / "campaigns"
    (camp / "winback.yaml").write_text(
        (camp / "winback.yaml").read_text() + "arbitration: priority\n"
    )
    (camp / "thanks.yaml").write_text(
        "name: thanks\naudience: lapsed_buyers\ntemplate: 'Thank you, {{ name }}'\n"
        "priority: 5\narbitration: priority\nholdout: 0.1\n"
    )
    args = ["winback", "-p", str(built), "--as-of", AS_OF, "--show", "500"]
    r = runner.invoke(app, ["campaign", "dry-run", *args], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    assert "lost arbitration to thanks: by priority 5 over 0" in r.output  # and why
    assert "0 would be messaged" in r.output  # every lapsed buyer goes to the higher priority


def test_run_refuses_a_journey_and_sends_nothing(built: Path) -> None:
    """A triggered campaign is entered per person by the worker, never sent to all at once."""
    (built / "campaigns" / "cart.yaml").write_text(
        "name: cart\naudience: lapsed_buyers\ntrigger: {event: Product Added}\n"
        "template: 'Your cart, {{ name }}'\n"
    )
    outbox = built / load_project(built).config.outbox
    before = sorted(outbox.rglob("*")) if outbox.exists() else []
    args = ["cart", "-p", str(built), "--as-of", AS_OF]
    r = runner.invoke(app, ["campaign", "run", *args], env={"COLUMNS": "300"})
    assert r.exit_code != 0 and "is a journey (it has a trigger)" in r.output, r.output
    assert (sorted(outbox.rglob("*")) if outbox.exists() else []) == before
    dry = runner.invoke(app, ["campaign", "dry-run", *args])
    assert dry.exit_code == 0, dry.output  # its audience can still be looked at
