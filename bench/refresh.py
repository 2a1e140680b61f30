"""Benchmark: incremental refresh of the portrait and traits after 1% new events, vs a full build.

Run as ``python bench/refresh.py [--persons N] [--share 0.01]`` (default 100,000 persons).
``measure_refresh`` is the reusable part (``bench/portrait.py`` may call it on its loaded
warehouse). On a loaded event log it:

1. holds back the newest ``share`` of events (by timestamp: new events are the latest ones)
   and sets the clock to the newest event kept — the warehouse as it was at the last build;
2. resolves identities and runs a full build of profiles and traits (which also records the
   state a refresh starts from);
3. loads the held-back events, moves the clock to the reference time, resolves again, and
   times ``portrait.refresh`` (incremental);
4. baseline in the same run: a full build of profiles and traits on the same, complete data
   and clock; the two results are checked to be equal (floats to 1e-6); when they are not,
   ``unequal`` counts the differing rows per table and column.

With the chain (default; ``--no-chain`` leaves it out), the same copy also measures the whole
chain of ``bench/portrait.py``'s first figure: the 50 tags and 20 segments built in full at
step 2, then after step 3 brought forward only for changed customers as the live refresh does
(``plan_changes`` → ``forward_tags`` → ``forward_segments``), against the full portrait,
tags and segments of step 4; tag values and segment members are checked equal
(``chain_equal_to_full``). ``chain_full_cpu_s``, ``chain_incremental_cpu_s``, their ratio
and per-step CPU seconds (``chain_*_steps_cpu_s``). When the customers to recompute are a
wide share (``tags.incremental.WIDE``, ``segments.incremental.WIDE``), tags and segments
are computed for everyone inside the incremental step, as the live refresh does.

Identity resolution is timed separately (it is the identity stage's, run in both cases).
Then a clock-only refresh a day later, and a live-like refresh (``live_refresh``: five new
events, refreshed seconds later). ``--cache DIR`` measures a copy of a warehouse
``bench/portrait.py`` cached instead of generating one. CPU seconds per step of the
refreshes are in ``*_steps_cpu_s``; ``load_average`` is ``uptime``'s at start and end.
``live_again_*`` is a second live refresh in the same process (a server's steady state:
statements compiled once are reused) and ``live_orders_*`` one whose five events are orders.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import ibis
import pyarrow as pa
import pyarrow.compute as pc

from closedloop.core.clock import Clock
from closedloop.core.definitions import Project, SegmentDef, load_project
from closedloop.core.engine import Engine
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.identity.resolve import resolve
from closedloop.pipeline import load_imports
from closedloop.portrait.refresh import RefreshResult, full_build, refresh
from closedloop.segments.accounts import evaluate_in_batches
from closedloop.segments.audience import Fields
from closedloop.serving.changes import digests, plan_changes, save_state
from closedloop.serving.live import forward_segments, forward_tags
from closedloop.tags.build import build_tags

T = TypeVar("T")


def _rows(engine: Engine) -> dict[tuple[str, ...], dict[str, Any]]:
    """Profile and trait rows keyed by (table, customer[, trait]); floats to 1e-6."""

    def keyed(name: str, keys: list[str]) -> dict[tuple[str, ...], dict[str, Any]]:
        t = engine.table(name).drop("computed_at").to_pyarrow().to_pylist()
        return {
            (name, *(str(r[k]) for k in keys)): {
                c: round(v, 6) if isinstance(v, float) else v for c, v in r.items()
            }
            for r in t
        }

    return keyed("profiles", ["customer_id"]) | keyed("computed_traits", ["customer_id", "trait"])


def differences(
    a: dict[tuple[str, ...], dict[str, Any]], b: dict[tuple[str, ...], dict[str, Any]]
) -> dict[str, int]:
    """How many rows differ in each ``table.column`` (``table.<row>`` for a missing row)."""
    out: dict[str, int] = {}
    for k in a.keys() | b.keys():
        ra, rb = a.get(k), b.get(k)
        cols = ["<row>"] if ra is None or rb is None else [c for c in ra if ra[c] != rb.get(c)]
        for c in cols:
            out[f"{k[0]}.{c}"] = out.get(f"{k[0]}.{c}", 0) + 1
    return dict(sorted(out.items()))


def timed(f: Callable[[], T]) -> tuple[T, float, float]:
    """``f()`` with its wall time and the process's CPU time (all threads: DuckDB's too).

    CPU time is the figure to compare on a shared machine, where wall time depends on what
    else runs.
    """
    w, c = time.perf_counter(), time.process_time()
    r = f()
    return r, round(time.perf_counter() - w, 3), round(time.process_time() - c, 3)


Chain = tuple[Project, list[SegmentDef], Fields]  # bench/portrait.py's bench_project


def chain_definitions(project: Project) -> Chain:
    """``project`` with ``bench/portrait.py``'s 50 tags and 20 segments, in run order."""
    from portrait import bench_project  # bench/portrait.py, beside this script

    defs: Chain = bench_project(project)
    return defs


