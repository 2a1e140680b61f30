"""The ``closedloop`` command line: a thin face over the stages (Typer + Rich)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from closedloop.cli import (
    account_cmds,
    api_cmds,
    campaign_cmds,
    collect_cmds,
    identity_cmds,
    journey_cmds,
    portrait_cmds,
    predict_cmds,
    profile_cmds,
    report_cmds,
    segment_cmds,
    tag_cmds,
)
from closedloop.cli.common import ProjectDir, console, fail, project_or_exit
from closedloop.core.errors import ClosedloopError, DefinitionError

app = typer.Typer(
    name="closedloop",
    help="closedloop — an open-source Customer Data Platform: collect, unify, portray, segment, activate, measure.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="folder to create the project in")],
) -> None:
    """Scaffold a project: sources with write keys, identity rules, a tag, segments, a campaign."""
    from closedloop.demo.project import init_project

    try:
        files = init_project(directory)
    except ClosedloopError as e:
        raise fail(e) from None
    console.print(
        f"created {len(files)} files in {directory}; next: `closedloop validate -p {directory}`"
    )


@app.command()
def validate(project: ProjectDir = Path(".")) -> None:
    """Check every definition (schema, references, fields, templates) without writing anything."""
    from closedloop.activate.journeys import check_journeys
    from closedloop.pipeline import check_project

    p = project_or_exit(project)
    problems = check_project(p) + check_journeys(p)
    if problems:
        raise fail(DefinitionError(problems))
    console.print(
        f"[green]ok[/green]: {len(p.config.sources)} sources, {len(p.identity.types)} identifier types, "
        f"{len(p.traits)} traits, {len(p.tags)} tags, {len(p.segments)} segments, {len(p.campaigns)} campaigns"
    )


@app.command()
def sources(
    project: ProjectDir = Path("."), as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """List the project's sources with their channel, data class and write key."""
    p = project_or_exit(project)
    rows = [s.model_dump(mode="json") for s in p.config.sources]
    if as_json:  # plain text: rich would wrap long values at the terminal's width
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    t = Table("source", "channel", "data class", "write key")
    # A write key is there to be copied: never cut or wrapped, whatever the terminal's width.
    t.columns[3].no_wrap = True
    t.columns[3].min_width = max(len(s.write_key) for s in p.config.sources)
    for s in p.config.sources:
        t.add_row(s.name, s.channel, s.data_class.value, s.write_key)
    console.print(t)


@app.command()
def generate(
    persons: Annotated[int, typer.Option(min=1, max=1_000_000, help="number of persons")] = 10_000,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("brand"),
    seed: Annotated[int, typer.Option(help="random seed (same seed, same data)")] = 7,
    accounts: Annotated[
        int, typer.Option(min=0, help="B2B accounts whose contacts are members (default none)")
    ] = 0,
) -> None:
    """Generate the synthetic brand: events, POS orders, CRM members, and the ground truth apart."""
    from rich.progress import Progress

    from closedloop.demo.generator import generate as run

    with Progress(console=console) as progress:
        task = progress.add_task("generating", total=persons)
        s = run(
            out,
            persons,
            seed=seed,
            progress=lambda n: progress.advance(task, n),
            accounts=accounts,
        )
    console.print(
        f"{s.persons:,} persons, {s.messages:,} messages, {s.order_rows:,} POS orders, "
        f"{s.crm_rows:,} CRM rows → {out}/data (truth in {out}/truth)"
    )


@app.command()
def build(project: ProjectDir = Path(".")) -> None:
    """Run the pipeline on a project: load imports, resolve identities, portrait, tags, segments."""
    from rich.progress import Progress, TaskID

    from closedloop.core.engine import Engine
    from closedloop.pipeline import build as run

    p = project_or_exit(project)
    try:
        with Engine(p.engine_url) as engine, Progress(console=console) as progress:
            tasks: dict[str, TaskID] = {}

            def tick(step: str, n: int, total: int | None) -> None:
                if step not in tasks:
                    tasks[step] = progress.add_task(step, total=total)
                progress.advance(tasks[step], n)

            report = run(engine, p, progress=tick)
    except ClosedloopError as e:
        raise fail(e) from None
    for name, r in report.loads.items():
        console.print(
            f"{name}: received {r.received:,}, accepted {r.accepted:,}, failed {r.failed:,}, duplicate {r.duplicate:,}"
        )
    console.print(f"customers: {report.customers:,}")
    for name, s in report.segments.items():
        console.print(f"segment {name}: {s.size:,} (+{s.entered:,} / -{s.exited:,})")


@app.command()
def demo(
    persons: Annotated[
        int, typer.Option(min=100, max=1_000_000, help="persons to generate")
    ] = 5_000,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("demo-out"),
    seed: Annotated[int, typer.Option(help="random seed")] = 7,
) -> None:
    """Run the whole loop on generated data and write a report (HTML + PNG)."""
    from closedloop.demo.run import run_demo

    try:
        run_demo(persons, out, seed=seed, console=console)
    except ClosedloopError as e:
        raise fail(e) from None


# Stage command groups live in their own modules so stages can grow their CLI independently.
collect_cmds.register(app)
identity_cmds.register(app)
segment_cmds.register(app)
campaign_cmds.register(app)
report_cmds.register(app)
journey_cmds.register(app)
portrait_cmds.register(app)
profile_cmds.register(app)
predict_cmds.register(app)
tag_cmds.register(app)
account_cmds.register(app)
api_cmds.register(app)

if __name__ == "__main__":
    app()
