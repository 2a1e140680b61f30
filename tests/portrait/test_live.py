"""The live refresher (``serving.live``): when it runs, and windows that roll forward alone.

In process, on a DuckDB file, with a pinned clock moved by hand: "no order in 30 days"
becomes true on a clock-only refresh, with no new event, and the stays record it at that
refresh's clock.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from closedloop.collect.loader import load_jsonl
from closedloop.core.clock import Clock
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.serving.live import LiveRefresher
from tests.cli.test_serve_live import FILES, write_project

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
LAPSED = "name: lapsed\nwhere: {trait: recency_days, op: gt, value: 30}\n"


class MovingClock(Clock):
    def __init__(self, at: datetime) -> None:
        super().__init__(at)
        self.at = at

    def now(self) -> datetime:
        return self.at


def _stays(engine: Engine) -> list[tuple[str, datetime, datetime | None]]:
    m = engine.table("segment_membership").to_pyarrow().to_pylist()
    return sorted((r["segment"], r["entered_at"], r["exited_at"]) for r in m)


def _load(engine: Engine, root: Path, messages: list[dict[str, Any]]) -> int:
    path = root / f"batch{len(list(root.glob('batch*')))}.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in messages))
    source = load_project(root).config.sources[0]
    return load_jsonl(engine, [path], source, import_name="test").accepted


def test_windows_roll_forward_on_clock_only_refreshes(tmp_path: Path) -> None:
    root = write_project(tmp_path / "p", FILES | {"segments/lapsed.yaml": LAPSED})
    project = load_project(root)
    clock = MovingClock(T0)
    live = LiveRefresher(project, interval=1e-9, clock=clock)
    order = {
        "type": "track",
        "event": "Order Completed",
        "userId": "u1",
        "messageId": "o1",
        "timestamp": T0.isoformat(),
        "properties": {"order_id": "o1", "revenue": 5},
    }
    with Engine(project.engine_url) as engine:
        assert live(engine, 0) is None  # nothing collected yet: nothing to refresh
        accepted = _load(engine, root, [order])
        first = live(engine, accepted)
        assert first is not None and first.reason == "events" and first.entered == 1
        assert _stays(engine) == [("buyers", T0, None)]
        clock.at = T0 + timedelta(days=10)
        ten = live(engine, 0)
        assert ten is not None and ten.reason == "clock" and (ten.entered, ten.exited) == (0, 0)
        later = T0 + timedelta(days=31)
        clock.at = later
        run = live(engine, 0)
        assert run is not None and run.reason == "clock" and run.loaded == 0
        assert _stays(engine) == [("buyers", T0, later), ("lapsed", later, None)]
        runs = engine.table("live_refreshes").to_pyarrow().to_pylist()
    assert [r["reason"] for r in runs] == ["events", "clock", "clock"]
    assert [r["identity_path"] for r in runs][1:] == ["incremental", "incremental"]  # no news
    assert [r["as_of"] for r in runs] == [T0, T0 + timedelta(days=10), later]


def test_when_a_refresh_is_due(tmp_path: Path) -> None:
    project = load_project(write_project(tmp_path / "p"))
    live = LiveRefresher(project, interval=None)
    assert live.due(0) == "start"  # the first pass always refreshes (repairs a crash)
    live.last = time.monotonic()
    assert live.due(0) is None  # no events, no clock refreshes
    assert live.due(3) == "events" and live.pending == 3
    live.failed = True  # a failed refresh is retried, but not on every pass
    assert live.due(0) is None
    live.last -= 6
    assert live.due(0) == "events"
    timed = LiveRefresher(project, interval=10)
    timed.last = time.monotonic() - 5
    assert timed.due(0) is None
    timed.last -= 6
    assert timed.due(0) == "clock"