def chain_whole(engine: Engine, chain: Chain, clock: Clock) -> dict[str, float]:
    """Tags and segments recomputed for everyone, as a build does: CPU seconds per step and
    ``wall`` for both; then, apart (``live_state``), the state an incremental chain starts
    from (``serving.changes``)."""
    project, ordered, fields = chain
    cpu: dict[str, float] = {}
    wall = time.perf_counter()
    _, _, cpu["tags"] = timed(lambda: build_tags(engine, project.tags, clock, root=project.root))
    _, _, cpu["segments"] = timed(lambda: evaluate_in_batches(engine, ordered, fields, clock))
    cpu["wall"] = round(time.perf_counter() - wall, 3)
    now = engine.scratch("chain_now", digests(engine))
    _, _, cpu["live_state"] = timed(lambda: save_state(engine, project, clock.now(), now))
    return cpu


def chain_forward(
    engine: Engine, chain: Chain, clock: Clock, portrait: RefreshResult
) -> tuple[dict[str, float], float]:
    """After an incremental portrait refresh, tags and segments brought forward only for the
    customers whose inputs changed, by the steps ``serving.live.refresh_all`` runs:
    ``plan_changes`` (by key where it can) → ``forward_tags`` → ``forward_segments``, then
    the state the next one starts from. CPU seconds per step, and the wall seconds of all."""
    project, ordered, fields = chain
    as_of = clock.now()
    cpu: dict[str, float] = {}
    wall = time.perf_counter()
    (found, how), _, cpu["changes"] = timed(lambda: plan_changes(engine, project, portrait, as_of))
    assert found is not None, f"the incremental chain could not tell what changed: {how}"
    (tagged, seg_moved), _, cpu["tags"] = timed(
        lambda: forward_tags(engine, project, ordered, clock, found, portrait.customers)
    )
    _, _, cpu["segments"] = timed(
        lambda: forward_segments(
            engine, ordered, fields, clock, found, tagged, seg_moved, portrait.customers
        )
    )
    profiles = portrait.changed is None
    _, _, cpu["state"] = timed(
        lambda: save_state(engine, project, as_of, changes=found, profiles=profiles)
    )
    return cpu, round(time.perf_counter() - wall, 3)


def chain_snapshot(engine: Engine, name: str) -> tuple[Any, Any]:
    """This moment's tag values and open segment stays, kept as scratch tables."""
    tv = engine.table("tag_values").select("customer_id", "tag", "value")
    m = engine.table("segment_membership")
    m = m.filter(m.exited_at.isnull()).select("segment", "customer_id")
    return engine.scratch(f"{name}_tags", tv), engine.scratch(f"{name}_members", m)


def chain_differences(engine: Engine, a: tuple[Any, Any], b: tuple[Any, Any]) -> dict[str, int]:
    """Rows in one snapshot and not the other, per table (counted in the warehouse)."""
    out: dict[str, int] = {}
    for name, x, y in (("tag_values", a[0], b[0]), ("members", a[1], b[1])):
        cols = list(x.columns)
        n = x.anti_join(y, cols).count().to_pyarrow().as_py()
        n += y.anti_join(x, cols).count().to_pyarrow().as_py()
        if n:
            out[name] = int(n)
    return out


