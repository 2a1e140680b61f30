"""Crash safety: SIGKILL the collector and the loader, again and again, while a client sends.

The collector (uvicorn, two worker processes) and the loader run as real processes on a
real project folder. A client sends batches with retries, as the stock libraries do, and
records every messageId that was acknowledged with a 200. After the last kill everything
is restarted, the spool is drained, and each acknowledged messageId must be in ``events``
exactly once — none lost, none loaded twice.
"""

from __future__ import annotations

import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from closedloop.collect.drain import SpoolLoader
from closedloop.collect.spool import segment_names, writer_gone
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from tests.collect.conftest import free_port, request

ROOT = Path(__file__).parents[2]


def _project(tmp: Path) -> Path:
    from closedloop.demo.project import init_project

    init_project(tmp / "proj")
    return tmp / "proj"


class Procs:
    """The collector and loader processes of one project, restartable."""

    def __init__(self, project: Path, port: int) -> None:
        self.project = project
        self.port = port
        self.env = {**os.environ, "CLOSEDLOOP_PROJECT": str(project), "PYTHONPATH": str(ROOT)}
        self.collector: subprocess.Popen[bytes] | None = None
        self.loader: subprocess.Popen[bytes] | None = None

    def port_free(self, seconds: float = 30) -> None:
        """Wait until nothing listens on the port: the workers of a collector killed a moment
        ago may still hold the listening socket on a busy machine (the restart would fail with
        "address already in use")."""
        deadline = time.monotonic() + seconds
        while True:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
                try:
                    s.bind(("127.0.0.1", self.port))
                    return
                except OSError:
                    if time.monotonic() > deadline:
                        raise
            time.sleep(0.05)

    def start_collector(self) -> None:
        self.port_free()
        self.collector = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "closedloop.collect.server:app_from_env",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "2",
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env=self.env,
            start_new_session=True,  # its own process group: SIGKILL takes the workers too
        )

    def start_loader(self) -> None:
        self.loader = subprocess.Popen(
            [sys.executable, "-m", "closedloop.collect.drain", "--project", str(self.project)],
            env=self.env,
            start_new_session=True,
        )

    def wait_healthy(self, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if request(f"http://127.0.0.1:{self.port}/health", timeout=1).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("the collector did not come up")

    @staticmethod
    def kill(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    @staticmethod
    def stop(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.mark.slow
def test_sigkill_collector_and_loader_lose_nothing_and_load_nothing_twice(
    tmp_path: Path,
) -> None:
    project_dir = _project(tmp_path)
    project = load_project(project_dir)
    key = project.config.sources[0].write_key
    procs = Procs(project_dir, free_port())
    url = f"http://127.0.0.1:{procs.port}/v1/batch"
    acked: list[str] = []
    answers: dict[int, int] = {}
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            ids = [f"k-{uuid.uuid4().hex}" for _ in range(20)]
            batch = [
                {"type": "track", "event": "Tick", "userId": f"u{i}", "messageId": m}
                for i, m in enumerate(ids)
            ]
            body = {"batch": batch, "writeKey": key}
            while not stop.is_set():  # retry the same batch until it is acknowledged
                try:
                    a = request(url, body, timeout=5)
                except (OSError, http.client.HTTPException):  # killed mid-answer: retry
                    time.sleep(0.05)
                    continue
                answers[a.status] = answers.get(a.status, 0) + 1
                if a.status == 200:
                    assert a.json["accepted"] == 20
                    acked.extend(ids)
                    break
                assert a.status in (429, 503), a.raw  # nothing else is retryable
                time.sleep(0.05)

    procs.start_collector()
    procs.start_loader()
    senders = [threading.Thread(target=client) for _ in range(3)]
    rng = random.Random(7)
    try:
        for t in senders:
            t.start()
        rounds = 0
        for _ in range(6):
            # Each kill lands while the collector is up and acknowledging (a slow start on a
            # busy machine must not turn the test into one that kills nothing but start-ups).
            procs.wait_healthy()
            time.sleep(rng.uniform(0.8, 2.0))
            victim = rounds % 3  # collector, loader, both
            if victim in (0, 2):
                procs.kill(procs.collector)
                procs.start_collector()
            if victim in (1, 2):
                procs.kill(procs.loader)
                procs.start_loader()
            rounds += 1
        procs.wait_healthy()
        time.sleep(1)  # the last collector acknowledges some more
    finally:
        stop.set()
        for t in senders:
            t.join(timeout=15)
        procs.stop(procs.collector)
        procs.kill(procs.loader)  # killed once more, mid-pass perhaps
    assert rounds == 6 and len(acked) > 500, (rounds, len(acked), answers)

    # Drain what is left with a fresh loader, as a restarted `closedloop serve` would.
    with Engine(project.engine_url) as engine:
        loader = SpoolLoader(engine, list(project.config.sources), project_dir / "spool")
        # A stopped collector's worker may still be exiting (it holds its segment's lock
        # until it is gone, and the loader rightly leaves a locked segment alone): drain
        # until the spool is empty, for as long as a slow exit on a busy machine may take.
        deadline = time.monotonic() + 60
        while segment_names(project_dir / "spool") and time.monotonic() < deadline:
            loader.run_once()
            time.sleep(0.1)
        left = segment_names(project_dir / "spool")
        held = [n for n in left if not writer_gone(project_dir / "spool" / n)]
        assert left == [], f"segments left {left}, still locked by a writer: {held}"
        counts = dict(
            engine.con.raw_sql(
                "SELECT message_id, count(*) FROM events GROUP BY message_id"
            ).fetchall()
        )
    missing = [m for m in acked if m not in counts]
    twice = {m: n for m, n in counts.items() if n != 1}
    assert missing == [], f"{len(missing)} acknowledged messages lost"
    assert twice == {}, f"{len(twice)} messages loaded more than once"
    assert len(set(acked)) == len(acked)
