"""Benchmark: identity resolution — accuracy against ground truth, components speed, matching.

Run as ``python bench/identity.py [--persons N] [--edges E] [--small S]``. Figures:

* accuracy at N persons (default 100,000) against the generator's truth: pairwise precision,
  recall and F1 over identifiers, recall over evidence-linkable pairs, the share of persons
  resolved exactly; and the resolve time;
* incremental resolution at the same sizes: the newest share of events (``--new-share``,
  default 1%) is held back, everything else resolved (``resolve_first_s``), the held events
  appended and resolved incrementally (``incremental_s``), then a full run forced on the same
  state (``resolve_s``, the baseline of ``incremental_vs_full``) must change nothing
  (``incremental_equals_full``: no customer changed and the identity tables are unchanged);
* probabilistic matching at S (default 10,000) and N persons: time, links, precision, recall
  and F1 of the scored member-id links — the same threshold at both sizes, to show it holds
  when the base grows and strangers sharing name and birthday multiply;
* with ``--matching-persons M``: matching on the CRM export of M persons alone (records
  only, no web events), to time it and check its precision at a million persons;
* the components step on a synthetic graph of E edges (default 10,000,000), in this run
  beside ``scipy.sparse.csgraph.connected_components`` on the same edges already in memory
  (the in-process floor): our step reads the edges from the warehouse, labels them and
  writes the labels back; the portable Ibis label propagation is timed on the same graph
  (``--no-portable`` skips it).

With ``--accuracy-only``: only the accuracy figures, from one full resolve, at S and N
persons (e.g. ``--accuracy-only --persons 1000000``), on brands generated with only the
messages that show identity evidence not shown before (``generate(..., identity_only=True)``:
same persons, identifiers, noise and traps, a quarter of the messages); at S the full brand
is resolved too and ``identity_only_same_map`` says whether both gave the same identity map.
CPU seconds beside every wall time, the load average, and the peak RSS. ``BENCH_TMP`` puts
the scratch folders elsewhere (a 1M run takes about 10 GB).

With ``--only-incremental``: only the incremental figures, at S and N persons (no accuracy,
matching or components), e.g. ``--only-incremental --small 10000 --persons 100000``.

With ``--spark P`` only: DuckDB and Spark (PySpark local mode, ``local[2]``) resolve the same
P-person sample loaded through ``collect``; prints both resolve times (DuckDB is the
baseline) and whether the clusters are identical (same identifiers, same customer ids).

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import ibis
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from closedloop.core.clock import Clock
from closedloop.core.definitions import Project, load_project
from closedloop.core.engine import Engine
from closedloop.demo.accuracy import identity_accuracy, matching_accuracy
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.identity.components import components_ibis, components_local
from closedloop.identity.matching import probabilistic_pairs
from closedloop.identity.resolve import resolve
from closedloop.pipeline import load_imports

IDENTITY_TABLES = (
    "identity_map",
    "customers",
    "customer_aliases",
    "event_customers",
    "identity_edges",
    "identity_dropped_links",
    "identifier_issues",
    "identity_suspects",
    "identity_clusters",
)


def _hold_back(engine: Engine, share: float) -> pa.Table:
    """Remove the newest ``share`` of events from the log and return them (to append later)."""
    ev = engine.table("events")
    n = int(ev.count().execute())
    k = max(1, int(n * share))
    newest = ev.order_by([ibis.desc(ev.timestamp), ev.message_id]).limit(k)
    held = newest.to_pyarrow()
    keep = ev.anti_join(newest.select("message_id"), "message_id")
    engine.replace("events", engine.scratch("bench_kept_events", keep))
    return held


def _unchanged(engine: Engine, before: dict[str, str]) -> bool:
    """Whether every identity table still holds exactly the rows snapped as ``before``."""
    for name, snap in before.items():
        now, old = engine.table(name), engine.con.table(snap)
        if int(now.difference(old).count().execute()) or int(old.difference(now).count().execute()):
            print(f"incremental != full in {name}", flush=True)
            return False
    return True


def accuracy(
    persons: int, root: Path, new_share: float = 0.01, *, score: bool = True
) -> dict[str, Any]:
    """Generate, load, resolve (full, incremental, full again); score against the truth
    (unless ``score`` is false: the incremental figures alone)."""
    fig: dict[str, Any] = {"persons": persons}
    t = time.perf_counter()
    summary = generate(root / "brand", persons)
    fig["generate_s"] = round(time.perf_counter() - t, 2)
    init_project(root / "p", data_dir=relative_data_dir(root / "p", root / "brand" / "data"))
    project = load_project(root / "p")
    with Engine(project.engine_url) as engine:
        t = time.perf_counter()
        load_imports(engine, project)
        fig["load_s"] = round(time.perf_counter() - t, 2)
        clock = Clock(summary.reference_time)
        held = _hold_back(engine, new_share)
        fig["new_events"] = held.num_rows
        t, c = time.perf_counter(), _cpu()
        resolve(engine, project.identity, clock)
        fig["resolve_first_s"], fig["resolve_first_cpu_s"] = _since(t, c)
        engine.append("events", held)
        t, c = time.perf_counter(), _cpu()
        inc = resolve(engine, project.identity, clock)
        fig["incremental_s"], fig["incremental_cpu_s"] = _since(t, c)
        fig["incremental_path"] = inc.path
        fig["incremental_changed_customers"] = len(inc.changed)
        runs = engine.table("identity_runs")
        last = runs.order_by(ibis.desc(runs.seq)).limit(1).to_pyarrow().to_pylist()[0]
        fig["incremental_region_identifiers"] = last["region_identifiers"]
        snaps = {}
        for name in IDENTITY_TABLES:
            snaps[name] = f"bench_snap_{name}"
            engine.con.create_table(snaps[name], engine.table(name), overwrite=True)
        t, c = time.perf_counter(), _cpu()
        r = resolve(engine, project.identity, clock, incremental=False)
        fig["resolve_s"], fig["resolve_cpu_s"] = _since(t, c)
        fig["load_average"] = [round(x, 1) for x in os.getloadavg()]
        fig["incremental_vs_full"] = round(fig["incremental_s"] / fig["resolve_s"], 3)
        fig["incremental_vs_full_cpu"] = round(fig["incremental_cpu_s"] / fig["resolve_cpu_s"], 3)
        fig["incremental_equals_full"] = not r.changed and _unchanged(engine, snaps)
        fig["identifiers"] = r.identifiers
        fig["customers"] = r.customers
        fig["probabilistic_links"] = r.probabilistic
        fig.update(few_new_events(engine, project, clock))
        if not score:
            return fig
        acc = identity_accuracy(engine, root / "brand" / "truth")
        fig.update(
            precision=round(acc.precision, 5),
            recall=round(acc.recall, 5),
            f1=round(acc.f1, 5),
            linkable_recall=round(acc.linkable_recall, 5),
            exact_persons=round(acc.exact_persons, 5),
        )
        m = matching_accuracy(engine, root / "brand" / "truth")
        fig.update({f"matching_{k}": round(v, 5) for k, v in m.items()})
        # Matching alone, timed: the resolve above left its node occurrences in scratch.
        crm = int(engine.table("events").filter(lambda e: e.source == "crm").count().execute())
        fig["crm_rows"] = crm
        fig.update(time_matching(engine, project))
    return fig


def _orders_again(engine: Engine, n: int, received: Any, *, new_cookie: bool = False) -> pa.Table:
    """``n`` of the newest orders logged again under new message ids, received at
    ``received``: what a live server loads between two refreshes (known customers buying).

    ``new_cookie``: each from a browser not seen before (a new anonymous id beside the known
    member), so the run must recompute the region those customers are in.
    """
    ev = engine.table("events")
    rows = ev.filter(ev.event == "Order Completed").order_by(ibis.desc(ev.timestamp)).limit(n)
    rows = rows.to_pyarrow()
    ids = pa.array([f"bench-again-{received.timestamp():.0f}-{i}" for i in range(rows.num_rows)])
    rows = rows.set_column(rows.schema.get_field_index("message_id"), "message_id", ids)
    if new_cookie:
        at = rows.schema.get_field_index("anonymous_id")
        cookies = pa.array([f"ck-{m}" for m in ids.to_pylist()], rows.schema.field(at).type)
        rows = rows.set_column(at, "anonymous_id", cookies)
    at = pa.array([received] * rows.num_rows, rows.schema.field("received_at").type)
    return rows.set_column(rows.schema.get_field_index("received_at"), "received_at", at)


def few_new_events(engine: Engine, project: Project, clock: Clock, n: int = 5) -> dict[str, Any]:
    """A live refresh's identity step: ``n`` orders received after everything resolved.

    Timed three ways in this run: new events found by the watermark (``few_new_*``: known
    identifiers seen together before, so only counters move), the same kind of run with the
    watermark withdrawn, so they are found by the anti-join of the whole log against the
    messages read (``few_new_antijoin_*``, the baseline: the way every incremental run found
    them before the watermark), and orders each from a new browser (``few_new_region_*``: a
    new identifier, so the clusters it joins are recomputed from their messages).
    """
    fig: dict[str, Any] = {}
    top = engine.table("events").received_at.max().execute()
    # Each way twice, alternating, the better of two kept: the first run after a full one
    # pays for warming caches, whichever way it goes.
    keys = ("few_new", "few_new_antijoin", "few_new_region")
    ways = [(k, i * len(keys) + j + 1) for i in range(2) for j, k in enumerate(keys)]
    for key, shift in ways:
        if key == "few_new_antijoin":
            runs = engine.table("identity_runs")
            engine.replace("identity_runs", runs.mutate(watermark=ibis.null(runs.watermark.type())))
        received = top + timedelta(hours=shift)
        new_cookie = key == "few_new_region"
        engine.append("events", _orders_again(engine, n, received, new_cookie=new_cookie))
        t, c = time.perf_counter(), _cpu()
        r = resolve(engine, project.identity, clock)
        wall, cpu = _since(t, c)
        if f"{key}_cpu_s" not in fig or cpu < fig[f"{key}_cpu_s"]:
            fig[f"{key}_s"], fig[f"{key}_cpu_s"] = wall, cpu
        runs = engine.table("identity_runs")
        why = runs.order_by(ibis.desc(runs.seq)).limit(1).to_pyarrow()["why"][0].as_py()
        fig[f"{key}_why"] = f"{r.path}: {why}"
    fig["few_new_events"] = n
    fig["few_new_load_average"] = [round(x, 1) for x in os.getloadavg()]
    fig["few_new_vs_antijoin_cpu"] = round(fig["few_new_cpu_s"] / fig["few_new_antijoin_cpu_s"], 3)
    fig["few_new_vs_region_cpu"] = round(fig["few_new_cpu_s"] / fig["few_new_region_cpu_s"], 3)
    return fig


def memory_size(text: str) -> str:
    """A size such as ``6GB`` (checked: it goes into a SET statement); "" for none.

    (argparse passes a string default through this too.)
    """
    if text and not re.fullmatch(r"\d+(\.\d+)?[KMGT]i?B", text):
        raise argparse.ArgumentTypeError(f"not a size like 6GB or 512MiB: {text!r}")
    return text


def _cpu() -> float:
    """CPU seconds of this process, every thread (DuckDB's too)."""
    return time.process_time()


def accuracy_only(
    persons: int, root: Path, *, identity_only: bool = True, memory_limit: str = ""
) -> dict[str, Any]:
    """Generate, load, resolve once (full), score: the accuracy figures alone.

    ``identity_only`` generates only the messages that show identity evidence not shown
    before (``generate(..., identity_only=True)``): the same persons, identifiers, noise and
    traps, about a quarter of the messages; ``main`` checks at the small size that it
    resolves to the very same identity map as the full brand. The map is left in
    ``root/identity_map.parquet`` for that check.
    """
    fig: dict[str, Any] = {"persons": persons, "identity_only": identity_only}
    t, c = time.perf_counter(), _cpu()
    summary = generate(root / "brand", persons, identity_only=identity_only)
    fig["generate_s"], fig["generate_cpu_s"] = _since(t, c)
    fig["messages"] = summary.messages
    _progress(fig)
    init_project(root / "p", data_dir=relative_data_dir(root / "p", root / "brand" / "data"))
    project = load_project(root / "p")
    with Engine(project.engine_url) as engine:
        if memory_limit:
            # DuckDB takes up to 80% of RAM by default: on a shared machine a 1M resolve
            # grew past 15 GB and starved everything else. A constant statement.
            engine.con.raw_sql(f"SET memory_limit = '{memory_limit}'")
            fig["memory_limit"] = memory_limit
        t, c = time.perf_counter(), _cpu()
        load_imports(engine, project)
        fig["load_s"], fig["load_cpu_s"] = _since(t, c)
        fig["events"] = engine.count("events")
        _progress(fig)
        t, c = time.perf_counter(), _cpu()
        r = resolve(engine, project.identity, Clock(summary.reference_time), incremental=False)
        fig["resolve_s"], fig["resolve_cpu_s"] = _since(t, c)
        fig["load_average_after_resolve"] = [round(x, 1) for x in os.getloadavg()]
        fig["identifiers"] = r.identifiers
        fig["customers"] = r.customers
        fig["probabilistic_links"] = r.probabilistic
        _progress(fig)
        imap = engine.table("identity_map").select(
            "id_type", "id_value", "customer_id", "quarantined", "first_seen"
        )
        pq.write_table(imap.to_pyarrow(), root / "identity_map.parquet")
        t, c = time.perf_counter(), _cpu()
        acc = identity_accuracy(engine, root / "brand" / "truth")
        fig["score_s"], fig["score_cpu_s"] = _since(t, c)
        fig.update(
            precision=round(acc.precision, 5),
            recall=round(acc.recall, 5),
            f1=round(acc.f1, 5),
            linkable_recall=round(acc.linkable_recall, 5),
            exact_persons=round(acc.exact_persons, 5),
        )
        m = matching_accuracy(engine, root / "brand" / "truth")
        fig.update({f"matching_{k}": round(v, 5) for k, v in m.items()})
        fig["crm_rows"] = summary.crm_rows
        fig.update(time_matching(engine, project))
    fig["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return fig


def same_map(a: Path, b: Path) -> bool:
    """Whether two runs left the same identity map (same rows, in key order)."""
    ta = pq.read_table(a).sort_by([("id_type", "ascending"), ("id_value", "ascending")])
    tb = pq.read_table(b).sort_by([("id_type", "ascending"), ("id_value", "ascending")])
    return ta.equals(tb)


def _since(t: float, c: float) -> tuple[float, float]:
    return round(time.perf_counter() - t, 2), round(_cpu() - c, 2)


def _progress(fig: dict[str, Any]) -> None:
    """The figures so far, on stderr: a long run that is stopped still says how far it got."""
    print(json.dumps(fig), file=sys.stderr, flush=True)


def time_matching(engine: Engine, project: Project) -> dict[str, Any]:
    """Matching alone, timed, over the node occurrences the last resolve left in scratch."""
    node_occ = engine.con.table("_scratch_id_new_occ")
    out: dict[str, Any] = {}
    t = time.perf_counter()
    links, model = probabilistic_pairs(engine, project.identity, node_occ)
    if links is not None:
        links.count().execute()
    out["matching_s"] = round(time.perf_counter() - t, 2)
    if model is not None:
        out["matching_pairs_compared"] = model.pairs
        out["matching_prior"] = round(model.lam, 5)
    return out


def matching_at_scale(persons: int, root: Path) -> dict[str, Any]:
    """Probabilistic matching on the CRM export alone (its rows are the records to match).

    Loading only the CRM import keeps a 1,000,000-person run to minutes; the scored links
    are judged against the truth as in ``accuracy``.
    """
    fig: dict[str, Any] = {"persons": persons}
    t = time.perf_counter()
    summary = generate(root / "brand", persons)
    fig["generate_s"] = round(time.perf_counter() - t, 2)
    init_project(root / "p", data_dir=relative_data_dir(root / "p", root / "brand" / "data"))
    project = load_project(root / "p")
    crm_only = [i for i in project.config.imports if i.name == "crm_members"]
    project = project.model_copy(
        update={"config": project.config.model_copy(update={"imports": crm_only})}
    )
    with Engine(project.engine_url) as engine:
        t = time.perf_counter()
        load_imports(engine, project)
        fig["load_s"] = round(time.perf_counter() - t, 2)
        fig["crm_rows"] = engine.count("events")
        t = time.perf_counter()
        r = resolve(engine, project.identity, Clock(summary.reference_time))
        fig["resolve_s"] = round(time.perf_counter() - t, 2)
        fig["probabilistic_links"] = r.probabilistic
        m = matching_accuracy(engine, root / "brand" / "truth")
        fig.update({f"matching_{k}": round(v, 5) for k, v in m.items()})
        fig.update(time_matching(engine, project))
    return fig


def synthetic_graph(edges: int, seed: int = 11) -> tuple[int, np.ndarray, np.ndarray]:
    """An identity-like graph: many small clusters (persons), a few long links between them."""
    rng = np.random.default_rng(seed)
    n = int(edges * 1.2)
    src = rng.integers(0, n, edges, dtype=np.int64)
    dst = (src // 8) * 8 + rng.integers(0, 8, edges, dtype=np.int64)
    far = rng.random(edges) < 0.01
    dst[far] = rng.integers(0, n, int(far.sum()), dtype=np.int64)
    return n, src, np.minimum(dst, n - 1)


def components(edges: int, root: Path, portable: bool) -> dict[str, Any]:
    fig: dict[str, Any] = {"graph_edges": edges}
    n, src, dst = synthetic_graph(edges)
    fig["graph_nodes"] = n
    t = time.perf_counter()
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    k, _ = connected_components(graph, directed=False)
    fig["scipy_s"] = round(time.perf_counter() - t, 3)
    fig["graph_components"] = int(k)
    with Engine(f"duckdb:///{root / 'graph.duckdb'}") as engine:
        con = engine.con
        nodes_t = pa.table({"node_id": np.arange(n, dtype=np.int64)})
        edges_t = pa.table({"src": src, "dst": dst})
        con.create_table("g_nodes", nodes_t, overwrite=True)
        con.create_table("g_edges", edges_t, overwrite=True)
        del nodes_t, edges_t
        t = time.perf_counter()
        ea = con.table("g_edges").to_pyarrow()
        na = con.table("g_nodes").to_pyarrow()
        comp = components_local(
            na["node_id"].to_numpy(), ea["src"].to_numpy(), ea["dst"].to_numpy()
        )
        with engine.temporary(comp) as c:
            engine.scratch("g_components", c)
        fig["local_step_s"] = round(time.perf_counter() - t, 3)
        fig["local_vs_scipy"] = round(fig["local_step_s"] / fig["scipy_s"], 2)
        labels = comp["component"].to_numpy()
        fig["local_components"] = len(np.unique(labels))
        if portable:
            t = time.perf_counter()
            out = components_ibis(engine, con.table("g_nodes"), con.table("g_edges"))
            got = int(out.component.nunique().execute())
            fig["portable_s"] = round(time.perf_counter() - t, 3)
            fig["portable_vs_scipy"] = round(fig["portable_s"] / fig["scipy_s"], 2)
            fig["portable_components_agree"] = got == fig["local_components"]
    return fig


def spark_vs_duckdb(persons: int, root: Path) -> dict[str, Any]:
    """Resolve one sample on DuckDB and on Spark; compare the identity maps row for row."""
    fig: dict[str, Any] = {"persons": persons}
    summary = generate(root / "brand", persons)
    init_project(root / "p", data_dir=relative_data_dir(root / "p", root / "brand" / "data"))
    project = load_project(root / "p")
    maps = {}
    for name, url in (("duckdb", "duckdb://"), ("spark", "pyspark://")):
        with Engine(url) as engine:
            t = time.perf_counter()
            load_imports(engine, project)
            fig[f"{name}_load_s"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            r = resolve(engine, project.identity, Clock(summary.reference_time))
            fig[f"{name}_resolve_s"] = round(time.perf_counter() - t, 2)
            fig[f"{name}_customers"] = r.customers
            imap = engine.table("identity_map").select(
                "id_type", "id_value", "customer_id", "quarantined"
            )
            maps[name] = imap.order_by(["id_type", "id_value"]).to_pyarrow()
    fig["identifiers"] = maps["duckdb"].num_rows
    fig["identical_clusters"] = maps["duckdb"].equals(maps["spark"])
    fig["spark_vs_duckdb_resolve"] = round(fig["spark_resolve_s"] / fig["duckdb_resolve_s"], 2)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--persons", type=int, default=100_000)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--edges", type=int, default=10_000_000)
    ap.add_argument("--no-portable", action="store_true")
    ap.add_argument(
        "--new-share",
        type=float,
        default=0.01,
        help="share of the newest events resolved incrementally after the rest (0.01 = 1%%)",
    )
    ap.add_argument(
        "--only-incremental",
        action="store_true",
        help="only the incremental figures (full vs incremental) at --small and --persons",
    )
    ap.add_argument(
        "--matching-persons",
        type=int,
        default=0,
        help="also match the CRM export of this many persons on its own (e.g. 1000000)",
    )
    ap.add_argument(
        "--spark", type=int, default=0, help="only compare DuckDB and Spark on this many persons"
    )
    ap.add_argument(
        "--accuracy-only",
        action="store_true",
        help="only accuracy (one full resolve) at --small and --persons, on brands of identity"
        " evidence only; at --small the full brand too, and whether both give one identity map",
    )
    ap.add_argument(
        "--memory-limit",
        type=memory_size,
        default="",
        help="with --accuracy-only: DuckDB's memory_limit for the runs (e.g. 6GB; it spills"
        " to disk beyond it)",
    )
    args = ap.parse_args()
    fig: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}",
    }
    if args.spark:
        with tempfile.TemporaryDirectory() as tmp:
            fig["spark"] = spark_vs_duckdb(args.spark, Path(tmp))
        print(json.dumps(fig))
        return
    if args.accuracy_only:
        scratch = os.environ.get("BENCH_TMP")  # e.g. /tmp/closedloop-bench: room for 1M
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            small_full = accuracy_only(args.small, Path(tmp) / "full", identity_only=False)
            fig[f"accuracy_{args.small}_full_brand"] = small_full
            print(json.dumps(small_full), flush=True)
            for persons in sorted({args.small, args.persons}):
                key = f"accuracy_{persons}"
                fig[key] = accuracy_only(
                    persons, Path(tmp) / str(persons), memory_limit=args.memory_limit
                )
                print(json.dumps(fig[key]), flush=True)
                if persons == args.small:
                    fig["identity_only_same_map"] = same_map(
                        Path(tmp) / "full" / "identity_map.parquet",
                        Path(tmp) / str(persons) / "identity_map.parquet",
                    )
                    print(json.dumps({"identity_only_same_map": fig["identity_only_same_map"]}))
                    shutil.rmtree(Path(tmp) / "full", ignore_errors=True)
                shutil.rmtree(Path(tmp) / str(persons), ignore_errors=True)
        print(json.dumps(fig))
        return
    if not args.only_incremental:
        with tempfile.TemporaryDirectory() as tmp:
            fig["components"] = components(args.edges, Path(tmp), not args.no_portable)
            print(json.dumps(fig["components"]), flush=True)
    sizes = sorted({args.small, args.persons})
    for persons in sizes:
        key = f"{'incremental' if args.only_incremental else 'accuracy'}_{persons}"
        with tempfile.TemporaryDirectory() as tmp:
            fig[key] = accuracy(persons, Path(tmp), args.new_share, score=not args.only_incremental)
            print(json.dumps(fig[key]), flush=True)
    if args.matching_persons:
        with tempfile.TemporaryDirectory() as tmp:
            key = f"matching_{args.matching_persons}"
            fig[key] = matching_at_scale(args.matching_persons, Path(tmp))
            print(json.dumps(fig[key]), flush=True)
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