def measure_refresh(
    engine: Engine,
    project: Project,
    as_of: datetime,
    share: float = 0.01,
    check: bool = True,
    chain: bool = True,
) -> dict[str, Any]:
    """Figures for an incremental refresh after ``share`` new events vs a full build.

    ``engine`` holds the complete event log (loaded); it is left with it, resolved and built
    as of ``as_of``. The events table is rewritten twice on the way. With ``chain``, the
    whole chain too (``chain_*``): portrait, the 50 tags and 20 segments of
    ``bench/portrait.py`` built in full against the portrait refresh with tags and segments
    brought forward (``chain_forward``), checked equal; the clock-only and live refreshes
    then run the chain as well (``*_chain_steps_cpu_s``).
    """
    fig: dict[str, Any] = {"share": share}
    defs = chain_definitions(project) if chain else None
    tz = project.config.timezone
    ev = engine.table("events")
    cutoff = ev.timestamp.quantile(1 - share).to_pyarrow().as_py()
    held = ev.filter(ev.timestamp > cutoff).to_pyarrow()
    engine.replace("events", ev.filter(ev.timestamp <= cutoff))
    fig["new_events"] = held.num_rows
    t = time.perf_counter()
    resolve(engine, project.identity, Clock(cutoff))
    fig["identity_before_s"] = round(time.perf_counter() - t, 3)
    _, fig["first_full_s"], _ = timed(lambda: full_build(engine, project.traits, Clock(cutoff), tz))
    if defs is not None:
        chain_whole(engine, defs, Clock(cutoff))  # the state the chain starts from

    engine.append("events", held)
    t = time.perf_counter()
    resolve(engine, project.identity, Clock(as_of))
    fig["identity_after_s"] = round(time.perf_counter() - t, 3)
    inc, fig["incremental_s"], fig["incremental_cpu_s"] = timed(
        lambda: refresh(engine, project.traits, Clock(as_of), tz)
    )
    assert inc.mode == "incremental", inc
    fig["incremental_steps_cpu_s"] = inc.steps
    fig["recomputed_customers"] = inc.recomputed
    fig["customers"] = inc.customers
    fig["recomputed_share"] = round(inc.recomputed / max(inc.customers, 1), 4)
    after_incremental = _rows(engine) if check else None
    if defs is not None:
        forward, forward_s = chain_forward(engine, defs, Clock(as_of), inc)
        inc_snap = chain_snapshot(engine, "chain_inc") if check else None

    _, fig["full_s"], fig["full_cpu_s"] = timed(
        lambda: full_build(engine, project.traits, Clock(as_of), tz)
    )
    if defs is not None:
        whole = chain_whole(engine, defs, Clock(as_of))
        full_steps = {
            "portrait": fig["full_cpu_s"],
            "tags": whole["tags"],
            "segments": whole["segments"],
        }
        inc_steps = {"portrait": fig["incremental_cpu_s"], **forward}
        fig["chain_full_steps_cpu_s"] = full_steps
        fig["chain_incremental_steps_cpu_s"] = inc_steps
        fig["chain_full_cpu_s"] = round(sum(full_steps.values()), 3)
        fig["chain_incremental_cpu_s"] = round(sum(inc_steps.values()), 3)
        fig["chain_incremental_vs_full_cpu_ratio"] = round(
            fig["chain_incremental_cpu_s"] / fig["chain_full_cpu_s"], 3
        )
        fig["chain_incremental_s"] = round(fig["incremental_s"] + forward_s, 3)
        fig["chain_tags_segments_full_s"] = whole["wall"]
        fig["chain_full_s"] = round(fig["full_s"] + whole["wall"], 3)
        fig["chain_incremental_vs_full_ratio"] = round(
            fig["chain_incremental_s"] / fig["chain_full_s"], 3
        )
        if inc_snap is not None:
            diff = chain_differences(engine, inc_snap, chain_snapshot(engine, "chain_full"))
            fig["chain_equal_to_full"] = not diff
            if diff:
                fig["chain_unequal"] = diff
    fig["incremental_vs_full_ratio"] = round(fig["incremental_s"] / fig["full_s"], 3)
    fig["incremental_vs_full_cpu_ratio"] = round(fig["incremental_cpu_s"] / fig["full_cpu_s"], 3)
    if after_incremental is not None:
        diff = differences(after_incremental, _rows(engine))
        fig["equal_to_full"] = not diff
        if diff:
            fig["unequal"] = diff  # rows differing per table.column: where to look
    # A scheduled refresh with no new events: only the clock moves (one day).
    idle, fig["clock_only_s"], fig["clock_only_cpu_s"] = timed(
        lambda: refresh(engine, project.traits, Clock(as_of + timedelta(days=1)), tz)
    )
    fig["clock_only_recomputed"] = idle.recomputed
    if defs is not None:
        steps, _ = chain_forward(engine, defs, Clock(as_of + timedelta(days=1)), idle)
        fig["clock_only_chain_steps_cpu_s"] = steps
    fig.update(live_refresh(engine, project, held, as_of + timedelta(days=1), defs))
    # The server's steady state: another live refresh in the same process (statements
    # compiled once are reused), then one whose events are orders (ranks may move).
    later = as_of + timedelta(days=1, seconds=10)
    fig.update(live_refresh(engine, project, held, later, defs, prefix="live_again"))
    orders = held.filter(pc.equal(held["event"], "Order Completed"))
    later += timedelta(seconds=10)
    fig.update(live_refresh(engine, project, orders, later, defs, prefix="live_orders"))
    fig["events"] = int(engine.table("events").count().execute())
    return fig


