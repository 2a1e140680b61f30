"""CLI commands of the identity stage (``identity explain``, ``identity split``, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from closedloop.cli.common import ProjectDir, fail, project_or_exit
from closedloop.core.engine import Engine
from closedloop.core.errors import ClosedloopError

identity_app = typer.Typer(
    help="Identity: why identifiers are one customer (explain), and taking them apart (split).",
    no_args_is_help=True,
)
console = Console(soft_wrap=True)


@identity_app.command("explain")
def explain_cmd(
    customer: Annotated[str, typer.Argument(help="customer id (a retired alias works too)")],
    project: ProjectDir = Path("."),
    frm: Annotated[
        str | None, typer.Option("--from", help="TYPE:VALUE — start of the path")
    ] = None,
    to: Annotated[str | None, typer.Option("--to", help="TYPE:VALUE — end of the path")] = None,
) -> None:
    """Show the path of evidence between a customer's identifiers (message ids per hop)."""
    from closedloop.identity.explain import explain

    p = project_or_exit(project)
    with Engine(p.engine_url) as engine:
        try:
            ex = explain(engine, p.identity, customer, frm, to)
        except ClosedloopError as e:
            raise fail(e) from None
    alias = "" if ex.customer_id == customer else f" (alias {customer})"
    console.print(
        f"customer {ex.customer_id}{alias}: {len(ex.identifiers)} identifiers",
        markup=False,
        highlight=False,
    )
    if frm is not None:
        target = next(iter(ex.paths), None)
        if target is None:
            console.print(f"no path of used evidence to {ex.unreachable[0]}", markup=False)
            raise typer.Exit(code=1)
        console.print(str(ex.root), markup=False, highlight=False)
        node = ex.root
        for step in ex.paths[target]:
            node = step.b if step.a == node else step.a
            console.print(f"  ~ {node}  [{step.evidence()}]", markup=False, highlight=False)
        return
    for depth, ident, hop in ex.tree():
        line = "  " * depth + ("└ " if depth else "") + str(ident)
        if hop is not None:
            line += f"  [{hop.evidence()}]"
        console.print(line, markup=False, highlight=False)
    for ident in ex.unreachable:
        console.print(f"(not linked by used evidence) {ident}", markup=False, highlight=False)


@identity_app.command("split")
def split_cmd(
    project: ProjectDir = Path("."),
    identifier: Annotated[
        str | None, typer.Option("--identifier", help="TYPE:VALUE whose links are removed")
    ] = None,
    edge: Annotated[
        str | None, typer.Option("--edge", help="TYPE:VALUE~TYPE:VALUE — one link to remove")
    ] = None,
    block: Annotated[
        bool, typer.Option("--block", help="never link it again (not only past evidence)")
    ] = False,
    reason: Annotated[str, typer.Option("--reason", help="why, for the ledger")] = "",
    downstream: Annotated[
        bool,
        typer.Option(
            "--downstream/--no-downstream",
            help="rebuild profiles, traits, tags and segments from the new partition",
        ),
    ] = True,
) -> None:
    """Remove an identifier's links or one link, re-partition, record it in the ledger.

    Then (unless ``--no-downstream``) everything that depended on the old partition is
    rebuilt — profiles, traits, tags, segment memberships — so no profile keeps the orders or
    contact points of an identifier that is no longer its customer's. The rebuild is a full
    one: an incremental portrait refresh sees only events that moved, not a phone or e-mail
    leaving a customer whose events all stayed.
    """
    from closedloop.identity.explain import split
    from closedloop.pipeline import build

    p = project_or_exit(project)
    with Engine(p.engine_url) as engine:
        try:
            r = split(
                engine, p.identity, identifier=identifier, edge=edge, block=block, reason=reason
            )
            report = (
                build(engine, p, load=False, identity=False, incremental=False)
                if downstream
                else None
            )
        except ClosedloopError as e:
            raise fail(e) from None
    console.print(
        f"split: {r.splits} customer(s) split, {r.customers:,} customers now",
        markup=False,
        highlight=False,
    )
    if report is None:
        console.print("downstream not rebuilt: run `closedloop build`", markup=False)
        return
    console.print(
        f"downstream rebuilt: {report.customers:,} profiles, {report.traits:,} trait values, "
        f"{len(report.segments)} segment(s)",
        markup=False,
        highlight=False,
    )


@identity_app.command("quality")
def quality_cmd(
    project: ProjectDir = Path("."),
    limit: Annotated[int, typer.Option(help="suspect identifiers to list")] = 20,
) -> None:
    """Data quality: refused identifiers by reason, and identifiers on many names."""
    from rich.table import Table

    from closedloop.identity.quality import report

    p = project_or_exit(project)
    with Engine(p.engine_url) as engine:
        q = report(engine, limit)
    t = Table("type", "reason", "identifiers", "messages", title="refused identifiers")
    for r in q.issues.to_pylist():
        t.add_row(r["id_type"], r["reason"], f"{r['identifiers']:,}", f"{r['messages'] or 0:,}")
    console.print(t)
    s = Table("type", "value", "names", "messages", title="suspects (not trusted to link)")
    for r in q.suspects.to_pylist():
        s.add_row(r["id_type"], r["id_value"], str(r["names"]), f"{r['messages']:,}")
    console.print(s)


def register(app: typer.Typer) -> None:
    """Add the identity stage's commands to the main app."""
    app.add_typer(identity_app, name="identity")
