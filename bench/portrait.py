"""Benchmark: portrait, 50 tags and 20 segments on DuckDB; RFM against hand-written SQL; lookups.

Run as ``python bench/portrait.py [--persons N]`` (default 1,000,000). Steps:

1. generate the demo brand, load it and resolve identities (not timed here: that is
   ``bench/pipeline.py``'s subject). The loaded warehouse is cached under ``--cache`` per
   person count, so re-runs skip the ~100 s generation and the load; each run works on a copy.
2. the full build, timed per step: profiles, computed traits, 50 tags (the demo's one plus 49
   synthetic ones of every computed type: rules, ranges, percentiles, top-N, first/last, RFM)
   and 20 segments (the demo's three plus 17 synthetic ones: fields, tags, event counts with
   windows and property filters, sequences, and references to other segments);
3. RFM like for like, in the same run: closedloop's ``rfm_expr`` (Ibis) beside a hand-written
   DuckDB SQL query giving the same columns — recency_days, orders, revenue and the three
   1–5 scores — both fetched as Arrow; the two results are checked to be equal (both add
   revenue exactly, as decimals: a float sum splits quintile ties differently by the order
   threads add rows in — 12 of 549,095 m_scores at 1M);
4. profile lookup by identifier: a random email or phone → customer (``identity_map``) →
   profile row, 1,000 times; p50 and p99 through ``ProfileLookup`` (the SQLite serving store
   a build ends with; the cost of writing it is timed too), beside the baseline through
   Ibis and as one prepared DuckDB statement on the warehouse;
5. with ``--refresh 0.01``: an incremental refresh after 1% new events against a full build
   of profiles and traits, on another copy of the cached warehouse (``bench/refresh.py``'s
   ``measure_refresh``; figures prefixed ``refresh_``, ratio ``refresh_incremental_vs_full_*``).

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from closedloop.core.clock import Clock
from closedloop.core.definitions import SegmentDef, TagDef, load_project
from closedloop.core.engine import Engine
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.identity.resolve import resolve
from closedloop.pipeline import load_imports, project_fields, segment_order
from closedloop.portrait.build import build_profiles, rfm_expr
from closedloop.portrait.traits import build_traits
from closedloop.segments.audience import Fields, check_segment, evaluate_segments
from closedloop.tags.check import check_tag
from closedloop.tags.rules import build_tags

# The same columns and scores as closedloop's RFM (portrait.lifecycle.score): each score is
# 1 + floor(5 * percent_rank), capped at 5, among customers with orders; recent = 5.
RFM_SQL = """
WITH o AS (
  SELECT ec.customer_id,
         date_diff('day', max(e.timestamp)::DATE, $as_of::DATE)::INTEGER AS recency_days,
         count(DISTINCT e.order_id) AS orders,
         coalesce(sum(e.revenue::DECIMAL(38, 6))::DOUBLE, 0.0) AS revenue  -- exact, as ours
  FROM events e JOIN event_customers ec USING (message_id)
  WHERE e.event = 'Order Completed' AND e.timestamp <= $as_of
  GROUP BY 1
  HAVING count(DISTINCT e.order_id) > 0
)
SELECT customer_id, recency_days, orders, revenue,
       least(floor(percent_rank() OVER (ORDER BY recency_days DESC) * 5)::INTEGER + 1, 5)
         AS r_score,
       least(floor(percent_rank() OVER (ORDER BY orders) * 5)::INTEGER + 1, 5) AS f_score,
       least(floor(percent_rank() OVER (ORDER BY revenue) * 5)::INTEGER + 1, 5) AS m_score
