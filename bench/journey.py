"""bench/journey.py — event-to-first-message latency of an event-triggered journey.

Run as ``python bench/journey.py [--events N] [--audience N] [--interval S]``. In one process:

* a collector thread judges each event with collect's ingest path (``Collector.prepare``,
  write key, clock-skew correction) and appends its record to the fsynced spool
  (``SpoolWriter``), exactly as ``closedloop serve`` does before answering 200 — the clock of
  an event starts just before ``prepare``;
* the main thread is the worker loop of ``closedloop worker --spool``: the spool loader moves
  new records into the DuckDB ``events`` table, then ``tick`` fires the event trigger, admits
  the entry and sends the journey's first message into the fsynced outbox; the clock stops
  when the tick that wrote the message returns;
* events arrive at random (exponential gaps, mean 0.5 s) from distinct known customers of an
  audience of ``--audience`` profiles, so each is a new journey instance.

Baseline, in the same run: the bare outbox write — one message line written to a new file,
fsynced and renamed, as the campaign writer does — the floor for any message to exist.
The last line printed is one JSON object with every figure (target: p95 < 2 s).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import platform
import random
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import pyarrow as pa  # noqa: E402

import closedloop.collect.tables  # noqa: E402  (declares events)
import closedloop.identity.tables  # noqa: E402, F401  (declares identity_map)
from closedloop.activate.campaign import _write_outbox  # noqa: E402
from closedloop.activate.worker import tick  # noqa: E402
from closedloop.collect.drain import SpoolLoader  # noqa: E402
from closedloop.collect.ingest import Collector  # noqa: E402
from closedloop.collect.spool import SpoolWriter  # noqa: E402
from closedloop.core.clock import Clock  # noqa: E402
from closedloop.core.definitions import SegmentDef, load_project  # noqa: E402
from closedloop.core.engine import Engine  # noqa: E402
from closedloop.portrait.tables import PROFILES  # noqa: E402
from closedloop.segments.audience import Fields, evaluate_segment  # noqa: E402

WRITE_KEY = "wk_bench_0123456789"
PROJECT = {
    "closedloop.yaml": f"""\
name: bench
engine: duckdb:///warehouse.duckdb
timezone: Asia/Shanghai
sources:
  - {{name: web, channel: web, write_key: {WRITE_KEY}}}
""",
    "identity.yaml": """\
types:
  - {name: member_id, priority: 100, strong: true, paths: [user_id]}
""",
    "segments/everyone.yaml": """\
name: everyone
where: {trait: customer_id, op: not_null}
""",
    "campaigns/cart.yaml": """\
name: cart
audience: everyone
holdout: 0.05
subject: "{{ name }}, your cart"
template: "Hi {{ name }}, the tea you picked is waiting."
trigger: {event: Product Added, where: [{property: category, op: eq, value: tea}]}
""",
}


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def setup(root: Path, audience: int) -> None:
    for rel, text in PROJECT.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    project = load_project(root)
    now = datetime.now(UTC)
    with Engine(project.engine_url) as engine:
        ids = [f"m{i:07d}" for i in range(audience)]
        profile: dict[str, list[Any]] = {c: [None] * audience for c in PROFILES.columns}
        profile.update(
            customer_id=ids,
            name=[f"N{i}" for i in range(audience)],
            email=[f"p{i}@example.cn" for i in range(audience)],
            consent_marketing=[True] * audience,
            timezone=["Asia/Shanghai"] * audience,
        )
        engine.replace("profiles", pa.table(profile))
        seg = SegmentDef.model_validate(
            {"name": "everyone", "where": {"trait": "customer_id", "op": "not_null"}}
        )
        evaluate_segment(engine, seg, Fields(), Clock(now))
        engine.append(
            "identity_map",
            pa.table(
                {
                    "id_type": ["member_id"] * audience,
                    "id_value": ids,
                    "customer_id": ids,
                    "quarantined": [False] * audience,
                    "first_seen": [now] * audience,
                    "last_seen": [now] * audience,
                    "messages": [1] * audience,
                }
            ),
        )


class Producer(threading.Thread):
    """Sends events through the collector's judge and the fsynced spool, at random times."""

    def __init__(self, project: Any, spool: Path, users: list[str], mean_gap: float) -> None:
        super().__init__(daemon=True)
        self.collector = Collector(project.config.sources)
        self.spool, self.users, self.mean_gap = spool, users, mean_gap
        self.sent_at: dict[str, float] = {}
        self.ack: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        writer = SpoolWriter(self.spool)
        auth = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
        rng = random.Random(7)
        try:
            for user in self.users:
                await asyncio.sleep(rng.expovariate(1 / self.mean_gap))
                now = datetime.now(UTC)
                body = json.dumps(
                    {
                        "userId": user,
                        "event": "Product Added",
                        "messageId": f"evt-{user}",
                        "timestamp": now.isoformat(),
                        "properties": {"category": "tea", "sku": "T-01"},
                    }
                ).encode()
                t0 = time.perf_counter()
                self.sent_at[user] = t0
                out = self.collector.prepare(
                    "track", body, {"authorization": auth}, None, "127.0.0.1", now
                )
                if out.status != 200 or out.record is None:
                    raise RuntimeError(f"collector refused the event: {out.status} {out.body}")
                await writer.append(out.record)
                self.ack.append(time.perf_counter() - t0)
        finally:
            writer.close()
            self.done.set()


