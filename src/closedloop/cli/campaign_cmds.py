"""``closedloop campaign dry-run|run`` and ``closedloop report campaign``."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich import box
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
    project_dir: Path,
    name: str,
    occasion: str | None,
    as_of: datetime | None,
    dry: bool,
    show: int = 0,
) -> None:
    from closedloop.activate.campaign import run_campaign
    from closedloop.core.clock import Clock
    from closedloop.core.engine import Engine

    p = project_or_exit(project_dir)
    c = _campaign(p, name)
    if c.trigger is not None and not dry:
        # A journey enters people when its trigger fires for them; a one-shot run would
        # message its whole audience at once, whoever's trigger never fired.
        raise fail(
            ClosedloopError(
                f"campaign {name!r} is a journey (it has a trigger): `closedloop serve` or "
                "`closedloop worker` enters people when the trigger fires for them; "
                "`closedloop campaign dry-run` shows its audience without sending"
            )
        )
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
                global_control=p.config.global_control,
                rivals=list(p.campaigns.values()),
            )
        except ClosedloopError as e:
            raise fail(e) from None
        if not dry:  # the tag catalogue shows when a tag was last used by a campaign
            from closedloop.tags.catalogue import record_tag_uses

            record_tag_uses(engine, p, [f"campaign:{name}"], clock)
    verb = "would be" if dry else "were"
    console.print(
        f"campaign {name}, occasion {key}: audience {run.audience:,} ({run.already_decided:,} already decided)"
    )
    console.print(
        f"  {run.sent:,} {verb} messaged ({run.postponed:,} postponed by quiet hours), "
        f"{run.held_out:,} held out, {run.suppressed:,} stopped by the contact policy"
    )
    for reason, n in sorted((run.reasons or {}).items(), key=lambda x: -x[1]):
        console.print(f"    {_reason(reason)}: {n:,}")
    if dry and run.decisions is not None and run.decisions.num_rows:
        wanted = ["customer_id", "group", "variant", "status", "reason", "send_at", "why"]
        rows = run.decisions.select(
            [c for c in wanted if c in run.decisions.column_names]
        ).to_pylist()
        groups = Counter((r["group"], r["variant"], r["status"]) for r in rows)
        table = Table("group", "variant", "status", "people")
        for (g, v, s), n in sorted(groups.items(), key=lambda x: tuple(map(str, x[0]))):
            table.add_row(str(g or "—"), str(v or "—"), str(s), f"{n:,}")
        console.print(table)
        people = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for head in ("customer", "group", "variant"):
            people.add_column(head, no_wrap=True)
        for head in ("status", "reason", "send at (UTC)"):
            people.add_column(head, overflow="fold")
        for r in rows[:show]:
            at = r["send_at"].strftime("%Y-%m-%d %H:%M") if r["send_at"] else "—"
            cells = [
                str(r[k] or "—") for k in ("customer_id", "group", "variant", "status", "reason")
            ]
            cells[4] = _reason(cells[4], r.get("why"))
            people.add_row(*cells, at)
        console.print(people)
        if len(rows) > show:
            console.print(f"  (first {show:,} of {len(rows):,} people; --show N for more)")
    if not dry and run.outbox is not None:
        console.print(f"  outbox: {run.outbox}")


def _reason(reason: str, why: str | None = None) -> str:
    """A suppression reason as people read it (with the arbitration's why, when known)."""
    from closedloop.activate.policy import LOST

    if reason.startswith(LOST):
        return f"lost arbitration to {why or reason[len(LOST) :]}"
    return reason


@campaign_app.command("dry-run")
def dry_run(
    name: str,
    project: ProjectDir = Path("."),
    occasion: Occasion = None,
    as_of: AsOf = None,
    show: Annotated[int, typer.Option(help="people listed one by one")] = 20,
) -> None:
    """Who would enter, who each policy would stop and why, each group and variant — nothing is sent."""
    _decide(project, name, occasion, as_of, dry=True, show=show)


@campaign_app.command("preview")
def preview_cmd(
    name: str,
    person: Annotated[
        str, typer.Argument(help="any identifier: e-mail, phone, user id, customer id ...")
    ],
    project: ProjectDir = Path("."),
    variant: Annotated[
        str | None, typer.Option(help="render this variant (default: the person's own)")
    ] = None,
    step: Annotated[str | None, typer.Option(help="only this send step of a journey")] = None,
    id_type: Annotated[
        str | None, typer.Option("--type", "-t", help="identifier type (default: try every type)")
    ] = None,
    occasion: Occasion = None,
    as_of: AsOf = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """The exact message(s) one person would get today, and whether the policy stops them and why."""
    import dataclasses
    import json

    from closedloop.activate.campaign import preview_campaign
    from closedloop.core.clock import Clock
    from closedloop.core.engine import Engine

    p = project_or_exit(project)
    c = _campaign(p, name)
    with Engine(p.engine_url) as engine:
        try:
            pv = preview_campaign(
                engine,
                c,
                person,
                identity=p.identity,
                id_type=id_type,
                variant=variant,
                step=step,
                occasion=occasion,
                clock=Clock(as_of),
                global_control=p.config.global_control,
                rivals=list(p.campaigns.values()),
            )
        except ClosedloopError as e:
            raise fail(e) from None
    if as_json:
        doc = dataclasses.asdict(pv) | {"would_send": pv.would_send}
        typer.echo(json.dumps(doc, default=str, ensure_ascii=False, indent=2))
        return
    t, v = pv.matched
    out = console.print
    out(f"campaign {pv.campaign} → customer {pv.customer_id} (by {t} {v})", markup=False)
    who = f"group {pv.group or '—'}, variant {pv.variant or '—'}"
    tone = "personalised" if pv.personalised else "NOT personalised (refused personalisation)"
    out(f"  {who}; content {tone}", markup=False)
    if pv.would_send:
        when = f"{pv.send_at:%Y-%m-%d %H:%M} UTC" if pv.send_at else "now"
        later = f" (postponed by {pv.postponed_by})" if pv.postponed_by else ""
        out(f"  verdict: would be sent at {when}{later}", markup=False)
    else:
        out("  verdict: would NOT be sent today:", markup=False)
        for why in pv.stopped_by:
            out(f"    - {_reason(why)}", markup=False)
    for m in pv.messages:
        head = f"step {m.step}: " if m.step else ""
        out(f"\n── {head}{m.channel} to {m.address or '(no address)'}", markup=False)
        out(f"subject: {m.subject}", markup=False, highlight=False)
        out(m.body, markup=False, highlight=False)
    if pv.offer:
        o = pv.offer
        out(
            f"\noffer {o['code']}: {o['description']} — {o['conditions']} "
            f"(expires after {o['expires_days']} days)",
            markup=False,
        )


@campaign_app.command("reshuffle")
def reshuffle_cmd(
    name: Annotated[
        str | None, typer.Argument(help="campaign (omit with --global-control)")
    ] = None,
    project: ProjectDir = Path("."),
    global_control: Annotated[
        bool, typer.Option("--global-control", help="reshuffle the project's global control")
    ] = False,
    reason: Annotated[str, typer.Option(help="why (kept in the salt history)")] = "",
) -> None:
    """Draw a new holdout/variant split (or global control group) on purpose; history is kept."""
    from closedloop.activate.assignment import GLOBAL_SCOPE, campaign_scope, reshuffle
    from closedloop.core.engine import Engine

    p = project_or_exit(project)
    if global_control == (name is not None):
        raise fail(ClosedloopError("name a campaign, or give --global-control (not both)"))
    scope = GLOBAL_SCOPE if name is None else campaign_scope(_campaign(p, name).name)
    with Engine(p.engine_url) as engine:
        salt = reshuffle(engine, scope, reason=reason)
    console.print(f"{scope}: new salt {salt!r}; later runs draw new groups (history kept)")


@campaign_app.command("run")
def run(
    name: str, project: ProjectDir = Path("."), occasion: Occasion = None, as_of: AsOf = None
) -> None:
    """Decide and write this occasion's messages (idempotent: a re-run sends nothing twice)."""
    _decide(project, name, occasion, as_of, dry=False)


@campaign_app.command("deliver")
def deliver_cmd(
    channel: Annotated[str, typer.Argument(help="email, sms, wechat, push or staff_task")],
    project: ProjectDir = Path("."),
    as_of: AsOf = None,
) -> None:
    """Hand the channel's due messages to its transport (channels: in closedloop.yaml), once."""
    from closedloop.activate.channels import deliver_channel
    from closedloop.core.clock import Clock
    from closedloop.core.definitions import Channel
    from closedloop.core.engine import Engine

    p = project_or_exit(project)
    try:
        name = Channel(channel)
    except ValueError:
        known = ", ".join(c.value for c in Channel)
        raise fail(ClosedloopError(f"unknown channel {channel!r}; known: {known}")) from None
    outbox = p.path(p.config.outbox)
    with Engine(p.engine_url) as engine:
        try:
            run = deliver_channel(
                engine,
                name,
                p.config.channels.get(name),
                outbox_dir=outbox,
                handoff_dir=outbox.parent / f"{outbox.name}-handoff",
                clock=Clock(as_of),
            )
        except ClosedloopError as e:
            raise fail(e) from None
    console.print(
        f"{channel}: {run.delivered:,} delivered, {run.bounced:,} bounced, {run.failed:,} failed "
        f"(will retry), {run.gave_up:,} given up; {run.already_done:,} done before, "
        f"{run.not_due:,} not due yet; {run.events:,} events recorded"
    )


@campaign_app.command("feedback")
def feedback_cmd(
    file: Annotated[Path, typer.Argument(help="provider reports, one JSON object per line")],
    project: ProjectDir = Path("."),
) -> None:
    """Load delivery/open/click/reply reports as Message * events (duplicates are dropped)."""
    from closedloop.activate.feedback import load_feedback_file
    from closedloop.core.engine import Engine

    p = project_or_exit(project)
    with Engine(p.engine_url) as engine:
        try:
            r = load_feedback_file(engine, file)
        except ClosedloopError as e:
            raise fail(e) from None
    console.print(
        f"{r.received:,} reports: {r.accepted:,} new events, {r.duplicate:,} already loaded, "
        f"{len(r.unknown):,} not loaded"
    )
    for why in r.unknown[:20]:
        console.print(f"  {why}")


@campaign_app.command("tasks")
def tasks_cmd(
    out: Annotated[Path, typer.Argument(help="CSV file to write")],
    project: ProjectDir = Path("."),
    owner: Annotated[str | None, typer.Option(help="only this owner's tasks")] = None,
) -> None:
    """Export open staff tasks (next best actions for shopping guides) as CSV."""
    from closedloop.activate.channels.staff import export_staff_tasks
    from closedloop.core.engine import Engine

    p = project_or_exit(project)
    with Engine(p.engine_url) as engine:
        n = export_staff_tasks(engine, out, owner=owner)
    console.print(f"{n:,} open tasks written to {out}")


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
    """Intent-to-treat conversions and lift with 95% CIs, per variant and holdout, the
    sample-ratio check across arms and the A/B winner (only when significant), as HTML and PNG."""
    from closedloop.core.clock import Clock
    from closedloop.core.engine import Engine
    from closedloop.measure.campaign import measure_campaign
    from closedloop.measure.report import (
        Section,
        campaign_rows,
        lift_chart,
        variant_notes,
        variant_section,
        write_report,
    )
    from closedloop.measure.variants import measure_variants, variant_table

    p = project_or_exit(project)
    c = _campaign(p, name)
    with Engine(p.engine_url) as engine:
        try:
            o = measure_campaign(engine, c, occasion, Clock(as_of))
            v = measure_variants(engine, c, occasion)
        except (ClosedloopError, ValueError) as e:
            raise fail(ClosedloopError(f"cannot measure {name} / {occasion}: {e}")) from None
    rows = campaign_rows(o)
    sections = [Section("Outcome", rows=rows, charts=[lift_chart(o)])]
    if v.has_variants:
        sections.append(variant_section(v))
    folder = out or p.path(p.config.reports) / f"{name}-{occasion}"
    path = write_report(
        folder,
        f"Campaign {name}",
        f"occasion {occasion}, goal {c.goal.event} within {c.goal.window_days} days",
        sections,
    )
    for k, text in rows:
        console.print(f"{k:>30}: {text}", markup=False, highlight=False)
    if v.has_variants:
        header, table_rows = variant_table(v)
        table = Table(*header, box=box.SIMPLE_HEAD, title="per variant (intent-to-treat)")
        for r in table_rows:
            table.add_row(*r)
        console.print(table)
        for line in variant_notes(v):
            console.print(line, markup=False, highlight=False)
    elif v.sample_ratio.flagged:
        console.print(v.sample_ratio.line(), markup=False, highlight=False)
    console.print(f"report: {path}")


def register(app: typer.Typer) -> None:
    app.add_typer(campaign_app, name="campaign")
    app.add_typer(report_app, name="report")
