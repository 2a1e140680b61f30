"""``closedloop account show|list|size|preview|export``: B2B accounts and their segments.

An account is what ``group`` calls named (``portrait.accounts``); ``show`` prints its profile
with its contacts (role, when seen, and a few of their profile fields) and the account
segments it is in. ``size``, ``preview`` and ``export`` evaluate an ``of: accounts`` segment
on the warehouse now, as ``closedloop segment`` does for customer segments.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from closedloop.cli.common import ProjectDir, fail, project_or_exit
from closedloop.core.engine import Engine
from closedloop.core.errors import ClosedloopError

console = Console(soft_wrap=True)
account_app = typer.Typer(help="B2B accounts (group calls): profiles, contacts and segments.")

AsOf = Annotated[
    datetime | None, typer.Option("--as-of", help="evaluate as of this time (UTC); default now")
]
CONTACT_FIELDS = ("name", "email", "orders", "revenue", "last_seen")


def account_document(engine: Engine, account_id: str) -> dict[str, Any] | None:
    """The account's profile, its contacts with a few profile fields, and its segments."""
    a = engine.table("accounts")
    rows = a.filter(a.account_id == account_id).to_pyarrow().to_pylist()
    if not rows:
        return None
    c = engine.table("account_contacts")
    c = c.filter(c.account_id == account_id)
    p = engine.table("profiles").select("customer_id", *CONTACT_FIELDS)
    p = p.rename({f"contact_{f}": f for f in CONTACT_FIELDS})
    contacts = (
        c.left_join(p, "customer_id")
        .drop("customer_id_right", "account_id")
        .order_by(["role", "customer_id"])
        .to_pyarrow()
        .to_pylist()
    )
    m = engine.table("account_membership")
    m = m.filter((m.account_id == account_id) & m.exited_at.isnull())
    segments = m.select("segment", "entered_at").order_by("segment").to_pyarrow().to_pylist()
    return {"account": rows[0], "contacts": contacts, "segments": segments}


def show(
    account_id: Annotated[str, typer.Argument(help="the account's id (the group calls' groupId)")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    project: ProjectDir = Path("."),
) -> None:
    """Show one account: its traits, behaviour, contacts by role and segments."""
    import closedloop.portrait.accounts
    import closedloop.segments.accounts  # noqa: F401

    p = project_or_exit(project)
    with Engine(p.engine_url) as engine:
        doc = account_document(engine, account_id)
    if doc is None:
        console.print(f"no account {account_id!r}", markup=False)
        raise typer.Exit(code=1)
    if as_json:
        typer.echo(json.dumps(doc, default=str, ensure_ascii=False, indent=2))
        return
    t = Table("field", "value", title=f"account {account_id}")
    for k, v in doc["account"].items():
        t.add_row(k, "" if v is None else str(v))
    console.print(t)
    ct = Table("customer_id", "role", "role_text", "first_seen", "last_seen", *CONTACT_FIELDS)
    for r in doc["contacts"]:
        cells = [r["customer_id"], r["role"], r["role_text"], r["first_seen"], r["last_seen"]]
        cells += [r[f"contact_{f}"] for f in CONTACT_FIELDS]
        ct.add_row(*("" if v is None else str(v) for v in cells))
    console.print(ct)
    names = ", ".join(s["segment"] for s in doc["segments"]) or "none"
    console.print(f"segments: {names}", markup=False)


def list_accounts(
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 20,
    project: ProjectDir = Path("."),
) -> None:
    """The accounts with the most contacts: id, name, industry, contacts, orders, revenue."""
    import closedloop.portrait.accounts  # noqa: F401

    p = project_or_exit(project)
    cols = ("account_id", "name", "industry", "size", "contacts", "orders", "revenue")
    with Engine(p.engine_url) as engine:
        a = engine.table("accounts")
        total = int(a.count().execute())
        rows = (
            a.order_by([a.contacts.desc(), a.account_id]).select(*cols).limit(limit).to_pyarrow()
        ).to_pylist()
    t = Table(*cols, title=f"{total:,} accounts")
    for r in rows:
        t.add_row(*("" if r[c] is None else str(r[c]) for c in cols))
    console.print(t)


def _segment(project_dir: Path, name: str, as_of: datetime | None) -> tuple[Engine, Any]:
    from closedloop.core.clock import Clock
    from closedloop.segments.accounts import account_preview_expr

    project = project_or_exit(project_dir)
    seg = project.segments.get(name)
    if seg is None or seg.of != "accounts":
        known = ", ".join(sorted(n for n, s in project.segments.items() if s.of == "accounts"))
        raise fail(ClosedloopError(f"no account segment {name!r}; known: {known or 'none'}"))
    engine = Engine(project.engine_url)
    return engine, account_preview_expr(engine, seg, Clock(as_of).now())


def size(name: str, project: ProjectDir = Path("."), as_of: AsOf = None) -> None:
    """How many accounts are in an account segment now, by industry."""
    engine, expr = _segment(project, name, as_of)
    with engine:
        a = engine.table("accounts").select("account_id", "industry")
        j = expr.select("account_id").join(a, "account_id")
        rows = j.group_by("industry").aggregate(n=j.count()).to_pyarrow().to_pylist()
    console.print(f"segment {name}: {sum(int(r['n']) for r in rows):,} accounts")
    for r in sorted(rows, key=lambda r: (-int(r["n"]), str(r["industry"]))):
        console.print(f"  {r['industry'] or '(unknown industry)'}: {int(r['n']):,}")


def preview(
    name: str,
    project: ProjectDir = Path("."),
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 10,
    as_of: AsOf = None,
) -> None:
    """A sample of member accounts with the fields that qualified them."""
    engine, expr = _segment(project, name, as_of)
    with engine:
        rows = expr.limit(limit).to_pyarrow().to_pylist()
    t = Table(*(rows[0].keys() if rows else ["account_id"]))
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r.values()))
    console.print(t)


def export(
    name: str,
    out: Annotated[Path, typer.Option(help="file to write: .csv or .parquet")],
    project: ProjectDir = Path("."),
    as_of: AsOf = None,
) -> None:
    """Write the member accounts with their whole account profile to CSV or Parquet."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if out.suffix not in (".csv", ".parquet"):
        raise fail(ClosedloopError(f"{out}: export writes .csv or .parquet files"))
    engine, expr = _segment(project, name, as_of)
    with engine:
        accounts = engine.table("accounts")
        data = (
            expr.select("account_id").join(accounts, "account_id").order_by("account_id")
        ).to_pyarrow()
    if out.suffix == ".csv":
        pacsv.write_csv(data, out)
    else:
        pq.write_table(data, out)
    console.print(f"{data.num_rows:,} accounts → {out}", markup=False)


def register(app: typer.Typer) -> None:
    account_app.command("show")(show)
    account_app.command("list")(list_accounts)
    account_app.command("size")(size)
    account_app.command("preview")(preview)
    account_app.command("export")(export)
    app.add_typer(account_app, name="account")
