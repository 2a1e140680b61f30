"""Fixtures for collect: a real in-memory DuckDB engine, a source, a pinned clock."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import closedloop.collect.tables  # noqa: F401  - declares the tables collect writes
from closedloop.core.clock import Clock
from closedloop.core.definitions import Source
from closedloop.core.engine import Engine

NOW = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def engine() -> Iterator[Engine]:
    e = Engine("duckdb://")
    yield e
    e.close()


@pytest.fixture
def source() -> Source:
    return Source(name="web", channel="web", write_key="wk_test_web_0001")


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    """Write lines to a file: dicts/lists as JSON, strings verbatim."""
    with path.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(line if isinstance(line, str) else json.dumps(line))
            f.write("\n")
    return path


def rows(engine: Engine, table: str, order_by: str | None = None) -> list[dict[str, Any]]:
    t = engine.table(table)
    if order_by:
        t = t.order_by(order_by)
    result: list[dict[str, Any]] = engine.to_arrow(t).to_pylist()
    return result


def track(i: int, **extra: Any) -> dict[str, Any]:
    """A valid track message with messageId ``m{i}``."""
    msg: dict[str, Any] = {
        "type": "track",
        "event": "Product Viewed",
        "userId": f"u{i}",
        "messageId": f"m{i}",
        "timestamp": "2024-03-01T10:00:00Z",
        "properties": {"sku": f"s{i}"},
    }
    msg.update(extra)
    return msg


# ---- the HTTP collector on loopback ------------------------------------------------------
WEB = Source(name="web", channel="web", write_key="wk_test_web_0001")
POS = Source(name="pos", channel="pos", data_class="second_party", write_key="wk_test_pos_0001")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Answer:
    """An HTTP answer: status, headers (lower-case names) and the body (JSON when it is)."""

    def __init__(self, status: int, headers: dict[str, str], raw: bytes) -> None:
        self.status = status
        self.headers = headers
        self.raw = raw
        try:
            self.json: Any = json.loads(raw) if raw else None
        except ValueError:
            self.json = None


def request(
    url: str,
    body: bytes | dict[str, Any] | list[Any] | None = None,
    *,
    method: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> Answer:
    """One HTTP request with the standard library; 4xx/5xx are answers, not exceptions."""
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback only
            return Answer(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


class LiveCollector:
    """A real uvicorn server in a thread on a free loopback port, spooling to ``spool``."""

    def __init__(self, spool: Path, warehouse: Path, **options: Any) -> None:
        import threading

        import uvicorn

        from closedloop.collect.server import create_app

        self.spool = spool
        self.warehouse = warehouse
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app([WEB, POS], spool, **options)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        import time

        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("collector did not start")
            time.sleep(0.01)

    def post(self, path: str, body: Any, **kw: Any) -> Answer:
        return request(self.url + path, body, **kw)

    def load(self) -> Any:
        """Run the spool loader once over everything spooled so far."""
        from closedloop.collect.drain import SpoolLoader

        with Engine(f"duckdb:///{self.warehouse}") as engine:
            return SpoolLoader(engine, [WEB, POS], self.spool).run_once()

    def rows(self, table: str, order_by: str | None = None) -> list[dict[str, Any]]:
        with Engine(f"duckdb:///{self.warehouse}") as engine:
            return rows(engine, table, order_by)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCollector]:
    base = tmp_path_factory.mktemp("collector")
    c = LiveCollector(base / "spool", base / "warehouse.duckdb")
    yield c
    c.stop()
