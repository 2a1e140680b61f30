"""bench/ingest.py — the HTTP collector: durable events/s, ack latency, and the fsync ceiling.

Run as ``python bench/ingest.py``. On loopback only, with bounded loops, it

1. starts the collector (``uvicorn closedloop.collect.server:app_from_env``, the app
   ``closedloop serve`` runs) with 1 and then 2 worker processes, drives it with realistic
   Segment batches of 100 messages from client processes over keep-alive connections, and
   counts the events answered 200 (durably spooled: fsynced before the answer) per second;
2. offers a fixed 20,000 events/s (200 batches/s, open loop) and measures the
   acknowledgement latency from each request's scheduled send time (p50, p99);
3. in the same run, a bare loop that appends the same record bytes to a file and fsyncs
   each one: the durable-write ceiling for one writer, and the ratio to it;
4. drains the spool with the loader (``SpoolLoader``) into DuckDB and reports its rate.

The loader is not running during 1–2 so that the figures are the collector's own; on this
2-core machine the client processes already share the cores with the server.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

BATCH = 100
THROUGHPUT_SECONDS = 6.0
LATENCY_SECONDS = 6.0
OFFERED_EVENTS_PER_SECOND = 20_000
CONNECTIONS_PER_CLIENT = 8
CLIENT_PROCESSES = 2


def batch_template(write_key: str) -> bytes:
    """A realistic analytics.js/analytics-python batch; ``@@@@@@@@`` marks the id prefix."""
    msgs = []
    for i in range(BATCH):
        kind = ("track", "page", "identify", "track")[i % 4]
        m: dict[str, Any] = {
            "type": kind,
            "messageId": f"@@@@@@@@-{i:03d}",
            "anonymousId": f"anon-{i % 37:04d}-5f2e-4c7a-9b1d-8e7f6a5b4c3d",
            "timestamp": "2026-11-24T08:00:00.123Z",
            "context": {
                "library": {"name": "analytics.js", "version": "next-1.70.0"},
                "page": {
                    "path": "/products/green-tea",
                    "url": "https://shop.example/products/green-tea?utm_source=wechat",
                    "referrer": "https://shop.example/",
                    "title": "Green tea — Tea & Beauty",
                },
                "userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)",
                "locale": "zh-CN",
                "campaign": {"source": "wechat", "medium": "social", "name": "autumn"},
            },
            "integrations": {},
        }
        if i % 3 == 0:
            m["userId"] = f"member-{i:05d}"
        if kind == "track":
            m["event"] = "Product Viewed" if i % 8 else "Order Completed"
            m["properties"] = {
                "product_id": f"sku-{i:04d}",
                "name": "Longjing green tea 250 g",
                "category": "tea",
                "price": 129.5,
                "currency": "CNY",
                "revenue": 129.5 if i % 8 == 0 else None,
                "order_id": f"o-{i}" if i % 8 == 0 else None,
            }
        elif kind == "page":
            m["name"] = "Product"
            m["properties"] = {"path": "/products/green-tea"}
        else:
            m["traits"] = {"email": f"p{i}@example.com", "phone": "+8613800000000"}
        msgs.append(m)
    body = {"batch": msgs, "sentAt": "2026-11-24T08:00:01.000Z", "writeKey": write_key}
    return json.dumps(body, separators=(",", ":")).encode()


def http_request(port: int, body: bytes) -> bytes:
    head = (
        f"POST /v1/batch HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def _read_answer(reader: asyncio.StreamReader) -> int:
    """Read one HTTP response; return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


async def _closed_loop(port: int, template: bytes, seconds: float, tag: str) -> tuple[int, int]:
    """Connections that send batches back to back for ``seconds``: (acked events, errors)."""
    acked = errors = 0
    counter = 0

    # Requests are built before the clock starts, so the client spends its CPU on sending:
    # on 2 cores it shares the machine with the server. Ids are unique within each request.
    requests = [
        http_request(port, template.replace(b"@@@@@@@@", f"{tag}{i:06x}".encode()[:8]))
        for i in range(64)
    ]
    deadline = time.monotonic() + seconds

    async def conn(n: int) -> None:
        nonlocal acked, errors, counter
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < deadline:
            counter += 1
            writer.write(requests[counter % len(requests)])
            status = await _read_answer(reader)
            if status == 200:
                acked += BATCH
            else:
                errors += 1
        writer.close()

    await asyncio.gather(*(conn(n) for n in range(CONNECTIONS_PER_CLIENT)))
    return acked, errors


def _client(port: int, template: bytes, seconds: float, tag: str, out: Any) -> None:
    out.put(asyncio.run(_closed_loop(port, template, seconds, tag)))