def live_refresh(
    engine: Engine,
    project: Project,
    like: pa.Table,
    since: datetime,
    chain: Chain | None = None,
    n: int = 5,
    prefix: str = "live",
) -> dict[str, Any]:
    """A live refresh's portrait part: ``n`` new events (copies of the first of ``like``
    under new message ids, two seconds after ``since``), refreshed five seconds after it;
    with ``chain``, its tags and segments brought forward too (``live_chain_steps_cpu_s``).

    What ``closedloop serve`` does after each load pass; its cost must not grow with the
    warehouse. Identity is resolved first (timed apart, the identity stage's).
    """
    few = like.slice(0, n)
    ids = pc.binary_join_element_wise(few["message_id"], pa.scalar(f"-{prefix}"), "")
    at = pa.array([since + timedelta(seconds=2)] * few.num_rows, few.schema.field("timestamp").type)
    few = few.set_column(few.schema.get_field_index("message_id"), "message_id", ids)
    few = few.set_column(few.schema.get_field_index("timestamp"), "timestamp", at)
    engine.append("events", few)
    clock = Clock(since + timedelta(seconds=5))
    resolve(engine, project.identity, clock)
    r, wall, cpu = timed(lambda: refresh(engine, project.traits, clock, project.config.timezone))
    changed = -1 if r.changed is None else int(r.changed.count().execute())
    fig: dict[str, Any] = {
        f"{prefix}_s": wall,
        f"{prefix}_cpu_s": cpu,
        f"{prefix}_recomputed": r.recomputed,
        f"{prefix}_rows_rewritten": changed,
        f"{prefix}_steps_cpu_s": r.steps,
    }
    if chain is not None:
        steps, fig[f"{prefix}_chain_forward_s"] = chain_forward(engine, chain, clock, r)
        fig[f"{prefix}_chain_steps_cpu_s"] = steps
        fig[f"{prefix}_chain_cpu_s"] = round(cpu + sum(steps.values()), 3)
    return fig


def run_cached(src: Path, share: float, root: Path, chain: bool = True) -> dict[str, Any]:
    """``measure_refresh`` on a copy of a warehouse ``bench/portrait.py`` cached (its
    directory holds ``READY`` with the reference time, and the project in ``p``)."""
    reference = datetime.fromisoformat((src / "READY").read_text())
    shutil.copytree(src / "p", root / "p")
    project = load_project(root / "p")
    fig: dict[str, Any] = {"cache": str(src)}
    with Engine(project.engine_url) as engine:
        fig.update(measure_refresh(engine, project, reference, share, chain=chain))
    fig["machine"] = f"{platform.machine()}, {platform.python_version()}, ibis {ibis.__version__}"
    return fig


def run(persons: int, share: float, root: Path, chain: bool = True) -> dict[str, Any]:
    fig: dict[str, Any] = {"persons": persons}
    t = time.perf_counter()
    summary = generate(root / "brand", persons)
    init_project(root / "p", data_dir=relative_data_dir(root / "p", root / "brand" / "data"))
    project = load_project(root / "p")
    with Engine(project.engine_url) as engine:
        load_imports(engine, project)
        fig["prepare_s"] = round(time.perf_counter() - t, 1)
        fig.update(measure_refresh(engine, project, summary.reference_time, share, chain=chain))
    fig["machine"] = f"{platform.machine()}, {platform.python_version()}, ibis {ibis.__version__}"
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--persons", type=int, default=100_000)
    ap.add_argument("--share", type=float, default=0.01)
    ap.add_argument(
        "--cache",
        type=Path,
        help="a warehouse bench/portrait.py prepared (e.g. /tmp/closedloop-bench/"
        "portrait-100000): measured on a copy of it instead of generating one",
    )
    ap.add_argument(
        "--no-chain",
        action="store_true",
        help="profiles and traits only: leave out the whole chain (50 tags, 20 segments)",
    )
    args = ap.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.cache.parent if args.cache else None) as tmp:
        if args.cache:
            fig = run_cached(args.cache, args.share, Path(tmp), not args.no_chain)
        else:
            fig = run(args.persons, args.share, Path(tmp), not args.no_chain)
    fig["load_average"] = [round(x, 2) for x in (*load, *os.getloadavg())]
    for k, v in fig.items():
        print(f"{k:>28}: {v}")
    print(json.dumps(fig, default=str))


if __name__ == "__main__":
    main()
