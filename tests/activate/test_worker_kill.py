"""A worker process killed with SIGKILL at each point of a tick sends nothing twice on restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from closedloop.activate.worker import tick
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from tests.activate.test_journey import T0, make_project, outbox_lines, people
from tests.activate.test_worker import TWO_STEP
from tests.conftest import add_events

ROOT = Path(__file__).resolve().parents[2]
NOW = T0 + timedelta(minutes=1)

CHILD = """
import os, signal, sys
from datetime import datetime
from pathlib import Path
from closedloop.activate.worker import tick
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine

root, point, now = Path(sys.argv[1]), sys.argv[2], datetime.fromisoformat(sys.argv[3])

def hook(name: str) -> None:
    if name == point:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a power cut for the worker

project = load_project(root)
with Engine(project.engine_url) as engine:
    tick(engine, project, now, outbox_dir=root / "outbox", checkpoint=hook)
"""


def setup(root: Path) -> None:
    make_project(root, {"cart": TWO_STEP})
    cfg = root / "closedloop.yaml"
    cfg.write_text(cfg.read_text().replace('"duckdb://"', "duckdb:///wh.duckdb"))
    with Engine(load_project(root).engine_url) as engine:
        ids = people(engine, 10)
        add_events(
            engine,
            [
                {"message_id": f"a{i}", "user_id": c, "event": "Product Added", "timestamp": T0}
                for i, c in enumerate(ids)
            ],
        )


def finish(root: Path) -> tuple[Counter[tuple[str, str]], int]:
    project = load_project(root)
    with Engine(project.engine_url) as engine:
        tick(engine, project, NOW, outbox_dir=root / "outbox")
        tick(engine, project, NOW + timedelta(hours=2), outbox_dir=root / "outbox")
        d = engine.table("deliveries").to_pandas()
    lines = outbox_lines(root / "outbox")
    return Counter((x["customer_id"], x["occasion"]) for x in lines), int(
        (d.status == "sent").sum()
    )


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[Counter[tuple[str, str]], int]:
    """What an uninterrupted run sends."""
    root = tmp_path_factory.mktemp("clean")
    setup(root)
    sent, logged = finish(root)
    assert sent and max(sent.values()) == 1
    return sent, logged


# Kill points: between the outbox and the delivery log, after a
# send step's log, and after the state is stored (an injected failure at every checkpoint is
# in test_worker.py; here the process really dies, with no cleanup).
@pytest.mark.slow  # a fresh interpreter per kill point
@pytest.mark.parametrize("point", ["outbox_written", "journey_sent", "states_written"])
def test_sigkill_at_each_point_then_restart(
    tmp_path: Path, point: str, clean: tuple[Counter[tuple[str, str]], int]
) -> None:
    root = tmp_path / "killed"
    setup(root)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), point, NOW.isoformat()],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    got, logged = finish(root)
    assert got == clean[0]
    assert logged == clean[1]