def outbox_users(folder: Path, seen: set[str]) -> list[str]:
    new = []
    for f in sorted(folder.rglob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            c = json.loads(line)["customer_id"]
            if c not in seen:
                seen.add(c)
                new.append(c)
    return new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=40)
    ap.add_argument("--audience", type=int, default=20_000)
    ap.add_argument("--interval", type=float, default=0.05, help="worker idle pause (s)")
    ap.add_argument("--mean-gap", type=float, default=0.5, help="mean seconds between events")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-journey-") as tmp:
        root = Path(tmp) / "project"
        setup(root, args.audience)
        project = load_project(root)
        spool, outbox = root / "spool", root / "outbox"
        users = [f"m{i:07d}" for i in range(0, args.audience, max(1, args.audience // args.events))]
        users = users[: args.events]

        # Baseline: the bare outbox write of one message (fsynced file + rename).
        base: list[float] = []
        line = json.dumps({"customer_id": "m0", "body": "Hi, the tea you picked is waiting."})
        for i in range(args.events):
            t0 = time.perf_counter()
            _write_outbox(Path(tmp) / "baseline", f"b{i}", [line])
            base.append(time.perf_counter() - t0)

        latency: dict[str, float] = {}
        ticks: list[float] = []
        seen: set[str] = set()
        with Engine(project.engine_url) as engine:
            loader = SpoolLoader(engine, project.config.sources, spool)
            tick(engine, project, datetime.now(UTC), outbox_dir=outbox)  # warm up: watermark
            producer = Producer(project, spool, users, args.mean_gap)
            producer.start()
            deadline = time.perf_counter() + args.events * args.mean_gap * 4 + 30
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                loader.run_once()
                tick(engine, project, datetime.now(UTC), outbox_dir=outbox)
                t1 = time.perf_counter()
                ticks.append(t1 - t0)
                for c in outbox_users(outbox, seen):
                    latency[c] = t1 - producer.sent_at[c]
                d = engine.table("deliveries")
                decided = int(d.count().execute())
                if producer.done.is_set() and decided >= len(users):
                    break
                time.sleep(args.interval)
            held = int((d.status == "held_out").sum().execute())

    lat = list(latency.values())
    p50, p95 = percentile(lat, 50), percentile(lat, 95)
    b50, b95 = percentile(base, 50), percentile(base, 95)
    figures = {
        "bench": "journey",
        "python": platform.python_version(),
        "audience": args.audience,
        "events": len(users),
        "messages": len(lat),
        "held_out": held,
        "event_to_message_p50_s": round(p50, 4),
        "event_to_message_p95_s": round(p95, 4),
        "event_to_message_max_s": round(max(lat), 4) if lat else None,
        "collector_ack_p50_s": round(percentile(producer.ack, 50), 5),
        "tick_p50_s": round(percentile(ticks, 50), 4),
        "tick_p95_s": round(percentile(ticks, 95), 4),
        "baseline_outbox_write_p50_s": round(b50, 5),
        "baseline_outbox_write_p95_s": round(b95, 5),
        "p95_vs_baseline_p95": round(p95 / b95, 1) if b95 else None,
        "target_p95_s": 2.0,
        "meets_target": bool(lat) and p95 < 2.0,
    }
    print(f"audience {args.audience:,}; {len(users)} events, {len(lat)} messages, {held} held out")
    print(f"event → first message: p50 {p50:.3f} s, p95 {p95:.3f} s (target p95 < 2 s)")
    print(
        f"worker pass (load + tick): p50 {figures['tick_p50_s']} s, p95 {figures['tick_p95_s']} s"
    )
    print(f"baseline bare outbox write: p50 {b50 * 1000:.2f} ms, p95 {b95 * 1000:.2f} ms")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
