"""``closedloop refresh``: bring the portrait, traits, tags and segments up to now, cheaply.

Meant to run on a schedule (cron, a systemd timer): it loads any new import files, resolves
identities, and recomputes the portrait and traits only for the customers whose events,
attribution or windows changed since the last build; everything that ages with the clock
(recency, lifecycle, windowed traits, segment membership) rolls forward even with no new
events.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from closedloop.cli.common import ProjectDir, console, fail, project_or_exit
from closedloop.core.errors import ClosedloopError


def refresh(
    project: ProjectDir = Path("."),
    full: Annotated[bool, typer.Option("--full", help="rebuild every customer")] = False,
    load: Annotated[
        bool, typer.Option("--load/--no-load", help="load new import files first")
    ] = True,
    as_of: Annotated[
        datetime | None,
        typer.Option("--as-of", help="the clock (UTC) to evaluate windows against; default now"),
    ] = None,
) -> None:
    """Refresh: recompute only the customers whose events or windows changed since the last build."""
    from closedloop.core.clock import Clock
    from closedloop.core.engine import Engine
    from closedloop.pipeline import build

    p = project_or_exit(project)
    clock = Clock(as_of.replace(tzinfo=as_of.tzinfo or UTC) if as_of else None)
    try:
        with Engine(p.engine_url) as engine:
            report = build(engine, p, clock=clock, load=load, incremental=not full)
    except ClosedloopError as e:
        raise fail(e) from None
    for name, loaded in report.loads.items():
        if loaded.accepted:
            console.print(f"{name}: {loaded.accepted:,} new events")
    r = report.refresh
    if r is not None:
        console.print(
            f"portrait ({r.mode}): {r.recomputed:,} of {r.customers:,} customers recomputed "
            f"in {r.seconds:.2f} s; {r.traits:,} trait values"
        )
    for name, s in report.segments.items():
        console.print(f"segment {name}: {s.size:,} (+{s.entered:,} / -{s.exited:,})")


def register(app: typer.Typer) -> None:
    app.command(name="refresh")(refresh)
