"""``closedloop segment size|preview|export``: audiences before (and without) a build."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import ibis.expr.types as ir
import typer
from rich.console import Console
from rich.table import Table

from closedloop.core.engine import Engine

console = Console()
segment_app = typer.Typer(
    help="Audiences: size, preview and export, evaluated on the warehouse now."
)

ProjectDir = Annotated[
    Path, typer.Option("--project", "-p", help="project folder (holds closedloop.yaml)")
]
AsOf = Annotated[
    datetime | None, typer.Option("--as-of", help="evaluate as of this time (UTC); default now")
]


def _members(project_dir: Path, name: str, as_of: datetime | None) -> tuple[Engine, ir.Table]:
    from closedloop.cli.common import fail, project_or_exit
    from closedloop.core.clock import Clock
    from closedloop.core.errors import ClosedloopError
    from closedloop.pipeline import project_fields
    from closedloop.segments.audience import preview_expr

    project = project_or_exit(project_dir)
    if name not in project.segments:
        raise fail(
            ClosedloopError(f"no segment {name!r}; known: {', '.join(sorted(project.segments))}")
        )
    when = Clock(as_of).now()
    engine = Engine(project.engine_url)
    expr = preview_expr(engine, project.segments[name], project_fields(project), when)
    return engine, expr


def _of_accounts(project_dir: Path, name: str) -> bool:
    """Whether ``name`` is an ``of: accounts`` segment: those are answered by ``account``."""
    from closedloop.cli.common import project_or_exit

    seg = project_or_exit(project_dir).segments.get(name)
    return seg is not None and seg.of == "accounts"


@segment_app.command("size")
def size(name: str, project: ProjectDir = Path("."), as_of: AsOf = None) -> None:
    """How many customers (or, for an account segment, accounts) are in the segment now."""
    if _of_accounts(project, name):
        from closedloop.cli import account_cmds

        account_cmds.size(name, project, as_of)
        return
    engine, expr = _members(project, name, as_of)
    with engine:
        p = engine.table("profiles")
        joined = expr.select("customer_id").join(
            p.select("customer_id", "lifecycle_stage"), "customer_id"
        )
        rows = (
            joined.group_by("lifecycle_stage").aggregate(n=joined.count()).to_pyarrow().to_pylist()
        )
    total = sum(int(r["n"]) for r in rows)
    console.print(f"segment {name}: {total:,} customers")
    for r in sorted(rows, key=lambda r: -int(r["n"])):
        console.print(f"  {r['lifecycle_stage']}: {int(r['n']):,}")


@segment_app.command("preview")
def preview(
    name: str,
    project: ProjectDir = Path("."),
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 10,
    as_of: AsOf = None,
) -> None:
    """A sample of members with the fields that qualified them."""
    if _of_accounts(project, name):
        from closedloop.cli import account_cmds

        account_cmds.preview(name, project, limit, as_of)
        return
    engine, expr = _members(project, name, as_of)
    with engine:
        rows = expr.limit(limit).to_pyarrow().to_pylist()
    table = Table(*(rows[0].keys() if rows else ["customer_id"]))
    for r in rows:
        table.add_row(*("" if v is None else str(v) for v in r.values()))
    console.print(table)


@segment_app.command("export")
def export(
    name: str,
    out: Annotated[Path | None, typer.Option(help="file to write: .csv or .parquet")] = None,
    webhook: Annotated[
        str | None, typer.Option(help="POST the members to this URL in signed batches")
    ] = None,
    secret_env: Annotated[
        str, typer.Option(help="environment variable holding the webhook signing secret")
    ] = "CLOSEDLOOP_WEBHOOK_SECRET",  # noqa: S107 - a variable name, not a secret
    batch_size: Annotated[int, typer.Option(min=1, max=100_000)] = 500,
    field: Annotated[
        list[str] | None, typer.Option(help="profile field to send with each member (repeatable)")
    ] = None,
    project: ProjectDir = Path("."),
    as_of: AsOf = None,
) -> None:
    """Write the members with their profile to CSV or Parquet, or POST them to a webhook."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from closedloop.cli.common import fail
    from closedloop.core.errors import ClosedloopError

    if (out is None) == (webhook is None):
        raise fail(ClosedloopError("give either --out FILE or --webhook URL"))
    if _of_accounts(project, name):
        if out is None:
            raise fail(ClosedloopError(f"{name} is an account segment: export it with --out FILE"))
        from closedloop.cli import account_cmds

        account_cmds.export(name, out, project, as_of)
        return
    if webhook is not None:
        _export_webhook(name, webhook, secret_env, batch_size, field or [], project, as_of)
        return
    assert out is not None  # noqa: S101 - checked above
    if out.suffix not in (".csv", ".parquet"):
        raise fail(ClosedloopError(f"{out}: export writes .csv or .parquet files"))
    engine, expr = _members(project, name, as_of)
    with engine:
        profiles = engine.table("profiles")
        data = (
            expr.select("customer_id")
            .join(profiles, "customer_id")
            .order_by("customer_id")
            .to_pyarrow()
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".csv":
        pacsv.write_csv(data, tmp)
    else:
        pq.write_table(data, tmp)
    tmp.replace(out)
    console.print(f"{data.num_rows:,} members of {name} → {out}")


def _export_webhook(
    name: str,
    url: str,
    secret_env: str,
    batch_size: int,
    fields: list[str],
    project: Path,
    as_of: datetime | None,
) -> None:
    """Members (with the fields that qualified them, plus ``fields``) in signed batches."""
    import os

    from closedloop.cli.common import fail
    from closedloop.core.clock import Clock
    from closedloop.core.errors import ClosedloopError
    from closedloop.core.signed_post import check_url
    from closedloop.segments.export import ExportError, export_to_webhook

    secret = os.environ.get(secret_env, "")
    if not secret:
        raise fail(
            ClosedloopError(f"set the signing secret in the environment variable {secret_env}")
        )
    try:
        check_url(url)
    except ValueError as e:
        raise fail(ClosedloopError(f"--webhook: {e}")) from None
    when = Clock(as_of).now()
    engine, expr = _members(project, name, when)
    with engine:
        profiles = engine.table("profiles")
        unknown = [f for f in fields if f not in profiles.columns]
        if unknown:
            raise fail(ClosedloopError(f"--field: no profile field {', '.join(unknown)}"))
        extra = [f for f in fields if f not in expr.columns]
        if extra:
            expr = expr.join(profiles.select("customer_id", *extra), "customer_id")
        rows = expr.to_pyarrow()
    try:
        r = export_to_webhook(name, when, rows, url, secret.encode(), batch_size)
    except ExportError as e:
        raise fail(ClosedloopError(str(e))) from None
    console.print(
        f"{r.members:,} members of {name} → {url} in {r.batches} signed batch(es), "
        f"{r.attempts} request(s), export id {r.export_id}"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(segment_app, name="segment")
