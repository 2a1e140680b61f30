"""The whole loop on generated data: build without the truth, then the demo end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from rich.console import Console

from closedloop.core.clock import Clock
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.demo.run import run_demo
from closedloop.pipeline import build


def test_build_needs_no_ground_truth_and_is_idempotent(tmp_path: Path) -> None:
    summary = generate(tmp_path / "brand", 600, seed=3)
    shutil.rmtree(tmp_path / "brand" / "truth")  # the pipeline must never need it
    init_project(
        tmp_path / "p", data_dir=relative_data_dir(tmp_path / "p", tmp_path / "brand" / "data")
    )
    project = load_project(tmp_path / "p")
    clock = Clock(summary.reference_time)
    with Engine(project.engine_url) as engine:
        first = build(engine, project, clock=clock)
        events = engine.count("events")
        customers = engine.table("customers").customer_id.to_pyarrow().to_pylist()
        for r in first.loads.values():
            assert r.received == r.accepted + r.failed + r.duplicate
        assert first.customers > 0 and events > 0
        # A second build over the same files adds nothing and keeps every customer id.
        second = build(engine, project, clock=clock)
        assert engine.count("events") == events
        assert all(r.accepted == 0 for r in second.loads.values())
        assert sorted(engine.table("customers").customer_id.to_pyarrow().to_pylist()) == sorted(
            customers
        )
        assert {n: s.size for n, s in second.segments.items()} == {
            n: s.size for n, s in first.segments.items()
        }
        assert all(s.entered == 0 and s.exited == 0 for s in second.segments.values())


@pytest.mark.slow
def test_demo_closes_the_loop(tmp_path: Path) -> None:
    result = run_demo(1500, tmp_path / "out", seed=11, console=Console(quiet=True))
    assert result.generation.persons == 1500
    assert result.accuracy.precision >= 0.98
    assert result.accuracy.recall >= 0.75
    assert result.build.segments["lapsed_buyers"].size == result.campaign.audience > 0
    assert (
        result.campaign.sent + result.campaign.held_out + result.campaign.suppressed
        == result.campaign.audience
    )
    lf = result.outcome.lift
    assert lf.absolute_low <= lf.absolute <= lf.absolute_high
    assert result.outcome.treated == result.campaign.sent
    assert result.outcome.held_out == result.campaign.held_out
    assert result.world.true_effect > 0
    # The contact policy held back everyone without consent or with an opt-out.
    assert result.world.violations == 0
    assert result.campaign.suppressed == sum((result.campaign.reasons or {}).values()) > 0
    html = result.report.read_text()
    assert (
        "lift, 95% CI" in html
        and (result.report.parent / "lift_winback.png").stat().st_size > 10_000
    )