FROM o
"""
LOOKUP_SQL = """
SELECT p.* FROM profiles p
WHERE p.customer_id = (
  SELECT customer_id FROM identity_map
  WHERE id_value = $1 AND id_type = $2 AND NOT quarantined
)
"""
TAGS = 50  # tags in the build, the template's included
RFM_COLUMNS = ["customer_id", "recency_days", "orders", "revenue", "r_score", "f_score", "m_score"]

NUMERIC = [
    "revenue",
    "orders",
    "avg_order_value",
    "events",
    "product_views",
    "cart_adds",
    "favourites",
    "searches",
    "points",
    "recency_days",
    "days_since_first",
    "order_interval_days",
    "coupon_share",
    "network_first",
    "age",
]
CATEGORIES = ["milk_tea", "fruit_tea", "pure_tea", "coffee", "skincare", "snacks"]


def synthetic_tags() -> list[dict[str, Any]]:
    """49 tags of the computed types, over the portrait and the events."""
    tags: list[dict[str, Any]] = []
    for f in NUMERIC:  # 15 percentile buckets
        tags.append(
            {
                "name": f"pct_{f}",
                "type": "bucket",
                "field": f,
                "percentiles": [0.25, 0.5, 0.75],
                "labels": ["q1", "q2", "q3", "q4"],
            }
        )
    for f, cuts in [  # 8 range buckets
        ("revenue", [100, 500, 2000]),
        ("orders", [1, 3, 10]),
        ("avg_order_value", [20, 50, 150]),
        ("events", [10, 50, 200]),
        ("recency_days", [30, 90, 180]),
        ("product_views", [5, 20, 100]),
        ("points", [100, 1000, 5000]),
        ("age", [25, 35, 50]),
    ]:
        bounds = [None, *cuts, None]
        tags.append(
            {
                "name": f"range_{f}",
                "type": "bucket",
                "field": f,
                "ranges": [
                    {"value": f"b{i}", "min": lo, "max": hi}
                    for i, (lo, hi) in enumerate(itertools.pairwise(bounds))
                ],
            }
        )
    rules = [  # 12 rule tags
        ("is_buyer", {"trait": "orders", "op": "gte", "value": 1}),
        ("is_repeat", {"trait": "orders", "op": "gte", "value": 2}),
        ("big_spender", {"trait": "revenue", "op": "gte", "value": 1000}),
        ("coupon_lover", {"trait": "coupon_share", "op": "gte", "value": 0.5}),
        (
            "browser_only",
            {
                "all": [
                    {"trait": "orders", "op": "eq", "value": 0},
                    {"trait": "product_views", "op": "gte", "value": 3},
                ]
            },
        ),
        (
            "reachable_email",
            {
                "all": [
                    {"trait": "email", "op": "not_null"},
                    {"trait": "email_opt_out", "op": "eq", "value": False},
                ]
            },
        ),
        (
            "reachable_sms",
            {
                "all": [
                    {"trait": "phone", "op": "not_null"},
                    {"trait": "sms_opt_out", "op": "eq", "value": False},
                ]
            },
        ),
        ("consented", {"trait": "consent_marketing", "op": "eq", "value": True}),
        (
            "tea_fan",
            {"trait": "top_category", "op": "in", "value": ["milk_tea", "fruit_tea", "pure_tea"]},
        ),
        ("referrer", {"trait": "referrals_made", "op": "gte", "value": 1}),
        ("night_owl", {"trait": "active_hour", "op": "gte", "value": 21}),
        ("lapsing", {"trait": "lifecycle_stage", "op": "in", "value": ["silent", "churn_risk"]}),
    ]
    for name, cond in rules:
        tags.append({"name": name, "rules": [{"value": "yes", "when": cond}], "default": "no"})
    for col in ["category", "channel", "source"]:  # 6 top-N
        tags.append({"name": f"top3_{col}", "type": "top_n", "column": col, "n": 3})
        tags.append(
            {"name": f"top_{col}_90d", "type": "top_n", "column": col, "n": 2, "window_days": 90}
        )
    for kind in ["first", "last"]:  # 6 first/last
        for col in ["channel", "source", "category"]:
            tags.append({"name": f"{kind}_{col}", "type": kind, "column": col})
    tags.append({"name": "rfm_scores", "type": "rfm", "rfm": "scores"})  # 2 RFM
    tags.append({"name": "rfm_named", "type": "rfm", "rfm": "group"})
    return tags


def synthetic_segments() -> list[dict[str, Any]]:
    """17 segments: fields, tags, event counts, sequences and segment references."""
    order = "Order Completed"
    tea = {"property": "category", "op": "in", "value": ["milk_tea", "fruit_tea", "pure_tea"]}
    raw: list[tuple[str, dict[str, Any]]] = [
        (
            "s_vip",
            {
                "all": [
                    {"trait": "revenue", "op": "gte", "value": 2000},
                    {"trait": "lifecycle_stage", "op": "eq", "value": "active"},
                ]
            },
        ),
        ("s_new_buyers", {"trait": "lifecycle_stage", "op": "eq", "value": "new"}),
        ("s_churned", {"trait": "lifecycle_stage", "op": "in", "value": ["churned", "churn_risk"]}),
        (
            "s_young_shanghai",
            {
                "all": [
                    {"trait": "age_band", "op": "in", "value": ["18-24", "25-34"]},
                    {"trait": "city", "op": "eq", "value": "Shanghai"},
                ]
            },
        ),
        ("s_top_quartile", {"trait": "pct_revenue", "op": "eq", "value": "q4"}),
        (
            "s_coupon_repeat",
            {
                "all": [
                    {"trait": "coupon_lover", "op": "eq", "value": "yes"},
                    {"trait": "is_repeat", "op": "eq", "value": "yes"},
                ]
            },
        ),
        ("s_tea_30d", {"event": order, "where": [tea], "within_days": 30}),
        (
            "s_three_orders_90d",
            {"event": order, "count": {"op": "gte", "value": 3}, "within_days": 90},
        ),
        (
            "s_no_order_60d",
            {
                "all": [
                    {"trait": "orders", "op": "gte", "value": 1},
                    {"event": order, "count": {"op": "eq", "value": 0}, "within_days": 60},
                ]
            },
        ),
        (
            "s_viewers_no_buy",
            {
                "all": [
                    {
                        "event": "Product Viewed",
                        "count": {"op": "gte", "value": 5},
                        "within_days": 30,
                    },
                    {"event": order, "count": {"op": "eq", "value": 0}, "within_days": 30},
                ]
            },
        ),
        (
            "s_big_basket",
            {
                "event": order,
                "where": [{"property": "revenue", "op": "gte", "value": 100}],
                "within_days": 180,
            },
        ),
        (
            "s_view_then_buy",
            {
                "sequence": [{"event": "Product Viewed"}, {"event": order}],
                "within": "1d",
                "within_days": 90,
            },
        ),
        (
            "s_cart_then_buy",
            {
                "sequence": [{"event": "Product Added"}, {"event": order}],
                "within": "2h",
                "within_days": 90,
            },
        ),
        (
            "s_abandoned_cart",
            {
                "sequence": [{"event": "Product Added"}, {"event": order, "absent": True}],
                "within": "1d",
                "within_days": 30,
            },
        ),
        (
            "s_view_cart_buy_tea",
            {
                "sequence": [
                    {"event": "Product Viewed", "where": [tea]},
                    {"event": "Product Added"},
                    {"event": order, "where": [tea]},
                ],
                "within": "3d",
                "within_days": 180,
            },
        ),
        (
            "s_vip_reachable",
            {
                "all": [
                    {"in_segment": "s_vip"},
                    {"trait": "reachable_email", "op": "eq", "value": "yes"},
                ]
            },
        ),
        ("s_winback", {"any": [{"in_segment": "s_churned"}, {"in_segment": "s_no_order_60d"}]}),
    ]
    return [{"name": n, "where": w} for n, w in raw]


def seconds(f: Callable[[], object], cpu: dict[str, float] | None = None, key: str = "") -> float:
    """Wall seconds of ``f()``; its CPU seconds (all threads of this process) into ``cpu``.

    The CPU figure is what to compare between runs on a shared machine: wall time there
    depends on what else runs (the load average is printed beside it).
    """
    t, c = time.perf_counter(), time.process_time()
    f()
    if cpu is not None:
        cpu[key] = round(time.process_time() - c, 3)
    return round(time.perf_counter() - t, 3)


def prepare(persons: int, cache: Path) -> tuple[Path, float | None]:
    """The project folder of a loaded, resolved warehouse for ``persons`` (cached)."""
    root = cache / f"portrait-{persons}"
    done = root / "READY"
    if done.exists():
        return root / "p", None
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    summary = generate(root / "brand", persons)
    init_project(root / "p", data_dir=relative_data_dir(root / "p", root / "brand" / "data"))
    project = load_project(root / "p")
    clock = Clock(summary.reference_time)
    with Engine(project.engine_url) as engine:
        load_imports(engine, project)
        resolve(engine, project.identity, clock)
    done.write_text(summary.reference_time.isoformat())
    return root / "p", round(time.perf_counter() - t, 1)


def bench_project(project: Any) -> tuple[Any, list[SegmentDef], Fields]:
    """``project`` (a ``Project``) with the benchmark's 50 tags and 20 segments (checked),
    its segments in run order, and the fields their conditions read.

    ``bench/refresh.py`` builds the same definitions for its whole-chain figures.
    """
    tags = dict(project.tags)
    extra = [t for t in synthetic_tags() if t["name"] not in tags]
    while len(tags) + len(extra) > TAGS:  # the template grows: drop percentile buckets first
        drop = next(t for t in reversed(extra) if t["name"].startswith("pct_"))
        extra.remove(drop)
    for raw in extra:
        tags[raw["name"]] = TagDef.model_validate(raw)
    from closedloop.portrait.tables import PROFILES

    problems = [p for t in tags.values() for p in check_tag(t, set(PROFILES.columns))]
    assert not problems, problems
    segs = dict(project.segments)
    for raw in synthetic_segments():
        segs[raw["name"]] = SegmentDef.model_validate(raw)
    project = project.model_copy(update={"tags": tags, "segments": segs})
    ordered, problems = segment_order(project)
    base = project_fields(project)
    fields = Fields(tags=tuple(tags), traits=base.traits, segments=tuple(segs))
    problems += [p for s in ordered for p in check_segment(s, fields)]
    assert not problems, problems
    return project, ordered, fields


def run(persons: int, cache: Path, work: Path, refresh_share: float = 0.0) -> dict[str, Any]:
    fig: dict[str, Any] = {"persons": persons}
    src, prepared = prepare(persons, cache)
    if prepared is not None:
        fig["prepare_s"] = prepared  # generate + load + identity, once per cache
    from datetime import datetime

    reference = datetime.fromisoformat((src.parent / "READY").read_text())
    shutil.copytree(src, work / "p")
    project = load_project(work / "p")
    clock = Clock(reference)
    project, ordered, fields = bench_project(project)
    tags, segs = project.tags, project.segments
    fig["tags"] = len(tags)
    fig["segments"] = len(segs)
    with Engine(project.engine_url) as engine:
        fig["events"] = engine.count("events")
        fig["customers"] = engine.count("customers")
        cpu: dict[str, float] = {}
        fig["load_before"] = round(os.getloadavg()[0], 1)
        fig["profiles_s"] = seconds(lambda: build_profiles(engine, clock), cpu, "profiles")
        fig["traits_s"] = seconds(
            lambda: build_traits(engine, project.traits, clock), cpu, "traits"
        )
        fig["tags_s"] = seconds(
            lambda: build_tags(engine, tags, clock, root=work / "p"), cpu, "tags"
        )
        results: dict[str, Any] = {}
        fig["segments_s"] = seconds(
            lambda: results.update(evaluate_segments(engine, ordered, fields, clock)),
            cpu,
            "segments",
        )
        steps = ("profiles_s", "traits_s", "tags_s", "segments_s")
        fig["build_s"] = round(sum(fig[k] for k in steps), 3)
        fig["build_cpu_s"] = round(sum(cpu.values()), 3)
        fig["cpu_s"] = cpu
        fig["load_after"] = round(os.getloadavg()[0], 1)
        fig["cores"] = os.cpu_count()
        fig["segment_sizes"] = {n: r.size for n, r in sorted(results.items())}
        fig.update(rfm(engine, clock.now()))
        fig.update(lookups(engine))
        fig.update(served_lookups(engine, project))
        # how many times faster the served p99 is than the prepared statement's (baseline)
        fig["lookup_prepared_over_served_p99"] = round(
            fig["lookup_prepared_p99_ms"] / max(fig["lookup_served_p99_ms"], 0.01), 1
        )
    if refresh_share:
        fig.update(refresh_figures(src, work, reference, refresh_share))
    fig["machine"] = f"{platform.machine()}, {platform.python_version()}"
    return fig


def refresh_figures(src: Path, work: Path, reference: Any, share: float) -> dict[str, Any]:
    """``bench/refresh.py``'s figures on a fresh copy of the cached warehouse, as refresh_*:
    the newest ``share`` of events held back, an incremental refresh after they load timed
    against a full build of profiles and traits in the same run, results checked equal."""
    from refresh import measure_refresh  # bench/refresh.py, beside this script

    shutil.copytree(src, work / "r")
    project = load_project(work / "r")
    with Engine(project.engine_url) as engine:
        fig = measure_refresh(engine, project, reference, share)
    shutil.rmtree(work / "r", ignore_errors=True)
    return {f"refresh_{k}": v for k, v in fig.items()}


def rfm(engine: Engine, as_of: Any, repeats: int = 5) -> dict[str, Any]:
    """closedloop's RFM beside the SQL, alternating, median of ``repeats``; results compared."""
    con = engine.con.con
    expr = rfm_expr(engine, as_of).select(*RFM_COLUMNS)
    ours: list[float] = []
    theirs: list[float] = []
    a = b = None
    for _ in range(repeats):
        t = time.perf_counter()
        a = expr.to_pyarrow()
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = con.execute(RFM_SQL, {"as_of": as_of}).to_arrow_table()
        theirs.append(time.perf_counter() - t)
    assert a is not None and b is not None
    a, b = a.sort_by("customer_id"), b.sort_by("customer_id")
    same = a.num_rows == b.num_rows and all(
        a.column(c).to_pylist() == b.column(c).to_pylist() for c in RFM_COLUMNS if c != "revenue"
    )
    rev_a, rev_b = a.column("revenue").to_pylist(), b.column("revenue").to_pylist()
    same = same and all(
        abs(x - y) <= 1e-6 * max(1.0, abs(y)) for x, y in zip(rev_a, rev_b, strict=True)
    )
    # The profile build's scores are the same numbers (customers with orders only).
    p = engine.table("profiles")
    p = p.filter(p.orders > 0).select(*RFM_COLUMNS).order_by("customer_id").to_pyarrow()
    same_as_profiles = all(
        p.column(c).to_pylist() == a.column(c).to_pylist()
        for c in ("customer_id", "r_score", "f_score", "m_score")
    )
    o, s = statistics.median(ours), statistics.median(theirs)
    return {
        "rfm_customers": a.num_rows,
        "rfm_closedloop_s": round(o, 4),
        "rfm_sql_s": round(s, 4),
        "rfm_ratio": round(o / s, 2),
        "rfm_equal": same,
        "rfm_equal_to_profiles": same_as_profiles,
    }


