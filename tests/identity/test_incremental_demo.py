"""Incremental resolution on the demo brand (WeChat external ids, CRM records, POS phones)
equals a full run: the newest events are held back, resolved afterwards incrementally, and a
forced full run must then change nothing."""

from __future__ import annotations

from pathlib import Path

import ibis
import pytest

from closedloop.core.clock import Clock
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.demo.generator import REFERENCE_TIME, generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.identity.resolve import resolve
from closedloop.pipeline import load_imports

TABLES = (
    "identity_map",
    "customers",
    "customer_aliases",
    "event_customers",
    "identity_edges",
    "identity_dropped_links",
    "identifier_issues",
    "identity_suspects",
    "identity_clusters",
    "identity_occurrences",
)


@pytest.mark.slow  # ~9 CPU-s; 45 s wall on a loaded machine
def test_demo_brand_incremental_equals_full(tmp_path: Path) -> None:
    generate(tmp_path / "brand", 1_000, identity_only=True)
    init_project(
        tmp_path / "p", data_dir=relative_data_dir(tmp_path / "p", tmp_path / "brand" / "data")
    )
    project = load_project(tmp_path / "p")
    clock = Clock(REFERENCE_TIME)
    with Engine(project.engine_url) as engine:
        load_imports(engine, project)
        ev = engine.table("events")
        # The newest WeChat messages among others: their external ids stay logged meanwhile.
        newest = ev.order_by([ibis.desc(ev.timestamp), ev.message_id]).limit(400)
        held = newest.to_pyarrow()
        assert set(held["source"].to_pylist()) >= {"miniprogram", "official_account"}
        keep = ev.anti_join(newest.select("message_id"), "message_id")
        engine.replace("events", engine.scratch("t_kept", keep))
        resolve(engine, project.identity, clock)
        engine.append("events", held)
        inc = resolve(engine, project.identity, clock)
        assert inc.path == "incremental" and inc.new_messages == 400
        snaps = {}
        for name in TABLES:
            snaps[name] = engine.table(name).to_pyarrow()
        full = resolve(engine, project.identity, clock, incremental=False)
        assert not full.changed
        for name, before in snaps.items():
            now = engine.table(name)
            cols = sorted(now.columns)
            a = (
                now.select(*cols)
                .to_pyarrow()
                .sort_by([(c, "ascending") for c in cols if c != "ts"])
            )
            b = before.select(cols).sort_by([(c, "ascending") for c in cols if c != "ts"])
            assert a.equals(b), name