def throughput(port: int, template: bytes) -> dict[str, float]:
    """Durably acknowledged events/s with several client processes driving the collector."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_client, args=(port, template, THROUGHPUT_SECONDS, f"t{i}", q))
        for i in range(CLIENT_PROCESSES)
    ]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = [q.get(timeout=THROUGHPUT_SECONDS + 60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    elapsed = time.perf_counter() - t0
    acked = sum(r[0] for r in results)
    return {"events_per_s": acked / elapsed, "errors": sum(r[1] for r in results)}


async def _open_loop(port: int, template: bytes) -> tuple[list[float], int]:
    """Batches at a fixed rate whatever the answers; latency from the scheduled send time."""
    rate = OFFERED_EVENTS_PER_SECOND / BATCH
    total = int(rate * LATENCY_SECONDS)
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(32):
        pool.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter() + 0.2

    async def one(i: int) -> None:
        nonlocal errors
        scheduled = start + i / rate
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        reader, writer = await pool.get()
        body = template.replace(b"@@@@@@@@", f"l{i:07x}".encode())
        writer.write(http_request(port, body))
        status = await _read_answer(reader)
        latencies.append(time.perf_counter() - scheduled)
        if status != 200:
            errors += 1
        pool.put_nowait((reader, writer))

    await asyncio.gather(*(one(i) for i in range(total)))
    while not pool.empty():
        pool.get_nowait()[1].close()
    return latencies, errors


def latency(port: int, template: bytes) -> dict[str, float]:
    latencies, errors = asyncio.run(_open_loop(port, template))
    latencies.sort()
    n = len(latencies)
    return {
        "offered_events_per_s": OFFERED_EVENTS_PER_SECOND,
        "p50_ms": latencies[n // 2] * 1000,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000,
        "max_ms": latencies[-1] * 1000,
        "errors": errors,
    }


def fsync_ceiling(record: bytes, folder: Path, seconds: float = 3.0) -> float:
    """Events/s of a bare loop appending ``record`` (one batch) and fsyncing each time."""
    path = folder / "ceiling.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    n = 0
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            os.write(fd, record)
            os.fsync(fd)
            n += 1
    finally:
        os.close(fd)
        path.unlink()
    return n * BATCH / (time.perf_counter() - t0)


def wait_up(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("collector exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("collector did not start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_collector(project: Path, spool: Path, workers: int, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CLOSEDLOOP_PROJECT": str(project),
        "CLOSEDLOOP_SPOOL": str(spool),
        "PYTHONPATH": str(ROOT / "src"),
    }
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "closedloop.collect.server:app_from_env",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    wait_up(port, proc)
    time.sleep(0.5 * workers)  # every worker has bound and opened its segment
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> None:
    from closedloop.collect.drain import SpoolLoader
    from closedloop.collect.spool import encode_record
    from closedloop.core.definitions import load_project
    from closedloop.core.engine import Engine
    from closedloop.demo.project import init_project

    work = Path(tempfile.mkdtemp(prefix="cl-ingest-"))
    try:
        init_project(work / "proj")
        project = load_project(work / "proj")
        key = project.config.sources[0].write_key
        template = batch_template(key)
        lines = [
            json.dumps(m, separators=(",", ":")).encode() for m in json.loads(template)["batch"]
        ]
        record = encode_record({"s": "web", "f": []}, lines)
        out: dict[str, Any] = {
            "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
            "batch": BATCH,
            "request_bytes": len(template),
        }
        # The ceiling first, on a settled disk: measured after the collector runs, its fsyncs
        # can wait for the writeback of the gigabyte of spool they leave behind.
        os.sync()
        ceiling = fsync_ceiling(record, work)
        print(f"bare write+fsync loop: {ceiling:,.0f} events/s (one fsync per batch of {BATCH})")
        for workers in (1, 2):
            spool = work / f"spool{workers}"
            port = free_port()
            proc = start_collector(work / "proj", spool, workers, port)
            try:
                t = throughput(port, template)
                print(
                    f"{workers} worker(s): {t['events_per_s']:,.0f} events/s durably accepted ({t['errors']} non-200)"
                )
                out[f"events_per_s_{workers}w"] = round(t["events_per_s"])
                if workers == 2:
                    lat = latency(port, template)
                    print(
                        f"ack latency at {OFFERED_EVENTS_PER_SECOND:,} events/s offered: "
                        f"p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms (max {lat['max_ms']:.1f}, {lat['errors']} non-200)"
                    )
                    out.update({f"latency_{k}": round(v, 2) for k, v in lat.items()})
            finally:
                stop(proc)
            if workers == 1:
                shutil.rmtree(spool, ignore_errors=True)
            os.sync()
        best = max(out["events_per_s_1w"], out["events_per_s_2w"])
        out["fsync_ceiling_events_per_s"] = round(ceiling)
        out["ratio_to_ceiling"] = round(best / ceiling, 3)
        print(f"collector at {best / ceiling:.0%} of the bare write+fsync loop")

        with Engine(f"duckdb:///{work / 'w.duckdb'}") as engine:
            loader = SpoolLoader(engine, list(project.config.sources), work / "spool2")
            t0, cpu0 = time.perf_counter(), time.process_time()
            moved = 0
            while True:
                r = loader.run_once()
                moved += r.received
                if r.records == 0:
                    break
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        out["loader_events_per_s"] = round(moved / elapsed) if elapsed else 0
        # CPU per event (all the loader's threads, DuckDB's included) is steadier than the rate
        # on a machine shared with other work: it does not count time spent waiting for a core.
        out["loader_cpu_us_per_event"] = round(cpu / moved * 1e6, 2) if moved else 0
        print(
            f"loader: {moved:,} spooled messages into DuckDB at {out['loader_events_per_s']:,} events/s "
            f"({out['loader_cpu_us_per_event']} µs CPU per event)"
        )
        print(json.dumps(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