def lookups(engine: Engine, n: int = 1000, seed: int = 1) -> dict[str, Any]:
    """Identifier → customer → profile row, through Ibis, ``n`` random identifiers."""
    m = engine.table("identity_map")
    sample = (
        m.filter(m.id_type.isin(["email", "phone"]) & ~m.quarantined)
        .select("id_type", "id_value")
        .to_pyarrow()
        .to_pylist()
    )
    rng = random.Random(seed)
    picks = [sample[rng.randrange(len(sample))] for _ in range(n)]
    profiles = engine.table("profiles")
    times: list[float] = []
    found = 0
    for ident in picks:
        t = time.perf_counter()
        hit = m.filter((m.id_type == ident["id_type"]) & (m.id_value == ident["id_value"]))
        row = profiles.semi_join(hit.select("customer_id"), "customer_id").to_pyarrow().to_pylist()
        times.append(time.perf_counter() - t)
        found += bool(row)
    # The same lookup as one prepared DuckDB statement with bound values: what a serving path
    # needs, since Ibis builds and compiles a new expression per call, which costs more than
    # the lookup itself. (DuckDB 1.5 did not use ART indexes on these columns for it here,
    # with bound or literal values, so none are created: both are filtered scans.)
    con = engine.con.con
    prepared: list[float] = []
    found_prepared = 0
    for ident in picks:
        t = time.perf_counter()
        rows = con.execute(LOOKUP_SQL, [ident["id_value"], ident["id_type"]]).fetchall()
        prepared.append(time.perf_counter() - t)
        found_prepared += bool(rows)
    return {
        "lookups": n,
        "lookup_found": found,
        "lookup_ibis_p50_ms": percentile(times, 0.5),
        "lookup_ibis_p99_ms": percentile(times, 0.99),
        "lookup_found_prepared": found_prepared,
        "lookup_prepared_p50_ms": percentile(prepared, 0.5),
        "lookup_prepared_p99_ms": percentile(prepared, 0.99),
    }


