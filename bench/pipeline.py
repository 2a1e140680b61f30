"""Benchmark: the whole build on generated data, stage by stage, against bare DuckDB baselines.

Run as ``python bench/pipeline.py [--persons N]``. Baselines measured in the same run:

* load: DuckDB's own ``read_ndjson`` of the same event files into a table (no validation,
  dedup, failed-event keeping or source stamping) — the floor for the collect stage;
* RFM: a hand-written DuckDB SQL query of recency/frequency/monetary per resolved customer
  over the same event log. Not like for like: the portrait computes ~30 fields, the baseline
  only R, F and M; the ratio shows what the rest of the portrait costs.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb

from closedloop.core.clock import Clock
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.identity.resolve import resolve
from closedloop.pipeline import load_imports, project_fields
from closedloop.portrait.build import build_profiles
from closedloop.portrait.traits import build_traits
from closedloop.segments.audience import evaluate_segment
from closedloop.tags.build import build_tags

RFM_SQL = """
SELECT ec.customer_id,
       date_diff('day', max(e.timestamp)::DATE, $as_of::DATE) AS recency_days,
       count(DISTINCT e.order_id) AS orders,
       sum(e.revenue) AS revenue
FROM events e JOIN event_customers ec USING (message_id)
WHERE e.event = 'Order Completed' AND e.timestamp <= $as_of
GROUP BY 1
"""


def seconds(f: Callable[[], object]) -> float:
    t = time.perf_counter()
    f()
    return round(time.perf_counter() - t, 3)


def run(persons: int, root: Path) -> dict[str, float | int | str]:
    fig: dict[str, float | int | str] = {"persons": persons}
    t = time.perf_counter()
    summary = generate(root / "brand", persons)
    fig["generate_s"] = round(time.perf_counter() - t, 3)
    fig["messages"] = summary.messages
    init_project(root / "p", data_dir=relative_data_dir(root / "p", root / "brand" / "data"))
    project = load_project(root / "p")
    clock = Clock(summary.reference_time)
    fields = project_fields(project)
    with Engine(project.engine_url) as engine:
        stages: dict[str, Callable[[], object]] = {
            "load_s": lambda: load_imports(engine, project),
            "identity_s": lambda: resolve(engine, project.identity, clock),
            "profiles_s": lambda: build_profiles(engine, clock),
            "traits_s": lambda: build_traits(engine, project.traits, clock),
            "tags_s": lambda: build_tags(engine, project.tags, clock, root=project.root),
            "segments_s": lambda: [
                evaluate_segment(engine, s, fields, clock) for s in project.segments.values()
            ],
        }
        for name, step in stages.items():
            fig[name] = seconds(step)
        fig["build_s"] = round(sum(float(fig[k]) for k in stages), 3)
        fig["events"] = engine.count("events")
        fig["customers"] = engine.count("customers")
        fig["profiles_warm_s"] = seconds(lambda: build_profiles(engine, clock))
        con = engine.con.con
        fig["rfm_sql_baseline_s"] = seconds(
            lambda: con.execute(RFM_SQL, {"as_of": clock.now()}).fetchall()
        )
    files = [str(p) for p in sorted((root / "brand" / "data" / "events").glob("*/*.jsonl"))]
    bare = duckdb.connect(str(root / "bare.duckdb"))
    fig["load_baseline_s"] = seconds(
        lambda: bare.execute(
            "CREATE TABLE ev AS SELECT * FROM read_ndjson($files, union_by_name=true)",
            {"files": files},
        )
    )
    bare.close()
    fig["load_ratio"] = round(float(fig["load_s"]) / float(fig["load_baseline_s"]), 2)
    fig["profiles_vs_rfm_sql_ratio"] = round(
        float(fig["profiles_warm_s"]) / float(fig["rfm_sql_baseline_s"]), 2
    )
    fig["events_per_s_build"] = round(int(fig["events"]) / float(fig["build_s"]))
    fig["machine"] = f"{platform.machine()}, {platform.python_version()}"
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--persons", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fig = run(args.persons, Path(tmp))
    for k, v in fig.items():
        print(f"{k:>28}: {v}")
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
