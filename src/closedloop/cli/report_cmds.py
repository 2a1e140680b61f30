"""``closedloop report funnel|cohorts|programme``: measurement reports as HTML, PNG and a table.

The commands join the ``report`` group declared beside ``report campaign`` in
``cli.campaign_cmds``; each prints its table and writes ``report.html`` with PNG charts.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from closedloop.cli.campaign_cmds import report_app
from closedloop.cli.common import ProjectDir, console, fail, project_or_exit
from closedloop.core.definitions import Project
from closedloop.core.errors import ClosedloopError

Since = Annotated[
    datetime | None, typer.Option(help="start of the period (UTC; default: --days before --until)")
]
Until = Annotated[datetime | None, typer.Option(help="end of the period (UTC; default: now)")]
Days = Annotated[int, typer.Option(min=1, help="length of the period when --since is not given")]
Out = Annotated[Path | None, typer.Option(help="report folder (default: the project's reports/)")]


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _period(since: datetime | None, until: datetime | None, days: int) -> tuple[datetime, datetime]:
    from closedloop.core.clock import Clock

    end = _utc(until) if until else Clock().now()
    start = _utc(since) if since else end - timedelta(days=days)
    if start >= end:
        raise fail(ClosedloopError(f"the period is empty: --since {start} is not before {end}"))
    return start, end


def _print(header: list[str], rows: list[list[str]]) -> None:
    t = Table(*header)
    for r in rows:
        t.add_row(*r)
    console.print(t)


def _folder(p: Project, out: Path | None, name: str) -> Path:
    return out or p.path(p.config.reports) / name


@report_app.command("funnel")
def report_funnel(
    step: Annotated[list[str], typer.Option("--step", help="an event name; give 1+ in order")],
    within: Annotated[int, typer.Option(min=1, help="days from the first step to the last")] = 7,
    campaign: Annotated[
        str | None, typer.Option(help="split by this campaign's treatment and holdout")
    ] = None,
    occasion: Annotated[str | None, typer.Option(help="the campaign's occasion")] = None,
    segment: Annotated[
        list[str] | None, typer.Option("--segment", help="split by current members of segments")
    ] = None,
    since: Since = None,
    until: Until = None,
    days: Days = 90,
    project: ProjectDir = Path("."),
    out: Out = None,
) -> None:
    """Customers through ordered steps within a window, overall or by campaign group or segment."""
    from closedloop.core.engine import Engine
    from closedloop.measure.funnels import campaign_groups, funnel, segment_groups
    from closedloop.measure.report import Section, funnel_chart, funnel_table, write_report

    p = project_or_exit(project)
    if campaign and segment:
        raise fail(ClosedloopError("split by --campaign or by --segment, not both"))
    if campaign and not occasion:
        raise fail(ClosedloopError("--campaign needs --occasion (the occasion to follow)"))
    if campaign and campaign not in p.campaigns:
        raise fail(
            ClosedloopError(f"no campaign {campaign!r}; known: {', '.join(sorted(p.campaigns))}")
        )
    unknown = sorted(set(segment or []) - set(p.segments))
    if unknown:
        raise fail(ClosedloopError(f"unknown segment(s) {', '.join(unknown)}"))
    start, end = _period(since, until, days)
    with Engine(p.engine_url) as engine:
        groups = None
        if campaign and occasion:
            groups = campaign_groups(engine, campaign, occasion)
        elif segment:
            groups = segment_groups(engine, segment)
        try:
            f = funnel(engine, step, within, start, end, groups)
        except ValueError as e:
            raise fail(ClosedloopError(f"funnel: {e}")) from None
    header, rows = funnel_table(f)
    _print(header, rows)
    by = (
        f"campaign {campaign} / {occasion} (intent-to-treat groups)"
        if campaign
        else (f"segments {', '.join(segment or [])}" if segment else "everyone")
    )
    path = write_report(
        _folder(p, out, "funnel"),
        "Funnel: " + " → ".join(step),
        f"{start:%Y-%m-%d} to {end:%Y-%m-%d}, within {within} days, by {by}",
        [
            Section(
                "Steps",
                header=header,
                table=rows,
                charts=[funnel_chart(f)],
                note="A customer enters with their first step-1 event in the period; each next "
                "step must follow the previous one within the window from entry.",
            )
        ],
    )
    console.print(f"report: {path}")


@report_app.command("cohorts")
def report_cohorts(
    cohort_event: Annotated[
        str, typer.Option(help="the event that starts a cohort (e.g. 'Signed Up')")
    ] = "Order Completed",
    activity_event: Annotated[
        str, typer.Option(help="the event that counts as active, with its revenue")
    ] = "Order Completed",
    by: Annotated[str | None, typer.Option(help="split cohorts by 'source' or 'channel'")] = None,
    since: Since = None,
    until: Until = None,
    days: Days = 365,
    project: ProjectDir = Path("."),
    out: Out = None,
) -> None:
    """Monthly cohorts by first order (or sign-up): retention and revenue by months since."""
    from closedloop.core.engine import Engine
    from closedloop.measure.cohorts import cohorts
    from closedloop.measure.report import Section, cohort_chart, cohort_table, write_report

    p = project_or_exit(project)
    start, end = _period(since, until, days)
    with Engine(p.engine_url) as engine:
        try:
            found = cohorts(
                engine,
                start,
                end,
                cohort_event=cohort_event,
                activity_event=activity_event,
                by=by,
                tz=p.config.timezone,
            )
        except ValueError as e:
            raise fail(ClosedloopError(f"cohorts: {e}")) from None
    header, rows = cohort_table(found)
    span = max((len(c.active) for c in found), default=0)
    _print(  # the terminal gets retention only; the page has revenue too
        ["cohort", "split", "customers", *[f"M{m}" for m in range(span)]],
        [
            [f"{c.month:%Y-%m}", c.split, f"{c.size:,}"]
            + [f"{c.retention(m):.0%}" for m in range(len(c.active))]
            + [""] * (span - len(c.active))
            for c in found
        ],
    )
    path = write_report(
        _folder(p, out, "cohorts"),
        f"Cohorts by first {cohort_event}",
        f"cohorts begun {start:%Y-%m-%d} to {end:%Y-%m-%d}; active = {activity_event}",
        [
            Section(
                "Retention and revenue",
                header=header,
                table=rows,
                charts=[cohort_chart(found)],
                note="Each cell: share of the cohort active that month · cumulative revenue per "
                "cohort customer up to that month.",
            )
        ],
    )
    console.print(f"report: {path}")


@report_app.command("programme")
def report_programme(
    goal: Annotated[str, typer.Option(help="the goal event")] = "Order Completed",
    share: Annotated[
        float | None,
        typer.Option(help="global control share (default: the project's global_control.share)"),
    ] = None,
    since: Since = None,
    until: Until = None,
    days: Days = 30,
    project: ProjectDir = Path("."),
    out: Out = None,
) -> None:
    """All campaigns together against the persistent global control group, over a period."""
    import pyarrow as pa

    from closedloop.activate.assignment import global_control_salt, in_global_control
    from closedloop.core.engine import Engine
    from closedloop.measure.programme import programme_lift
    from closedloop.measure.report import Section, write_report
    from closedloop.measure.report import programme_rows as rows_of

    p = project_or_exit(project)
    configured = p.config.global_control
    control_share = share if share is not None else (configured.share if configured else None)
    if not control_share or not 0 < control_share < 1:
        raise fail(
            ClosedloopError(
                "no global control group: set global_control.share in closedloop.yaml "
                "(or pass --share 0.05 for the share it was run with)"
            )
        )
    start, end = _period(since, until, days)
    with Engine(p.engine_url) as engine:
        ids = engine.table("customers").customer_id.to_pyarrow().to_pylist()
        flags = in_global_control(ids, global_control_salt(engine), control_share)
        population = pa.table({"customer_id": ids, "control": pa.array(flags.tolist(), pa.bool_())})
        try:
            with engine.temporary(population) as pop:
                o = programme_lift(engine, pop, goal, start, end, control_share=control_share)
        except ValueError as e:
            raise fail(ClosedloopError(f"programme lift: {e}")) from None
    rows = rows_of(o)
    for k, v in rows:
        console.print(f"{k:>34}: {v}")
    if o.control_messaged:
        console.print(
            f"[red]warning[/red]: {o.control_messaged:,} global-control customers were messaged"
        )
    path = write_report(
        _folder(p, out, "programme"),
        "Programme lift over the global control",
        f"{start:%Y-%m-%d} to {end:%Y-%m-%d}, goal {goal}",
        [Section("Outcome", rows=rows)],
    )
    console.print(f"report: {path}")


def register(app: typer.Typer) -> None:
    """Nothing to add: the commands above join ``report`` when this module is imported."""
    del app
