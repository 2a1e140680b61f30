"""The worker resumes after a crash at any point without sending anything twice."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from closedloop.activate.worker import tick
from closedloop.core.engine import Engine
from tests.activate.test_journey import T0, make_project, outbox_lines, people
from tests.conftest import add_events

TWO_STEP = """\
name: cart
audience: everyone
holdout: 0.2
template: "x"
trigger: {event: Product Added}
steps:
  - {id: first, send: {template: "first"}}
  - {id: pause, wait: 1h}
  - {id: second, send: {template: "second"}}
"""
TICKS = [T0 + timedelta(minutes=1), T0 + timedelta(hours=1, minutes=2)]


class Crash(Exception):
    pass


def scenario(engine: Engine, root: Path) -> tuple[object, Path]:
    project = make_project(root / "p", {"cart": TWO_STEP})
    ids = people(engine, 12)
    add_events(
        engine,
        [
            {"message_id": f"add{i}", "user_id": c, "event": "Product Added", "timestamp": T0}
            for i, c in enumerate(ids)
        ],
    )
    return project, root / "outbox"


def sends(engine: Engine, out: Path) -> tuple[Counter[tuple[str, str]], int]:
    lines = outbox_lines(out)
    d = engine.table("deliveries").to_pandas()
    return Counter((x["customer_id"], x["occasion"]) for x in lines), int(
        (d.status == "sent").sum()
    )


@pytest.mark.slow  # ~20 s: two ticks for every checkpoint of a run
def test_a_crash_at_any_checkpoint_sends_nothing_twice(tmp_path: Path) -> None:
    # A clean run: which checkpoints a run passes, and what it sends.
    seen: list[str] = []
    with Engine("duckdb://") as engine:
        project, out = scenario(engine, tmp_path / "clean")
        for now in TICKS:
            tick(engine, project, now, outbox_dir=out, checkpoint=seen.append)  # type: ignore[arg-type]
        clean, clean_logged = sends(engine, out)
    assert clean and max(clean.values()) == 1
    assert {o.split("+")[1] for _, o in clean} == {"first", "second"}
    assert len(seen) > 10
    for k in range(len(seen)):
        calls = 0

        def crash(name: str, k: int = k) -> None:
            nonlocal calls
            calls += 1
            if calls == k + 1:
                raise Crash(name)

        with Engine("duckdb://") as engine:
            project, out = scenario(engine, tmp_path / f"crash{k}")
            crashed = False
            for now in TICKS:
                try:
                    tick(
                        engine, project, now, outbox_dir=out, checkpoint=None if crashed else crash
                    )  # type: ignore[arg-type]
                except Crash:
                    crashed = True
                    tick(engine, project, now, outbox_dir=out)  # type: ignore[arg-type]
            assert crashed
            got, logged = sends(engine, out)
        assert got == clean, f"crash at checkpoint {k} ({seen[k]})"
        assert logged == clean_logged


def test_the_watermark_saves_rereading_but_old_events_never_reenter(
    engine: Engine, tmp_path: Path
) -> None:
    project, out = scenario(engine, tmp_path)
    first = tick(engine, project, TICKS[0], outbox_dir=out)  # type: ignore[arg-type]
    assert first.entered == 12
    w = engine.table("journey_watermarks").to_pandas()
    assert list(w.campaign) == ["cart"] and w.watermark.iloc[0] == T0
    # A new event of a person already inside does not start a second instance.
    add_events(
        engine,
        [
            {
                "message_id": "again",
                "user_id": "c000",
                "event": "Product Added",
                "timestamp": T0 + timedelta(minutes=3),
            }
        ],
    )
    again = tick(engine, project, T0 + timedelta(minutes=4), outbox_dir=out)  # type: ignore[arg-type]
    assert again.entered == 0


@pytest.mark.parametrize("rule", ["once", "once_per_occasion"])
def test_entry_rule_across_days(engine: Engine, tmp_path: Path, rule: str) -> None:
    project = make_project(
        tmp_path / "p", {"cart": TWO_STEP.replace("steps:", f"entry: {{rule: {rule}}}\nsteps:")}
    )
    people(engine, 2)
    day2 = T0 + timedelta(days=1)
    add_events(
        engine,
        [
            {"message_id": "a1", "user_id": "c000", "event": "Product Added", "timestamp": T0},
            {"message_id": "a2", "user_id": "c000", "event": "Product Added", "timestamp": day2},
        ],
    )
    out = tmp_path / "outbox"
    tick(engine, project, T0 + timedelta(hours=2), outbox_dir=out)
    done = tick(engine, project, T0 + timedelta(hours=3, minutes=1), outbox_dir=out)
    assert done.finished == {"done": 1}
    second = tick(engine, project, day2 + timedelta(minutes=1), outbox_dir=out)
    assert second.entered == (0 if rule == "once" else 1)
