"""Benchmark: event → segment-entry latency while ``closedloop serve`` runs (target p95 < 5 s).

Run as ``python bench/freshness.py [--persons N] [--events N] [--gap S]
[--incremental-from N]`` (default 10,000 persons, 60 events, mean gap 1 s; tags, segments
and the lookup store are refreshed only for changed customers from N customers on — the
server's default, ``serving.live.INCREMENTAL_FROM``, when not given). In one run:

1. a generated brand (``--persons``) is loaded and built in full (``pipeline.build``) into a
   DuckDB warehouse; the project gets a trait ``bench_orders_1d`` (orders in the last day)
   and a segment ``bench_new_buyers`` (``bench_orders_1d >= 1``) that nobody is in yet (the
   history ends days before now);
2. **baseline — the loader alone**: ``closedloop serve --no-refresh`` on that warehouse; one
   event at a time is posted over HTTP and timed until the loader has committed it to
   ``events`` (its spool offsets, saved only after the warehouse write, cover the record);
3. **live**: ``closedloop serve`` (live refresh on); ``--events`` orders of distinct known
   customers are posted at random moments (exponential gaps, mean ``--gap`` seconds, not
   waiting for each other), so events arrive while refreshes run. Two latencies per event:

   * *segment entry* (the figure of the issue): from just before the POST to the commit of
     the refresh that recorded the customer's stay in ``bench_new_buyers`` — read after
     stopping the server from ``segment_membership`` (``entered_at`` = the refresh's clock)
     and ``live_refreshes`` (that refresh's ``finished_at``, after its segments and serving
     store were written);
   * *profile served*: seen from outside while the server runs, by polling the profile
     lookup's SQLite serving store until the customer's ``orders`` went up.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import ibis  # noqa: E402

from closedloop.collect.spool import Offsets, segment_names  # noqa: E402
from closedloop.core.definitions import Project, load_project  # noqa: E402
from closedloop.core.engine import Engine  # noqa: E402
from closedloop.demo.generator import generate  # noqa: E402
from closedloop.demo.project import init_project, relative_data_dir  # noqa: E402
from closedloop.pipeline import build  # noqa: E402

SEGMENT = "bench_new_buyers"
TRAIT = (
    "name: bench_orders_1d\ndescription: Orders in the last day (bench/freshness.py).\n"
    "event: Order Completed\naggregation: count\nwindow_days: 1\n"
)
SEGMENT_YAML = f"name: {SEGMENT}\nwhere: {{trait: bench_orders_1d, op: gte, value: 1}}\n"


def post(url: str, body: dict[str, Any]) -> int:
    req = urllib.request.Request(  # noqa: S310 - loopback URL we built
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
        return int(r.status)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))], 3) if s else float("nan")


def prepare(root: Path, persons: int, n: int) -> tuple[Project, list[str], dict[str, Any]]:
    """Generate, load and build the warehouse; ``n`` member ids of distinct customers."""
    fig: dict[str, Any] = {}
    generate(root / "brand", persons)
    p = root / "p"
    init_project(p, data_dir=relative_data_dir(p, root / "brand" / "data"))
    (p / "traits" / "bench_orders_1d.yaml").write_text(TRAIT)
    (p / "segments" / f"{SEGMENT}.yaml").write_text(SEGMENT_YAML)
    project = load_project(p)
    t = time.perf_counter()
    with Engine(project.engine_url) as engine:
        build(engine, project)
        fig["build_s"] = round(time.perf_counter() - t, 1)
        fig["customers"] = engine.count("customers")
        fig["events_before"] = engine.count("events")
        m = engine.table("identity_map")
        ids = (
            m.filter((m.id_type == "member_id") & ~m.quarantined.fill_null(False))
            .group_by("customer_id")
            .aggregate(member=m.id_value.min())
            .to_pyarrow()
            .to_pylist()
        )
    rng = random.Random(7)
    members = sorted(r["member"] for r in ids)
    return project, rng.sample(members, n), fig


class Server:
    """``closedloop serve`` as a real process on a loopback port."""

    def __init__(self, project: Project, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(project.root / f"serve-{self.port}.log", "wb")  # noqa: SIM115
        command = [sys.executable, "-m", "closedloop.cli.main", "serve", "-p", str(project.root)]
        self.proc = subprocess.Popen(
            [*command, "--port", str(self.port), *extra],
            start_new_session=True,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:  # noqa: S310
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("serve did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=120)
        self.log.close()


def drained(spool: Path) -> bool:
    offsets = Offsets(spool)
    return all(offsets.get(n) >= (spool / n).stat().st_size for n in segment_names(spool))


def baseline(project: Project, members: list[str], key: str, gap: float) -> dict[str, Any]:
    """Event → committed in ``events`` by the loader alone, one event at a time."""
    server = Server(project, "--no-refresh")
    rng = random.Random(11)
    latencies: list[float] = []
    try:
        # One event first, untimed: the loader process may still be starting when the
        # collector answers its first health check.
        warm = {"userId": members[0], "event": "Product Viewed", "messageId": "bv-warm"}
        assert post(server.url + "/v1/t", warm | {"writeKey": key}) == 200
        while not drained(project.root / "spool"):
            time.sleep(0.01)
        for i, member in enumerate(members):
            time.sleep(rng.expovariate(1 / gap) / 4)
            body = {"userId": member, "event": "Product Viewed", "messageId": f"bv{i}"}
            t = time.perf_counter()
            assert post(server.url + "/v1/t", body | {"writeKey": key}) == 200
            while not drained(project.root / "spool"):
                time.sleep(0.002)
            latencies.append(time.perf_counter() - t)
    finally:
        server.stop()
    return {
        "baseline_loader_p50_s": quantile(latencies, 0.5),
        "baseline_loader_p95_s": quantile(latencies, 0.95),
        "baseline_loader_max_s": round(max(latencies), 3),
    }


class StoreWatcher(threading.Thread):
    """Polls the serving store; notes when each watched member's ``orders`` first went up."""

    def __init__(self, store: Path) -> None:
        super().__init__(daemon=True)
        self.store = store
        self.before: dict[str, int] = {}
        self.waiting: set[str] = set()
        self.seen: dict[str, float] = {}  # member -> wall time seen
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.stat: tuple[int, int] | None = None
        self.writes = 0

    def orders(self, members: list[str]) -> dict[str, int]:
        db = sqlite3.connect(f"file:{self.store}?mode=ro", uri=True)
        try:
            cols = json.loads(
                db.execute("SELECT value FROM meta WHERE key='columns'").fetchone()[0]
            )
            at = [c[0] for c in cols].index("orders")
            out: dict[str, int] = {}
            for m in members:
                row = db.execute(
                    "SELECT p.doc FROM identifiers i JOIN profiles p USING (customer_id) "
                    "WHERE i.id_value = ? AND i.id_type = 'member_id'",
                    (m,),
                ).fetchone()
                out[m] = int(json.loads(row[0])[at] or 0) if row else 0
            return out
        finally:
            db.close()

    def run(self) -> None:
        while not self.halt.wait(0.02):
            try:
                s = os.stat(self.store)
            except FileNotFoundError:
                continue
            if (s.st_ino, s.st_mtime_ns) == self.stat:
                continue
            self.stat = (s.st_ino, s.st_mtime_ns)
            self.writes += 1
            now = time.time()
            with self.lock:
                todo = sorted(self.waiting)
            if not todo:
                continue
            got = self.orders(todo)
            with self.lock:
                for m, n in got.items():
                    if n > self.before[m] and m in self.waiting:
                        self.seen[m] = now
                        self.waiting.discard(m)


