"""bench/dedup.py — the loader's messageId dedup: cost of one chunk as the event log grows.

Run as ``python bench/dedup.py [--sizes 1,5,20]`` (millions of events). It

1. builds an event log in a DuckDB file by writing synthetic rows (random 32-hex-digit
   messageIds) straight into ``events`` and their keys into ``intake_keys`` in Arrow batches
   of 1M — as a warehouse loaded through the loader would hold them;
2. at each log size, loads chunks of 50,000 Segment messages, half of them duplicates of
   events spread over the whole log, with the key index (``Intake``'s default on DuckDB) and
   — the baseline, in the same run, on the same warehouse — with the old path that
   semi-joins each chunk's ids against the whole ``events`` table; it reports the median
   wall and CPU time per chunk, the one-off cost of a process's first write (reading the
   key index), and the index's memory;
3. drains the same spooled batches as ``bench/ingest.py``'s loader figure through
   ``SpoolLoader`` into an empty warehouse with each path (events/s and CPU µs per event).

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

import closedloop.collect.tables as tables  # noqa: E402
from closedloop.collect.loader import Chunk, Intake, key_hashes, key_store  # noqa: E402
from closedloop.core.clock import Clock  # noqa: E402
from closedloop.core.definitions import Source  # noqa: E402
from closedloop.core.engine import Engine  # noqa: E402

CHUNK = 50_000
REPEATS = 3  # chunks timed per path and size (the median is reported)
BATCH_ROWS = 1_000_000
POOL_PER_BATCH = 30_000  # stored ids kept per batch to draw duplicates from
WEB = Source(name="web", channel="web", write_key="wk_bench_web_0001")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOW = Clock(datetime(2026, 11, 24, tzinfo=UTC))


def random_ids(rng: np.random.Generator, n: int) -> pa.StringArray:
    """``n`` random 32-hex-digit ids, built as one Arrow buffer (no Python strings)."""
    data = binascii.hexlify(rng.bytes(16 * n))
    offsets = np.arange(0, 32 * (n + 1), 32, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data))


def const(value: Any, n: int, typ: pa.DataType) -> pa.Array:
    return pa.array([value], typ).take(pa.array(np.zeros(n, np.int64)))


def event_rows(ids: pa.StringArray, start: int) -> pa.Table:
    """Synthetic ``events`` rows for ``ids``, received one second apart from ``start``."""
    n = len(ids)
    schema = tables.EVENTS.schema.to_pyarrow()
    received = pa.array((T0.timestamp() + start + np.arange(n)) * 1_000_000, pa.int64())
    received = received.cast(pa.timestamp("us")).cast(schema.field("received_at").type)
    given: dict[str, pa.Array] = {
        "message_id": ids,
        "type": const("track", n, pa.string()),
        "event": const("Product Viewed", n, pa.string()),
        "anonymous_id": const("anon-0001", n, pa.string()),
        "timestamp": received,
        "received_at": received,
        "source": const("web", n, pa.string()),
        "channel": const("web", n, pa.string()),
        "data_class": const("first_party", n, pa.string()),
        "properties": const('{"sku":"s1"}', n, pa.string()),
        "load_id": const("ld_bench", n, pa.string()),
    }
    cols = [given.get(f.name, pa.nulls(n, f.type)) for f in schema]
    return pa.table(cols, schema=schema)


def grow(engine: Engine, rng: np.random.Generator, have: int, want: int, pool: list[str]) -> None:
    """Append events and their keys until the log holds ``want`` rows."""
    while have < want:
        n = min(BATCH_ROWS, want - have)
        ids = random_ids(rng, n)
        rows = event_rows(ids, have)
        engine.append("events", rows)
        hi, lo = key_hashes(b"m", ids.to_pylist())
        keys = pa.table(
            {
                "key_hi": pa.array(hi, pa.int64()),
                "key_lo": pa.array(lo, pa.int32()),
                "received_at": rows["received_at"],
                # Above any seq a timed write takes (a process's copy reads seq > its own).
                "seq": pa.array(np.full(n, 1_000_000 + have // BATCH_ROWS, np.int64)),
            },
            schema=tables.INTAKE_KEYS.schema.to_pyarrow(),
        )
        engine.append("intake_keys", keys)
        pick = rng.choice(n, min(POOL_PER_BATCH, n), replace=False)
        pool.extend(ids.take(pa.array(pick)).to_pylist())
        have += n


def make_chunk(
    intake: Intake, rng: np.random.Generator, pool: list[str], tag: str
) -> tuple[Chunk, int]:
    """A chunk of 50,000 track messages: half new ids, half drawn from the stored log."""
    builder = intake.builder()
    old = rng.choice(len(pool), CHUNK // 2, replace=False)
    ids = [pool[i] for i in old] + [f"{tag}-{i:06d}" for i in range(CHUNK - CHUNK // 2)]
    for n, mid in enumerate(ids):
        msg = {
            "type": "track",
            "event": "Product Viewed",
            "anonymousId": f"anon-{n % 997}",
            "messageId": mid,
            "timestamp": "2026-11-24T08:00:00Z",
            "properties": {"sku": f"s{n % 50}", "price": 12.5},
        }
        builder.offer(msg, "bench:", n, b"")
    return builder.take(), CHUNK - CHUNK // 2


def timed_writes(
    engine: Engine, rng: np.random.Generator, pool: list[str], indexed: bool, tag: str
) -> tuple[list[float], list[float], float]:
    """Wall and CPU seconds of each timed chunk, and of the untimed first (cold) write."""
    intake = Intake(engine, WEB, import_name="bench", location="bench", clock=NOW, indexed=indexed)
    walls: list[float] = []
    cpus: list[float] = []
    cold = 0.0
    for r in range(REPEATS + 1):
        chunk, new = make_chunk(intake, rng, pool, f"{tag}{r}")
        before = intake.accepted
        t, c = time.perf_counter(), time.process_time()
        intake.write(chunk)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        assert intake.accepted - before == new, (intake.accepted - before, new)
        if r == 0:
            cold = wall
        else:
            walls.append(wall)
            cpus.append(cpu)
    return walls, cpus, cold


def per_size(sizes: list[int], work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rng = np.random.default_rng(7)
    pool: list[str] = []
    url = f"duckdb:///{work / 'log.duckdb'}"
    have = 0
    setup = 0.0
    for size in sizes:
        t = time.perf_counter()
        with Engine(url) as engine:
            grow(engine, rng, have, size, pool)
            engine.con.raw_sql("CHECKPOINT")
        have = size
        setup += time.perf_counter() - t
        label = f"{size // 1_000_000}M"
        with Engine(url) as engine:  # a fresh process's view: the first write reads the index
            walls, cpus, cold = timed_writes(engine, rng, pool, True, f"new{label}-")
            store = key_store(engine)
            out[f"index_chunk_ms_{label}"] = round(1000 * statistics.median(walls), 1)
            out[f"index_chunk_cpu_ms_{label}"] = round(1000 * statistics.median(cpus), 1)
            out[f"index_first_write_s_{label}"] = round(cold, 2)
            out[f"index_memory_mb_{label}"] = round(store.keys.nbytes / 2**20, 1)
            walls, cpus, _ = timed_writes(engine, rng, pool, False, f"old{label}-")
            out[f"scan_chunk_ms_{label}"] = round(1000 * statistics.median(walls), 1)
            out[f"scan_chunk_cpu_ms_{label}"] = round(1000 * statistics.median(cpus), 1)
        have += 2 * (REPEATS + 1) * (CHUNK - CHUNK // 2)
        print(
            f"log {label:>4}: key index {out[f'index_chunk_ms_{label}']:7.1f} ms/chunk "
            f"(CPU {out[f'index_chunk_cpu_ms_{label}']:.1f}; first write {cold:.2f} s, "
            f"{out[f'index_memory_mb_{label}']} MB) | semi-join {out[f'scan_chunk_ms_{label}']:7.1f}"
            f" ms/chunk (CPU {out[f'scan_chunk_cpu_ms_{label}']:.1f})",
            flush=True,
        )
    out["setup_s"] = round(setup, 1)
    first, last = f"{sizes[0] // 1_000_000}M", f"{sizes[-1] // 1_000_000}M"
    out["index_growth_ratio"] = round(
        out[f"index_chunk_ms_{last}"] / out[f"index_chunk_ms_{first}"], 2
    )
    out["scan_growth_ratio"] = round(
        out[f"scan_chunk_ms_{last}"] / out[f"scan_chunk_ms_{first}"], 2
    )
    out[f"scan_over_index_{last}"] = round(
        out[f"scan_chunk_ms_{last}"] / out[f"index_chunk_ms_{last}"], 2
    )
    # CPU time (all threads, DuckDB's included) is the steadier figure on a shared machine:
    # it does not count time spent waiting for a core.
    for path in ("index", "scan"):
        out[f"{path}_cpu_growth_ratio"] = round(
            out[f"{path}_chunk_cpu_ms_{last}"] / out[f"{path}_chunk_cpu_ms_{first}"], 2
        )
    out[f"scan_over_index_cpu_{last}"] = round(
        out[f"scan_chunk_cpu_ms_{last}"] / out[f"index_chunk_cpu_ms_{last}"], 2
    )
    print(
        f"CPU per chunk, {last} vs {first}: key index x{out['index_cpu_growth_ratio']}, "
        f"semi-join x{out['scan_cpu_growth_ratio']}; at {last} the semi-join costs "
        f"x{out[f'scan_over_index_cpu_{last}']} the key index's CPU"
    )
    print(
        f"per chunk, {last} vs {first}: key index x{out['index_growth_ratio']}, "
        f"semi-join x{out['scan_growth_ratio']}; at {last} the semi-join costs "
        f"x{out[f'scan_over_index_{last}']} the key index"
    )
    return out


def loader_rate(work: Path, records: int) -> dict[str, Any]:
    """bench/ingest.py's loader figure, for both paths, from the same spooled batches."""
    from closedloop.collect.drain import SpoolLoader
    from closedloop.collect.spool import SpoolWriter, encode_record
    from ingest import batch_template

    template = json.loads(batch_template(WEB.write_key))["batch"]
    lines = [json.dumps(m, separators=(",", ":")) for m in template]
    out: dict[str, Any] = {}
    for indexed in (True, False):
        spool = work / f"spool-{indexed}"

        async def fill(folder: Path = spool) -> None:
            w = SpoolWriter(folder)
            await asyncio.gather(
                *(
                    w.append(
                        encode_record(
                            {"s": "web", "f": []},
                            [ln.replace("@@@@@@@@", f"{r:08d}").encode() for ln in lines],
                        )
                    )
                    for r in range(records)
                )
            )
            w.close()

        asyncio.run(fill())
        name = "index" if indexed else "scan"
        with Engine(f"duckdb:///{work / f'ingest-{name}.duckdb'}") as engine:
            loader = SpoolLoader(engine, [WEB], spool, indexed=indexed)
            t, c = time.perf_counter(), time.process_time()
            moved = 0
            while (r := loader.run_once()).records:
                moved += r.accepted
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            assert engine.count("events") == moved == records * len(lines)
        out[f"loader_{name}_events_per_s"] = round(moved / wall)
        out[f"loader_{name}_cpu_us_per_event"] = round(cpu / moved * 1e6, 2)
        print(
            f"spool loader, {name}: {moved:,} events at {out[f'loader_{name}_events_per_s']:,}/s "
            f"({out[f'loader_{name}_cpu_us_per_event']} µs CPU per event)",
            flush=True,
        )
        shutil.rmtree(spool, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,5,20", help="log sizes in millions of events")
    parser.add_argument("--spool-records", type=int, default=5_000, help="batches of 100")
    args = parser.parse_args()
    sizes = [int(float(s) * 1_000_000) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="cl-dedup-"))
    out: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "chunk": CHUNK,
        "duplicates_per_chunk": CHUNK // 2,
    }
    try:
        out.update(loader_rate(work, args.spool_records))
        out.update(per_size(sizes, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
