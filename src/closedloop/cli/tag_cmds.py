"""``closedloop tags list|show``, ``closedloop tag set|clear|history`` and ``closedloop personas``.

The catalogue commands show, for every tag, its place in the tree, owner, coverage, value
distribution, freshness and last use, with stale and unused tags flagged. ``tag set`` is how
staff set a manual tag by hand (recorded with who and when); ``personas`` clusters customers
on chosen traits and prints a card per cluster.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from closedloop.cli.common import ProjectDir, console, fail, project_or_exit
from closedloop.core.errors import ClosedloopError

if TYPE_CHECKING:
    from closedloop.tags.catalogue import TagInfo

tags_app = typer.Typer(help="The tag catalogue: coverage, distribution, freshness and use.")
tag_app = typer.Typer(help="Manual tags: set or clear a tag on a customer, and its history.")

AsJson = Annotated[bool, typer.Option("--json", help="print JSON")]


def _when(value: object) -> str:
    return "never" if value is None else str(value)[:19]


def _age(value: datetime | None) -> str:
    if value is None:
        return ""
    days = (datetime.now(UTC) - value).total_seconds() / 86400
    return f" ({days:.1f} days ago)"


@tags_app.command("list")
def list_tags(project: ProjectDir = Path("."), as_json: AsJson = False) -> None:
    """Every tag, in tree order, with coverage, freshness, last use and flags."""
    from closedloop.core.engine import Engine
    from closedloop.tags.catalogue import catalogue

    p = project_or_exit(project)
    try:
        with Engine(p.engine_url) as engine:
            infos = catalogue(engine, p)
    except ClosedloopError as e:
        raise fail(e) from None
    if as_json:
        console.print_json(json.dumps([i.as_json() for i in infos]))
        return
    t = Table("tag", "type", "owner", "coverage", "computed", "last used", "flags")
    t.columns[0].no_wrap = True
    for i in infos:
        name = "  " * (len(i.path) - 1) + i.name
        t.add_row(
            name,
            i.type,
            i.owner,
            f"{i.coverage:.1%} ({i.customers:,})",
            _when(i.computed_at),
            _when(i.last_used_at),
            ", ".join(_short_flags(i)),
        )
    console.print(t)


def _short_flags(info: TagInfo) -> list[str]:
    out = []
    if info.stale:
        out.append("stale")
    if info.unused:
        out.append("unused")
    if info.note:
        out.append("no scores yet" if info.note.startswith("no scores") else "see notes")
    return out


@tags_app.command("show")
def show_tag(name: str, project: ProjectDir = Path("."), as_json: AsJson = False) -> None:
    """One tag in full: description, tree path, values and their counts, freshness, users."""
    from closedloop.core.engine import Engine
    from closedloop.tags.catalogue import catalogue

    p = project_or_exit(project)
    if name not in p.tags:
        raise fail(ClosedloopError(f"no tag {name!r}; known: {', '.join(sorted(p.tags))}"))
    try:
        with Engine(p.engine_url) as engine:
            (info,) = catalogue(engine, p, names=[name])
    except ClosedloopError as e:
        raise fail(e) from None
    if as_json:
        console.print_json(json.dumps(info.as_json()))
        return
    console.print(f"[bold]{info.name}[/bold] ({info.type}) — {info.description}")
    console.print(f"tree: {' / '.join(info.path)}    owner: {info.owner or '(none)'}")
    console.print(f"coverage: {info.coverage:.1%} of customers ({info.customers:,})")
    console.print(
        f"computed: {_when(info.computed_at)}{_age(info.computed_at)}    "
        f"inputs as of: {_when(info.inputs_at)}{_age(info.inputs_at)}    "
        f"last used: {_when(info.last_used_at)}"
    )
    console.print(f"read by: {', '.join(info.used_by) or 'nothing'}")
    if info.flags:
        console.print("[yellow]flags:[/yellow] " + "; ".join(info.flags), markup=True)
    t = Table("value", "customers", "share")
    for value, n in info.values.items():
        t.add_row(value, f"{n:,}", f"{n / info.customers:.1%}" if info.customers else "")
    if info.other_values:
        t.add_row("(other values)", f"{info.other_values:,}", "")
    console.print(t)


@tag_app.command("set")
def set_cmd(
    customer: Annotated[str, typer.Argument(help="customer id")],
    tag: Annotated[str, typer.Argument(help="a manual tag")],
    value: Annotated[str, typer.Argument(help="the value to set")],
    by: Annotated[str, typer.Option("--by", help="who sets it (kept in the history)")],
    note: Annotated[str | None, typer.Option(help="why, for the history")] = None,
    project: ProjectDir = Path("."),
) -> None:
    """Set a manual tag on a customer, recorded with who and when."""
    _set(customer, tag, value, by, note, project)


@tag_app.command("clear")
def clear_cmd(
    customer: Annotated[str, typer.Argument(help="customer id")],
    tag: Annotated[str, typer.Argument(help="a manual tag")],
    by: Annotated[str, typer.Option("--by", help="who clears it (kept in the history)")],
    note: Annotated[str | None, typer.Option(help="why, for the history")] = None,
    project: ProjectDir = Path("."),
) -> None:
    """Remove a manual tag from a customer (the history keeps the earlier value)."""
    _set(customer, tag, None, by, note, project)


def _set(
    customer: str, tag: str, value: str | None, by: str, note: str | None, project: Path
) -> None:
    from closedloop.core.engine import Engine
    from closedloop.tags.manual import set_tag

    p = project_or_exit(project)
    try:
        with Engine(p.engine_url) as engine:
            s = set_tag(engine, p, customer, tag, value, by=by, note=note)
    except ClosedloopError as e:
        raise fail(e) from None
    what = f"= {s.value}" if s.value is not None else "cleared"
    console.print(f"{s.customer_id} {s.tag} {what} (by {s.set_by} at {_when(s.set_at)})")


@tag_app.command("history")
def history_cmd(
    customer: Annotated[str | None, typer.Argument(help="customer id (default: all)")] = None,
    tag: Annotated[str | None, typer.Option(help="only this tag")] = None,
    project: ProjectDir = Path("."),
    as_json: AsJson = False,
) -> None:
    """Who set which manual tag, when, oldest first."""
    from closedloop.core.engine import Engine
    from closedloop.tags.manual import tag_history

    p = project_or_exit(project)
    with Engine(p.engine_url) as engine:
        rows = tag_history(engine, customer, tag)
    if as_json:
        console.print_json(
            json.dumps(
                [
                    {
                        "customer_id": r.customer_id,
                        "tag": r.tag,
                        "value": r.value,
                        "set_by": r.set_by,
                        "set_at": r.set_at.isoformat(),
                        "note": r.note,
                    }
                    for r in rows
                ]
            )
        )
        return
    t = Table("when", "customer", "tag", "value", "by", "note")
    for r in rows:
        t.add_row(
            _when(r.set_at), r.customer_id, r.tag, r.value or "(cleared)", r.set_by, r.note or ""
        )
    console.print(t)


def personas(
    traits: Annotated[
        str, typer.Option(help="comma-separated numeric traits, e.g. recency_days,orders,revenue")
    ],
    k: Annotated[
        int | None,
        typer.Option(min=2, max=30, help="number of personas (default: best silhouette)"),
    ] = None,
    k_min: Annotated[int, typer.Option(min=2, help="smallest k tried")] = 2,
    k_max: Annotated[int, typer.Option(min=2, help="largest k tried")] = 8,
    seed: Annotated[int, typer.Option(help="random seed")] = 7,
    project: ProjectDir = Path("."),
    as_json: AsJson = False,
) -> None:
    """Cluster customers on traits (k-means on z-scores) and print a persona card per cluster."""
    from closedloop.core.engine import Engine
    from closedloop.segments.personas import find_personas

    p = project_or_exit(project)
    names = [t.strip() for t in traits.split(",") if t.strip()]
    try:
        with Engine(p.engine_url) as engine:
            result = find_personas(engine, names, k=k, k_range=(k_min, k_max), seed=seed)
    except ClosedloopError as e:
        raise fail(e) from None
    if as_json:
        console.print_json(json.dumps(result.as_json()))
        return
    console.print(result.method, markup=False)
    console.print(
        f"{result.customers:,} customers clustered, {result.left_out:,} left out (missing a trait)"
    )
    for c in result.cards:
        console.print(
            f"\n[bold]persona {c.persona}[/bold]: {c.size:,} customers ({c.share:.1%}) — {c.description}"
        )
        t = Table("trait", "mean", "z vs population")
        for name in c.distinctive:
            t.add_row(name, f"{c.means[name]:,.2f}", f"{c.z[name]:+.2f}")
        console.print(t)
        console.print(f"typical member: {c.typical_member}")


def register(app: typer.Typer) -> None:
    """Add the tag catalogue, manual tags and personas to the main app."""
    app.add_typer(tags_app, name="tags")
    app.add_typer(tag_app, name="tag")
    app.command("personas")(personas)