def served_lookups(engine: Engine, project: Any, n: int = 1000, seed: int = 1) -> dict[str, Any]:
    """The same lookups through ``ProfileLookup`` (the serving store a build ends with).

    The figures above (Ibis, one prepared DuckDB statement) are the baseline; writing the
    store (``materialise``) is timed as its cost, and the store's answers are checked against
    the warehouse's for the sampled identifiers.
    """
    from closedloop.portrait.lookup import ProfileLookup, materialise

    m = engine.table("identity_map")
    sample = (
        m.filter(m.id_type.isin(["email", "phone"]) & ~m.quarantined)
        .select("id_type", "id_value")
        .to_pyarrow()
        .to_pylist()
    )
    rng = random.Random(seed)
    picks = [sample[rng.randrange(len(sample))] for _ in range(n)]
    t = time.perf_counter()
    written = materialise(engine)
    materialise_s = time.perf_counter() - t
    assert written is not None
    t = time.perf_counter()
    lookup = ProfileLookup.open(engine, project.identity)
    open_s = time.perf_counter() - t
    assert lookup.source == "serving"
    times: list[float] = []
    found = 0
    for ident in picks:
        t = time.perf_counter()
        hit = lookup.find(ident["id_value"], ident["id_type"])
        times.append(time.perf_counter() - t)
        found += hit is not None and hit.profile is not None
    untyped: list[float] = []
    for ident in picks:
        t = time.perf_counter()
        lookup.find(ident["id_value"])
        untyped.append(time.perf_counter() - t)
    warehouse = ProfileLookup.open(engine, project.identity, path=written.path.with_suffix(".none"))
    same = all(
        lookup.profile(i["id_value"], i["id_type"])
        == warehouse.profile(i["id_value"], i["id_type"])
        for i in picks[:50]
    )
    lookup.close()
    return {
        "lookup_served_found": found,
        "lookup_served_p50_ms": percentile(times, 0.5),
        "lookup_served_p99_ms": percentile(times, 0.99),
        "lookup_served_untyped_p99_ms": percentile(untyped, 0.99),
        "lookup_materialise_s": round(materialise_s, 2),
        "lookup_open_s": round(open_s, 3),
        "lookup_store_mb": round(written.bytes / 1e6, 1),
        "lookup_served_equal": same,
    }


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return round(1000 * s[min(len(s) - 1, int(q * len(s)))], 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--persons", type=int, default=1_000_000)
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "closedloop-bench",
        help="where the loaded warehouse per person count is kept between runs",
    )
    ap.add_argument(
        "--refresh",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="also time an incremental refresh after SHARE (e.g. 0.01) new events against a "
        "full build (bench/refresh.py's figures, prefixed refresh_)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fig = run(args.persons, args.cache, Path(tmp), args.refresh)
    for k, v in fig.items():
        print(f"{k:>24}: {v}")
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