def identity_ways(whys: list[str]) -> dict[str, int]:
    """How each identity run found and resolved its new events (``identity_runs.why``)."""
    out: dict[str, int] = {}
    for why in whys:
        if why.startswith("0 new message(s)"):
            way = "nothing new"
        elif "counts only" in why:
            way = "counts only"
        elif "new message(s) since the watermark less the lag" in why:
            way = "region, by the watermark less the lag"
        elif "new message(s) since the watermark" in why:
            way = "region, by the watermark"
        elif "new message(s) (" in why:
            way = "region, by the whole log"
        else:
            way = "other: " + why
        out[way] = out.get(way, 0) + 1
    return out


def _runs_seq(project: Project) -> int:
    with Engine(project.engine_url) as engine:
        runs = engine.table("identity_runs")
        return int(runs.seq.max().fill_null(0).execute())


def live(project: Project, members: list[str], key: str, gap: float) -> dict[str, Any]:
    store = project.root / "warehouse.duckdb.lookup.sqlite"
    seq = _runs_seq(project)
    started = datetime.now(UTC)
    mtime = store.stat().st_mtime_ns
    server = Server(project)
    watcher = StoreWatcher(store)
    posted: dict[str, float] = {}
    fig: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 600
        while store.stat().st_mtime_ns == mtime:  # the start-up refresh has finished
            if time.monotonic() > deadline:
                raise RuntimeError("no start-up refresh")
            time.sleep(0.05)
        fig["startup_refresh_wait_s"] = round((datetime.now(UTC) - started).total_seconds(), 2)
        watcher.before = watcher.orders(members)
        watcher.start()
        rng = random.Random(13)
        for i, member in enumerate(members):
            time.sleep(rng.expovariate(1 / gap))
            body = {
                "userId": member,
                "event": "Order Completed",
                "messageId": f"bo{i}",
                "properties": {"order_id": f"bench-{i}", "revenue": 88.0},
            }
            with watcher.lock:
                watcher.waiting.add(member)
            posted[member] = time.time()
            assert post(server.url + "/v1/t", body | {"writeKey": key}) == 200
        deadline = time.monotonic() + 300
        while watcher.waiting and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        watcher.halt.set()
        server.stop()
    served = [watcher.seen[m] - posted[m] for m in members if m in watcher.seen]
    fig["profile_served_p50_s"] = quantile(served, 0.5)
    fig["profile_served_p95_s"] = quantile(served, 0.95)
    fig["profile_not_seen"] = len(members) - len(served)
    with Engine(project.engine_url) as engine:
        m = engine.table("identity_map")
        cust = (
            m.filter((m.id_type == "member_id") & m.id_value.isin(members))
            .select("id_value", "customer_id")
            .to_pyarrow()
            .to_pylist()
        )
        of = {r["customer_id"]: r["id_value"] for r in cust}
        s = engine.table("segment_membership")
        stays = s.filter((s.segment == SEGMENT) & (s.entered_at >= started)).to_pyarrow()
        runs = engine.table("live_refreshes")
        runs = runs.filter(runs.finished_at >= started).to_pyarrow().to_pylist()
        ident = engine.table("identity_runs")
        whys = ident.filter(ident.seq > seq).order_by("seq").why.to_pyarrow().to_pylist()
    # Every identity run of the live phase (the start-up refresh's included), by the way it
    # found and resolved its new events.
    fig["identity_ways"] = identity_ways([str(w) for w in whys])
    committed = {r["as_of"]: r["finished_at"] for r in runs}
    entry: list[float] = []
    for r in stays.to_pylist():
        member = of.get(r["customer_id"])
        if member in posted:
            entry.append(committed[r["entered_at"]].timestamp() - posted[member])
    fig["entered"] = len(entry)
    fig["entry_p50_s"] = quantile(entry, 0.5)
    fig["entry_p95_s"] = quantile(entry, 0.95)
    fig["entry_max_s"] = round(max(entry), 3) if entry else None
    work = [r for r in runs if r["reason"] == "events"]
    fig["refreshes"] = len(work)
    for step in ("identity_s", "portrait_s", "tags_s", "segments_s", "lookup_s", "seconds"):
        fig[f"refresh_mean_{step}"] = round(sum(r[step] for r in work) / max(len(work), 1), 3)
    total = sum(r["seconds"] for r in work) or 1.0
    paths = [r["identity_path"] for r in work]
    fig["identity_paths"] = {k: paths.count(k) for k in sorted(set(paths))}
    # How each refresh found whom tags, segments and the store carry forward: by key,
    # by digests compared whole, or everyone (and why).
    hows = [str(r.get("changes")) for r in runs]
    fig["changes_paths"] = {k: hows.count(k) for k in sorted(set(hows))}
    fig["refresh_identity_share"] = round(sum(r["identity_s"] for r in work) / total, 3)
    fig["refresh_mean_recomputed"] = round(
        sum(r["recomputed"] for r in work) / max(len(work), 1), 1
    )
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--persons", type=int, default=10_000)
    ap.add_argument("--events", type=int, default=60)
    ap.add_argument("--gap", type=float, default=1.0, help="mean seconds between events")
    ap.add_argument(
        "--incremental-from",
        type=int,
        default=None,
        help="customers from which tags/segments/lookup refresh incrementally (server default)",
    )
    args = ap.parse_args()
    fig: dict[str, Any] = {"persons": args.persons, "events": args.events, "gap_s": args.gap}
    if args.incremental_from is not None:
        os.environ["CLOSEDLOOP_INCREMENTAL_FROM"] = str(args.incremental_from)  # the server's
    from closedloop.serving.live import INCREMENTAL_FROM

    fig["incremental_from"] = int(os.environ.get("CLOSEDLOOP_INCREMENTAL_FROM", INCREMENTAL_FROM))
    fig["load_before"] = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        project, members, prep = prepare(Path(tmp), args.persons, args.events)
        fig.update(prep)
        key = next(s.write_key for s in project.config.sources if s.name == "ecommerce")
        fig.update(baseline(project, members, key, args.gap))
        fig.update(live(project, members, key, args.gap))
    fig["entry_vs_loader_p95"] = round(fig["entry_p95_s"] / fig["baseline_loader_p95_s"], 1)
    fig["load_after"] = os.getloadavg()[0]
    fig["machine"] = f"{platform.machine()}, {platform.python_version()}, ibis {ibis.__version__}"
    for k, v in fig.items():
        print(f"{k:>32}: {v}")
    print(json.dumps(fig, default=str))


if __name__ == "__main__":
    main()
