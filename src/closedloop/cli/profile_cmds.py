"""``closedloop profile IDENTIFIER``: one customer's profile row, found by any identifier.

Answers from the lookup's serving store when it matches the warehouse, from the warehouse
otherwise (``portrait.lookup``); the output says which.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from closedloop.cli.common import ProjectDir, fail, project_or_exit
from closedloop.core.engine import Engine
from closedloop.core.errors import ClosedloopError

console = Console(soft_wrap=True)


def profile(
    identifier: Annotated[
        str, typer.Argument(help="an e-mail, phone, member id, ... or a customer id")
    ],
    id_type: Annotated[
        str | None,
        typer.Option("--type", "-t", help="identifier type (default: try every type)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    project: ProjectDir = Path("."),
) -> None:
    """Show the profile of the customer an identifier belongs to (aliases followed)."""
    from closedloop.portrait.lookup import ProfileLookup

    p = project_or_exit(project)
    try:
        with Engine(p.engine_url) as engine, ProfileLookup.open(engine, p.identity) as lookup:
            match = lookup.find(identifier, id_type)
    except ClosedloopError as e:
        raise fail(e) from None
    if match is None:
        if as_json:
            typer.echo(json.dumps(None))
        else:
            console.print(f"no customer has the identifier {identifier!r}", markup=False)
        raise typer.Exit(code=1)
    if as_json:
        doc: dict[str, Any] = {
            "customer_id": match.customer_id,
            "matched": {"type": match.matched[0], "value": match.matched[1]},
            "source": match.source,
            "profile": match.profile,
        }
        typer.echo(json.dumps(doc, default=str, ensure_ascii=False, indent=2))
        return
    t, v = match.matched
    console.print(
        f"customer {match.customer_id} (by {t} {v}, from the {match.source})",
        markup=False,
        highlight=False,
    )
    if match.profile is None:
        console.print("no profile yet: run `closedloop build`", markup=False)
        return
    table = Table("field", "value")
    for k, val in match.profile.items():
        if val is not None:
            table.add_row(k, str(val))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command(name="profile")(profile)
