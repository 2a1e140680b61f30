"""``closedloop campaign dry-run|run`` and ``closedloop report campaign``."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from closedloop.cli.common import ProjectDir, console, fail, project_or_exit
from closedloop.core.definitions import CampaignDef, Project
from closedloop.core.errors import ClosedloopError

campaign_app = typer.Typer(
    help="Campaigns: dry-run on the current audience, or run for real.", no_args_is_help=True
)
report_app = typer.Typer(help="Reports: HTML with charts and PNGs.", no_args_is_help=True)

AsOf = Annotated[
    datetime | None, typer.Option("--as-of", help="decide as of this time (UTC); default now")
]
Occasion = Annotated[str | None, typer.Option(help="occasion key (default: the decision date)")]


def _campaign(project: Project, name: str) -> CampaignDef:
    if name not in project.campaigns:
        raise fail(
            ClosedloopError(f"no campaign {name!r}; known: {', '.join(sorted(project.campaigns))}")
        )
    return project.campaigns[name]


def _decide(
    project_dir: Path, name: str, occasion: str | None, as_of: datetime | None, dry: bool
) -> None:
    from closedloop.activate.campaign import run_campaign
    from closedloop.core.clock import Clock
    from closedloop.core.engine import Engine

    p = project_or_exit(project_dir)
    c = _campaign(p, name)
    clock = Clock(as_of)
    key = occasion or clock.now().date().isoformat()
    with Engine(p.engine_url) as engine:
        try:
            run = run_campaign(
                engine,
                c,
                outbox_dir=p.path(p.config.outbox),
                occasion=key,
                clock=clock,
                dry_run=dry,
            )
        except ClosedloopError as e:
            raise fail(e) from None
    verb = "would be" if dry else "were"
    console.print(
        f"campaign {name}, occasion {key}: audience {run.audience:,} ({run.already_decided:,} already decided)"
    )
    console.print(
        f"  {run.sent:,} {verb} messaged ({run.postponed:,} postponed by quiet hours), "
        f"{run.held_out:,} held out, {run.suppressed:,} stopped by the contact policy"
    )
    for reason, n in sorted((run.reasons or {}).items(), key=lambda x: -x[1]):
        console.print(f"    {reason}: {n:,}")
    if dry and run.decisions is not None and run.decisions.num_rows:
        rows = run.decisions.select(
            ["customer_id", "group", "status", "reason", "send_at"]
        ).to_pylist()
        groups = Counter((r["group"], r["status"]) for r in rows)
        table = Table("group", "status", "people")
        for (g, s), n in sorted(groups.items(), key=lambda x: (str(x[0][0]), str(x[0][1]))):
            table.add_row(str(g or "—"), str(s), f"{n:,}")
        console.print(table)
    if not dry and run.outbox is not None:
        console.print(f"  outbox: {run.outbox}")


@campaign_app.command("dry-run")
def dry_run(
    name: str, project: ProjectDir = Path("."), occasion: Occasion = None, as_of: AsOf = None
) -> None:
    """Who would enter, who each policy would stop and why, and each group — nothing is sent."""
    _decide(project, name, occasion, as_of, dry=True)


@campaign_app.command("run")
def run(
    name: str, project: ProjectDir = Path("."), occasion: Occasion = None, as_of: AsOf = None
) -> None:
    """Decide and write this occasion's messages (idempotent: a re-run sends nothing twice)."""
    _decide(project, name, occasion, as_of, dry=False)


@report_app.command("campaign")
def report_campaign(
    name: str,
    occasion: Annotated[str, typer.Option(help="the occasion to measure")],
    project: ProjectDir = Path("."),
    out: Annotated[
        Path | None, typer.Option(help="report folder (default: the project's reports/)")
    ] = None,
    as_of: AsOf = None,
) -> None:
    """Intent-to-treat conversions and lift with 95% CIs and the sample-ratio check, as HTML and PNG."""
    from closedloop.core.clock import Clock
    from closedloop.core.engine import Engine
    from closedloop.measure.campaign import measure_campaign
    from closedloop.measure.report import Section, campaign_rows, lift_chart, write_report

    p = project_or_exit(project)
    c = _campaign(p, name)
    with Engine(p.engine_url) as engine:
        try:
            o = measure_campaign(engine, c, occasion, Clock(as_of))
        except (ClosedloopError, ValueError) as e:
            raise fail(ClosedloopError(f"cannot measure {name} / {occasion}: {e}")) from None
    rows = campaign_rows(o)
    folder = out or p.path(p.config.reports) / f"{name}-{occasion}"
    path = write_report(
        folder,
        f"Campaign {name}",
        f"occasion {occasion}, goal {c.goal.event} within {c.goal.window_days} days",
        [Section("Outcome", rows=rows, charts=[lift_chart(o)])],
    )
    for k, v in rows:
        console.print(f"{k:>30}: {v}")
    console.print(f"report: {path}")


def register(app: typer.Typer) -> None:
    app.add_typer(campaign_app, name="campaign")
    app.add_typer(report_app, name="report")
